"""Which cases train, validate and test: a seeded patient-level split, K folds for cross-validation, or the user's
own split file.

``splits.json`` (docs/ARCHITECTURE.md) holds ``train``, ``val`` and ``test`` case ids. With folds it also holds
``folds``, a list of ``{"train": [...], "val": [...]}`` in nnU-Net's ``splits_final.json`` shape; its ``train`` and
``val`` are then fold 0's, so a run trained without ``--fold`` is fold 0's model, and ``test`` holds the cases no fold
uses (the test fraction of ``--split`` and the unlabelled cases). ``train.py --fold I`` trains on fold ``I``;
``evaluation.py --split cv`` scores every fold's ``val`` with that fold's model.

Folds are drawn over patients, never cases: the cases of one patient are always in the same fold, so no fold
validates on a patient it trained on. Patients are shuffled with the seed and dealt round-robin, so fold sizes differ
by at most one patient.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from utils import fileio
from utils.formats import CaseSpec

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test")


def _shuffled_patients(cases: Sequence[CaseSpec], seed: int) -> list[str]:
    patients = sorted({case.patient for case in cases if case.label})
    order = np.random.default_rng(seed).permutation(len(patients))
    return [patients[i] for i in order]


def make_splits(cases: Sequence[CaseSpec], fractions: Sequence[float], seed: int) -> dict:
    """Seeded patient-level split of labelled cases into train/val/test; unlabelled cases go to test.

    Args:
        cases: every case found (their ``id``, ``patient`` and ``label``).
        fractions: ``(train, val, test)``, summing to 1.
        seed: random seed.

    Raises:
        ValueError: fractions that are negative or do not sum to 1.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"--split needs three non-negative fractions summing to 1, got {fractions}")
    patients = _shuffled_patients(cases, seed)
    n = len(patients)
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    if fractions[1] > 0 and n_val == 0 and n >= 2:
        n_val = 1
    n_test = min(n_test, n - n_val)
    groups = {"val": set(patients[:n_val]), "test": set(patients[n_val : n_val + n_test])}
    splits = {"train": [], "val": [], "test": []}
    for case in cases:
        if not case.label:
            splits["test"].append(case.id)
        elif case.patient in groups["val"]:
            splits["val"].append(case.id)
        elif case.patient in groups["test"]:
            splits["test"].append(case.id)
        else:
            splits["train"].append(case.id)
    return splits


def make_folds(cases: Sequence[CaseSpec], folds: int, test_fraction: float, seed: int) -> dict:
    """Seeded patient-level K-fold cross-validation: ``splits.json`` with ``folds``.

    The test fraction's patients are drawn first (as :func:`make_splits` draws them); the other labelled patients are
    shuffled and dealt into ``folds`` groups; fold ``i`` validates on group ``i`` and trains on the others.

    Args:
        cases: every case found.
        folds: ``K``, at least 2 and at most the number of labelled patients outside the test fraction.
        test_fraction: the share of labelled patients held out of every fold (``--split``'s third number).
        seed: random seed.

    Raises:
        ValueError: ``K`` below 2 or above the number of patients available.
    """
    if folds < 2:
        raise ValueError(f"--folds needs at least 2 folds, got {folds}")
    held_out = make_splits(cases, (1.0 - test_fraction, 0.0, test_fraction), seed)["test"]
    outside = set(held_out)
    pool = [case for case in cases if case.label and case.id not in outside]
    patients = _shuffled_patients(pool, seed)
    if folds > len(patients):
        raise ValueError(f"--folds {folds}: only {len(patients)} labelled patient(s) to share among the folds")
    group = {patient: i % folds for i, patient in enumerate(patients)}
    result = [{"train": [], "val": []} for _ in range(folds)]
    for case in pool:
        for i, fold in enumerate(result):
            fold["val" if group[case.patient] == i else "train"].append(case.id)
    return {"train": list(result[0]["train"]), "val": list(result[0]["val"]), "test": held_out, "folds": result}


