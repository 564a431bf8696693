"""Evaluation of a cross-validation run: ``runs/<name>/fold_<i>/``, one complete run per fold (``train.py --fold i``).

Ensemble (``evaluation.py --run runs/<name>`` on any split or new images): every fold's model predicts the whole
volume with its own patch size and sliding window, and their probabilities are averaged before the arg-max, as
nnU-Net ensembles its folds. Inference runs once per fold and case; memory holds one running sum.

Cross-validation (``--split cv``): every case in fold ``i``'s ``val`` list of ``splits.json`` is predicted by fold
``i``'s model alone, the one model that did not train on it, so one ``metrics.csv`` covers every labelled case, and
``summary.json`` adds each fold's summary (nnU-Net's cross-validation summary). ``--postprocess auto`` on a run of
folds decides on these out-of-fold predictions too.

A fold folder without a model (not trained yet, or its files lost) is left out of the ensemble with a warning naming
the folder; under ``--split cv`` its cases fail with that line and the other folds' cases finish.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.evaluate.results import summarize
from utils.prepared import PreparedDataset
from utils.runs import fold_folder, fold_folders, model_path

log = logging.getLogger(__name__)


@dataclass
class Ensemble:
    """The models of a run's folds, predicting as one (:meth:`probabilities`) or one at a time (:meth:`member`).

    Attributes:
        folder: the run folder ``runs/<name>``.
        members: fold index -> the fold's predictor (anything with ``config`` and ``probabilities(image, options)``,
            e.g. :class:`utils.evaluate.pipeline.Predictor`).
        missing: fold index -> why that fold folder has no usable model (one line naming the folder).
    """

    folder: Path
    members: dict[int, object]
    missing: dict[int, str] = field(default_factory=dict)

    @property
    def config(self):
        """The first fold's config: labels, channels and classes are the same in every fold (checked on opening)."""
        return next(iter(self.members.values())).config

    @property
    def run_folder(self) -> Path:
        """The first fold's folder: a complete run, with the run's record of its training dataset."""
        return fold_folder(self.folder, next(iter(self.members)))

    def probabilities(self, image: np.ndarray, options) -> np.ndarray:
        """The mean of the folds' class probabilities ``(Z, Y, X, K)`` for a prepared image ``(Z, Y, X, C)``."""
        total = None
        for member in self.members.values():
            probabilities = member.probabilities(image, options)
            if total is None:
                total = np.array(probabilities, copy=True)
            else:
                total += probabilities
            del probabilities
        total /= len(self.members)
        return total

    def member(self, fold: int):
        """Fold ``fold``'s predictor.

        Raises:
            FileNotFoundError: the fold has no model, in one line naming its folder.
        """
        if fold in self.members:
            return self.members[fold]
        raise FileNotFoundError(
            self.missing.get(fold)
            or f"{fold_folder(self.folder, fold)}: not found; train it with train.py --fold {fold}"
        )


def open_models(
    run_dir: str | os.PathLike,
    open_member: Callable[[Path, Callable | None], object],
    predict: Callable | Mapping[int, Callable] | None = None,
):
    """A run's predictor: ``open_member(run_dir, predict)`` for a single run, an :class:`Ensemble` of
    ``open_member(fold folder, predict)`` for a run of folds.

    Args:
        run_dir: ``runs/<name>``.
        open_member: opens one run folder into a predictor (it raises ``FileNotFoundError`` for a missing model).
        predict: a ``batch -> probabilities`` function instead of the models (tests): one for every fold, or a
            mapping fold index -> function.

    Raises:
        FileNotFoundError: no fold has a model.
        ValueError: folds trained for other labels, channels or classes than the first, or a fold folder whose
            ``config.json`` names another fold.
    """
    folds = fold_folders(run_dir)
    if not folds:
        return open_member(Path(run_dir), predict)
    members, missing = {}, {}
    for index, folder in folds.items():
        try:
            model_path(folder)  # a fold folder without a model is reported, whatever opens the others
            members[index] = open_member(folder, predict.get(index) if isinstance(predict, Mapping) else predict)
        except FileNotFoundError as error:
            missing[index] = f"{folder}: {str(error).removeprefix(str(folder) + ': ')}"
    if not members:
        raise FileNotFoundError(f"{run_dir}: no fold folder holds a model ({'; '.join(missing.values())})")
    _check_members(members, folds)
    for message in missing.values():
        log.warning("%s; the ensemble averages folds %s", message, ", ".join(map(str, members)))
    return Ensemble(Path(run_dir), members, missing)


def _check_members(members: Mapping[int, object], folds: Mapping[int, Path]) -> None:
    first_index, first = next(iter(members.items()))
    for index, member in members.items():
        config = member.config
        if config.fold is not None and config.fold != index:
            raise ValueError(f"{folds[index] / 'config.json'}: trained as fold {config.fold}, found in fold_{index}")
        for key in ("labels", "num_channels", "num_classes"):
            if getattr(config, key) != getattr(first.config, key):
                raise ValueError(
                    f"{folds[index] / 'config.json'}: {key} {getattr(config, key)} differ from fold {first_index}'s "
                    f"{getattr(first.config, key)}; the folds of one run must be trained on one dataset"
                )


def cv_assignment(dataset: PreparedDataset, models) -> dict[str, int]:
    """``{case id: fold}`` for ``--split cv``: every case of a fold's ``val`` with that fold, in ``splits.json``
    order.

    Raises:
        ValueError: a single run (no folds), a dataset without folds, a run fold the dataset does not hold, or a case
            in the val of two folds, naming the folder or file.
    """
    where = dataset.path / "splits.json"
    if not isinstance(models, Ensemble):
        raise ValueError("--split cv needs a run of folds (runs/NAME/fold_I from train.py --fold I), not a single run")
    folds = dataset.folds
    if not folds:
        raise ValueError(f"{where}: holds no folds for --split cv; prepare with data_gen.py --folds K or --splits FILE")
    extra = sorted(i for i in [*models.members, *models.missing] if i >= len(folds))
    if extra:
        raise ValueError(
            f"{fold_folder(models.folder, extra[0])}: fold {extra[0]} is not in {where}, which holds folds 0 to "
            f"{len(folds) - 1}"
        )
    assignment: dict[str, int] = {}
    for index, fold in enumerate(folds):
        for case_id in fold["val"]:
            if case_id in assignment:
                raise ValueError(f"{where}: case {case_id} is in the val of folds {assignment[case_id]} and {index}")
            assignment[case_id] = index
    return assignment


def fold_view(models, dataset: PreparedDataset) -> PreparedDataset:
    """The dataset as one fold's run (``config.json`` ``fold``) sees it: ``train`` and ``val`` are its fold's."""
    fold = None if isinstance(models, Ensemble) else models.config.fold
    return dataset.with_fold(fold) if fold is not None and fold < len(dataset.folds) else dataset


def out_of_fold(models, dataset: PreparedDataset) -> list[tuple[str, object]]:
    """``(case id, predictor)`` of the validation cases: the run's ``val`` split (its own fold's for one fold's run),
    or for an ensemble on a dataset with folds every fold's ``val`` with its own fold's model (the folds without a
    model are skipped)."""
    if not isinstance(models, Ensemble) or not dataset.folds:
        return [(case_id, models) for case_id in fold_view(models, dataset).split("val")]
        return [(case_id, models) for case_id in dataset.split("val")]
    chosen = cv_assignment(dataset, models).items()
    return [(case_id, models.members[fold]) for case_id, fold in chosen if fold in models.members]


def fold_summaries(
    records: Sequence[dict], failures: Sequence[dict], assignment: Mapping[str, int], names: Mapping, metrics
) -> dict[str, dict]:
    """Each fold's summary of its own cases (:func:`utils.evaluate.results.summarize`), keyed by fold index, with
    the number of its cases that failed."""
    result = {}
    for fold in sorted(set(assignment.values())):
        own = [r for r in records if assignment.get(r["id"]) == fold]
        summary = summarize(own, names, metrics)
        summary.pop("empty_rule", None)
        summary["num_failed"] = sum(assignment.get(f["id"]) == fold for f in failures)
        result[str(fold)] = summary
    return result