def read_splits_file(path: str | os.PathLike, cases: Sequence[CaseSpec]) -> dict:
    """The user's split file as ``splits.json``: this toolkit's ``{"train", "val", "test"[, "folds"]}`` or nnU-Net's
    ``splits_final.json`` (a list of ``{"train", "val"}``, one per fold).

    Unlabelled cases the file does not name go to ``test``; labelled cases it does not name are left out of every
    split (a warning counts them), as nnU-Net leaves out cases its folds do not list.

    Raises:
        FileNotFoundError: no such file.
        ValueError: in one line naming the file: not one of the two shapes, case ids the dataset does not have, a
            case both in train and val of one fold, or a case without a label in a train or val list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: splits file not found")
    data = fileio.read_json(path)
    if isinstance(data, list):
        splits = {"folds": data}
    elif isinstance(data, dict) and set(data) >= {"train", "val"}:
        splits = dict(data)
    else:
        raise ValueError(
            f"{path}: expected a splits.json object with 'train' and 'val' lists, or nnU-Net's splits_final.json "
            "(a list of folds, each with 'train' and 'val')"
        )
    groups = _check_shape(splits, path)
    known = {case.id: case for case in cases}
    named = [case_id for group in groups for case_id in group]
    unknown = sorted(set(named) - set(known))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        example = next(iter(known), "none")
        raise ValueError(
            f"{path}: names {len(unknown)} case(s) the dataset does not have: {shown} (its case ids look like "
            f"{example!r})"
        )
    folds = splits.get("folds") or [{"train": splits["train"], "val": splits["val"]}]
    for i, fold in enumerate(folds):
        both = sorted(set(fold["train"]) & set(fold["val"]))
        where = f"fold {i}" if splits.get("folds") else "the split"
        if both:
            raise ValueError(f"{path}: {where} has {len(both)} case(s) in both train and val, e.g. {both[0]}")
        unlabelled = sorted(c for c in [*fold["train"], *fold["val"]] if not known[c].label)
        if unlabelled:
            raise ValueError(f"{path}: {where} trains or validates on {unlabelled[0]}, which has no label")
    result = {key: list(splits.get(key) or []) for key in SPLIT_NAMES}
    if splits.get("folds"):
        result["folds"] = [{"train": list(f["train"]), "val": list(f["val"])} for f in splits["folds"]]
        if "train" not in splits:
            result["train"], result["val"] = list(folds[0]["train"]), list(folds[0]["val"])
    used = set(named) | set(result["train"]) | set(result["val"])
    result["test"] += [case.id for case in cases if not case.label and case.id not in used]
    unused = [case.id for case in cases if case.label and case.id not in used]
    if unused:
        log.warning("%s: %d labelled case(s) are in no split and are left out, e.g. %s", path, len(unused), unused[0])
    return result


def _check_shape(splits: dict, path: Path) -> list[list[str]]:
    """Every list of case ids in ``splits`` (raises ``ValueError`` naming ``path`` when one is not a list of
    strings)."""
    groups = [(key, splits.get(key)) for key in SPLIT_NAMES if key in splits]
    folds = splits.get("folds")
    if folds is not None:
        if not isinstance(folds, list) or not folds:
            raise ValueError(f"{path}: 'folds' must be a non-empty list of {{'train': [...], 'val': [...]}}")
        for i, fold in enumerate(folds):
            if not isinstance(fold, dict) or not {"train", "val"} <= set(fold):
                raise ValueError(f"{path}: fold {i} must be an object with 'train' and 'val' lists of case ids")
            groups += [(f"fold {i} {key}", fold[key]) for key in ("train", "val")]
    for name, group in groups:
        if not isinstance(group, list) or not all(isinstance(c, str) for c in group):
            raise ValueError(f"{path}: {name} must be a list of case ids (strings), got {str(group)[:60]}")
    return [group for _, group in groups]


def keep_prepared(splits: dict, prepared: set[str]) -> dict:
    """``splits`` without the cases that were not prepared (they failed): a case that becomes unreadable never moves
    the others between splits or folds."""
    kept = {key: [c for c in splits[key] if c in prepared] for key in SPLIT_NAMES}
    if "folds" in splits:
        kept["folds"] = [
            {key: [c for c in fold[key] if c in prepared] for key in ("train", "val")} for fold in splits["folds"]
        ]
    return kept
