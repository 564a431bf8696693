"""Evaluation: predict cases, put the masks back in the source geometry, score them, summarise, draw and report.

Two entries share everything below them:

- :func:`evaluate` takes a split of a prepared dataset (``data/<name>/``): the prepared volumes are predicted and
  each case's source files give the truth and the image for the pictures.
- :func:`utils.evaluate.predict.predict_images` takes raw images of any supported format and prepares them first.

Per case (:func:`segment`): whole-volume inference (:func:`utils.inference.predict_labels`), probabilities resampled
to the source resolution and arg-maxed one finished slab of planes at a time (:class:`utils.inference.LabelSlabs`),
every other preprocessing step inverted (:func:`utils.preprocessing.restore_label`), then post-processing
(:mod:`utils.evaluate.postprocess`). The mask is written as ``masks/<id>.nii.gz`` on the source grid plus the
format's own copy
(:func:`utils.formats.write_mask`); a labelled case is scored on the source grid with every metric of
:mod:`utils.metrics`, per class and per region, in the label values of the source files. Each case leaves
``cases/<id>.json``, so an interrupted evaluation resumes and a case that fails does not lose the others.
At the end: ``metrics.csv``, ``summary.json``, ``dice_boxplot.png``, ``overlays/<id>.png`` and ``.gif``, and
``report.html``.

Empty classes: when a class is absent from both the truth and the prediction its dice is NaN; such values are left
out of means and counted in ``summary.json`` as ``n_empty``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils import console, fileio
from utils.bundle import open_run
from utils.evaluate.ensemble import Ensemble, cv_assignment, fold_summaries, fold_view, open_models, out_of_fold
from utils.evaluate.options import Options
from utils.evaluate.postprocess import apply_plan, decide_lcc, make_plan, parse_min_size
from utils.evaluate.probabilities import ProbabilityWriter
from utils.evaluate.results import write_results
from utils.evaluate.sources import missing_note, read_source
from utils.formats import source_values, write_mask
from utils.geometry import GeometryRecord
from utils.inference import predict_labels, predict_volume, probabilities_to_labels, whole_slice_network
from utils.metrics import compute_case_metrics
from utils.plots import DisplayVolume, plot_overlay, write_overlay_gif
from utils.prepared import PreparedDataset
from utils.preprocessing import PreprocessSettings, count_values, prepare_case, restore_label
from utils.runs import TrainingConfig, fold_folders, model_path
from utils.settings import WHOLE_SLICE_MODELS

log = logging.getLogger(__name__)
POSTPROCESSING_FILE = "postprocessing.json"


def check_compatible(config: TrainingConfig, dataset: PreparedDataset) -> None:
    """Refuse a dataset whose labels or channels differ from the run's training data.

    Raises:
        ValueError: naming both.
    """
    if config.labels != dataset.labels:
        raise ValueError(
            f"{dataset.path}: labels {dataset.labels} differ from those the run was trained on {config.labels}"
        )
    if config.num_channels != dataset.num_channels:
        raise ValueError(
            f"{dataset.path}: {dataset.num_channels} channel(s), but the run was trained on {config.num_channels}"
        )


def label_values(manifest: dict) -> np.ndarray:
    """Map from the prepared label index to the label value in the source files."""
    values = manifest.get("label_values")
    return np.asarray(values if values is not None else sorted(int(k) for k in manifest["labels"]))


def class_names(labels: Mapping[str, str], values: Sequence[int]) -> dict[str, str]:
    """``{str(label value): name}`` for the foreground classes, as keys of metrics and summaries."""
    return {str(int(v)): labels[str(k)] for k, v in enumerate(values) if k > 0}


@dataclass
class Predictor:
    """What :func:`segment` needs from a run: the model (or a ``batch -> probabilities`` function) and its config.

    A network trained on patches of its receptive field (:data:`utils.settings.WHOLE_SLICE_MODELS`) predicts whole
    slices, fully convolutionally: :meth:`whole_slice_model` rebuilds it for any slice size with the trained weights
    (a bundle's exported networks are that rebuilt network, so ``predict`` too sees whole slices).
    """

    model: object
    config: TrainingConfig
    predict: Callable[[np.ndarray], np.ndarray] | None = None
    _whole_slices: object = field(default=None, init=False, repr=False)

    def probabilities(self, image: np.ndarray, options: Options) -> np.ndarray:
        """Probabilities ``(Z, Y, X, K)`` of a prepared image (:func:`utils.inference.predict_volume`)."""
        model, patch, settings = self._inference(image, options)
        return predict_volume(model, image, patch, self.config.num_classes, **settings)

    def labels(self, image: np.ndarray, options: Options, shape) -> np.ndarray:
        """Arg-max labels of ``shape`` (the probabilities resampled linearly onto it) without ever holding the
        probabilities whole (:func:`utils.inference.predict_labels`)."""
        model, patch, settings = self._inference(image, options)
        return predict_labels(model, image, patch, self.config.num_classes, shape, **settings)

    def _inference(self, image: np.ndarray, options: Options) -> tuple[object, list[int], dict]:
        model, patch = self.model, self.config.patch_size
        if self.config.model in WHOLE_SLICE_MODELS:
            model, patch = (self.whole_slice_model() if self.predict is None else None), list(image.shape[1:3])
        settings = {
            "overlap": options.overlap,
            "blend": options.blend,
            "batch_size": options.batch_size or self.config.batch_size or 2,
            "tta": options.tta,
            "progress": options.progress,
            "predict": self.predict,
        }
        return model, patch, settings

    def whole_slice_model(self):
        """The run's network built for ``(None, None, C)`` slices with same padding (its valid convolutions padded by
        half the receptive field, with zeros) and the trained weights: output ``(B, H, W, K)`` for any slice."""
        if self._whole_slices is None:
            config = self.config
            self._whole_slices = whole_slice_network(
                self.model, config.model, config.model_args, config.num_channels, config.num_classes
            )
        return self._whole_slices


def segment(
    predictor: Predictor,
    image: np.ndarray,
    record: GeometryRecord,
    options: Options,
    plan: dict | None,
    keep: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Classes ``(Z, Y, X)`` uint8 on the source grid for a prepared image and its geometry record.

    The probabilities are resampled to the cropped source resolution and arg-maxed one slab of planes at a time;
    cropping and reorientation are undone by :func:`utils.preprocessing.restore_label`; ``plan`` is applied last.
    A single model's probabilities are never held whole (:meth:`Predictor.labels`): they are arg-maxed as the
    sliding window finishes them. ``predictor`` may be an :class:`utils.evaluate.ensemble.Ensemble`, which averages
    whole volumes; ``keep`` receives the probabilities ``(Z, Y, X, K)`` on the prepared grid
    (``--save-probabilities``: :class:`utils.evaluate.probabilities.ProbabilityWriter`), which are then held whole.
    """
    if keep is None and isinstance(predictor, Predictor):
        labels = predictor.labels(image, options, record.cropped_shape)
    else:
        probabilities = predictor.probabilities(image, options)
        if keep is not None:
            keep(probabilities)
        labels = probabilities_to_labels(probabilities, record.cropped_shape)
        del probabilities
    classes = restore_label(labels, record)
    return apply_plan(classes, plan, record.source_spacing)


def score(
    prediction: np.ndarray, truth: np.ndarray, values: Sequence[int], spacing: Sequence[float], options: Options
) -> dict[str, dict[str, float]]:
    """Metrics per foreground label value and per region, keys as strings (the keys of ``metrics.csv``)."""
    results = compute_case_metrics(
        prediction,
        truth,
        [int(v) for v in values[1:]],
        spacing,
        metrics=options.metrics,
        nsd_tolerance=options.nsd_tolerance,
        regions=options.regions or None,
    )
    return {str(k): v for k, v in results.items()}


def predicted_volumes(classes: np.ndarray, values: Sequence[int], spacing: Sequence[float]) -> dict[str, float]:
    """Predicted volume in ml of each foreground class, keyed by label value."""
    counts = count_values(classes, len(values))  # in blocks: no 8-byte copy of the whole map
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {str(int(v)): round(float(counts[k]) * voxel_ml, 4) for k, v in enumerate(values) if k > 0}


def draw_case(
    output: Path,
    case_id: str,
    image: np.ndarray,
    truth: np.ndarray | None,
    prediction: np.ndarray,
    affine: np.ndarray,
    names: Mapping[int, str],
    options: Options,
    title: str,
) -> dict:
    """``overlays/<id>.png`` (and ``.gif`` with ``pictures='all'``); returns their paths relative to ``output``."""
    if options.pictures == "none":
        return {}
    volume = DisplayVolume.from_source(image, truth, prediction, affine)
    written = {"overlay": f"overlays/{case_id}.png"}
    plot_overlay(volume, output / written["overlay"], names, title)
    if options.pictures == "all":
        written["gif"] = f"overlays/{case_id}.gif"
        write_overlay_gif(volume, output / written["gif"])
    return written


def describe(record: dict, names: Mapping[str, str]) -> str:
    """Title of a case's pictures: the id and the dice of each class."""
    metrics = record.get("metrics") or {}
    parts = [f"{names.get(k, k)} {v['dice']:.3f}" for k, v in metrics.items() if "dice" in v and np.isfinite(v["dice"])]
    return f"{record['id']}" + (f"  dice: {', '.join(parts)}" if parts else "")


def run_cases(
    case_ids: Sequence[str],
    process: Callable[[str], dict],
    output: Path,
    settings_key: dict,
    progress: bool = True,
    inputs: Callable[[str], str] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Process every case (or take its cached ``cases/<id>.json`` when the settings, the case's input files
    (``inputs(case_id)``, e.g. :func:`file_stamps`) and its written files are unchanged).

    A case that raises is logged and listed in the failures (its message names the file); the others go on. A record
    is kept exactly as ``cases/<id>.json`` reads back, so a rerun that takes some cases from there writes the same
    bytes as an uninterrupted run.

    Returns:
        ``(records, failures)``; a failure is ``{"id", "error"}``.

    Raises:
        fileio.OutputError: the results folder cannot be written (disk full, permissions): no later case could be.
    """
    records, failures = [], []
    for case_id in tqdm(case_ids, desc="cases", unit="case", dynamic_ncols=True, disable=not progress):
        fileio.check_case_id(case_id)
        cache = output / "cases" / f"{case_id}.json"
        if cache.is_file():
            try:
                cached = fileio.read_json(cache)
            except ValueError:
                cached = {}
            files = [*cached.get("masks", []), *cached.get("probabilities", [])]
            files += [cached[k] for k in ("overlay", "gif") if cached.get(k)]
            stamps = fileio.as_json(inputs(case_id)) if inputs is not None else None
            if (
                cached.get("settings") == fileio.as_json(settings_key)
                and cached.get("inputs") == stamps
                and all((output / f).is_file() for f in files)
            ):
                records.append(cached)
                continue
        try:
            record = {**process(case_id), "settings": settings_key}
            if inputs is not None:
                record["inputs"] = inputs(case_id)
            record = fileio.as_json(record)
        except fileio.OutputError:
            raise
        except Exception as error:  # readers, inference and writers raise many types; one case never stops the rest
            log.error("case %s failed: %s", case_id, error)
            failures.append({"id": case_id, "error": f"{type(error).__name__}: {error}"})
            continue
        fileio.write_json(cache, record)
        records.append(record)
    return records, failures


def resolve_plan(
    options: Options,
    num_classes: int,
    run_dir: str | os.PathLike | None,
    validation: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, Sequence[float]]]] | None,
    key: dict,
) -> dict:
    """The post-processing plan: from the flags, or for ``auto`` the decision stored in the run folder's
    ``postprocessing.json`` for the same ``key`` (model file, validation data, inference settings), or else a new
    one from ``validation()`` (``(prediction, truth, spacing)`` per validation case), which is then added there.

    Raises:
        ValueError: ``auto`` without a stored decision and without validation cases.
    """
    min_size = parse_min_size(options.min_size)
    if options.postprocess != "auto":
        return make_plan(options.postprocess, num_classes, min_size, options.connectivity)
    stored = Path(run_dir) / POSTPROCESSING_FILE if run_dir else None
    decisions = []
    if stored is not None and stored.is_file():
        try:
            decisions = list(fileio.read_json(stored).get("decisions", []))
        except (ValueError, AttributeError):
            decisions = []
        for decision in decisions:
            if decision.get("key") == key:
                return decision["plan"]
    if validation is None:
        raise ValueError(
            f"--postprocess auto needs a decision in {stored} or the training dataset's validation split to make one"
        )
    plan = decide_lcc(validation(), num_classes, min_size, options.connectivity)
    if plan["num_cases"] == 0:
        raise ValueError("--postprocess auto: the validation split has no labelled case to decide on")
    log.info(
        "post-processing decided on %d validation cases: lcc for classes %s", plan["num_cases"], plan["lcc_classes"]
    )
    if stored is not None:
        try:
            fileio.write_json(stored, {"decisions": [*decisions, {"key": key, "plan": plan}]})
        except OSError as error:
            log.warning("could not store the post-processing decision in %s: %s", stored, error)
    return plan


def file_stamps(paths: Iterable[str | os.PathLike | None]) -> str:
    """A digest of the path, size and modification time of each file (a missing file counts as such): a changed,
    replaced or repaired file changes it, so results computed from the old file are not reused."""
    stamps = []
    for path in paths:
        if path:
            try:
                stat = os.stat(path)
                stamps.append([str(path), stat.st_size, int(stat.st_mtime_ns)])
            except OSError:
                stamps.append([str(path), None])
    return hashlib.sha1(json.dumps(stamps).encode()).hexdigest()


def model_stamp(run_dir: str | os.PathLike) -> list | dict | None:
    """``[name, size, modification time in ns]`` of the run's model file, ``None`` without one; for a run of folds,
    ``{fold: stamp}``."""
    folds = fold_folders(run_dir)
    if folds:
        return {str(index): model_stamp(folder) for index, folder in folds.items()}
    try:
        path = model_path(run_dir)
    except FileNotFoundError:
        return None
    return [path.name, path.stat().st_size, int(path.stat().st_mtime_ns)]


def plan_key(options: Options, run_dir: str | os.PathLike, data: str | os.PathLike) -> dict:
    """What a stored ``auto`` decision depends on: the model file, validation data and the inference settings."""
    return {
        "model": model_stamp(run_dir),
        "data": str(Path(data).resolve()),
        "overlap": options.overlap,
        "blend": options.blend,
        "tta": options.tta,
        "min_size": options.min_size,
        "connectivity": options.connectivity,
    }


def validation_cases(predictor: Predictor, dataset: PreparedDataset, options: Options) -> Callable:
    """A generator factory over the validation split: ``(raw prediction, truth, spacing)`` on the source grid; for a
    run of folds, every fold's val predicted by its own fold (:func:`utils.evaluate.ensemble.out_of_fold`)."""

    def cases():
        for case_id, model in out_of_fold(predictor, dataset):
            spec = dataset.spec(case_id)
            if not spec.label:
                continue
            source, _ = read_source(dataset, case_id)
            image, geometry = prepared_without_label(dataset, case_id, source)
            prediction = segment(model, image, geometry, options, None)
            yield prediction, source.label, dataset.geometry(case_id).source_spacing

    return cases


def training_dataset(path: str | os.PathLike | None, fallback: PreparedDataset | None = None) -> PreparedDataset | None:
    """The run's training dataset (at ``path``, the run config's ``data``) if it is still there, else ``fallback``."""
    if fallback is not None and path and Path(path).resolve() == fallback.path.resolve():
        return fallback
    if path and Path(path, "manifest.json").is_file():
        return PreparedDataset(path)
    return fallback


def prepared_without_label(dataset: PreparedDataset, case_id: str, source) -> tuple[np.ndarray, GeometryRecord]:
    """The prepared image and geometry record of a case, as a model may see it: the stored volume, except under
    ``--crop foreground``, whose crop box came from the case's own label; such a case is prepared again from its
    source image without the label (no crop), so that its score does not depend on knowing the truth."""
    case = dataset.cases[case_id]
    settings = dataset.manifest.get("preprocessing", {})
    if settings.get("crop") != "foreground" or not case.get("label"):
        return dataset.image(case_id), dataset.geometry(case_id)
    channels = dataset.manifest["channels"]
    image, _, geometry = prepare_case(
        replace(source, label=None),
        PreprocessSettings(**settings),
        dataset.fingerprint or None,
        [channels[k] for k in sorted(channels, key=int)],
    )
    return image, geometry


@console.logged_to("evaluation.log")
def evaluate(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    split: str = "test",
    options: Options | None = None,
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
    source_root: str | os.PathLike | None = None,
) -> dict:
    """Evaluate a trained run on a split of a prepared dataset; returns the summary (also in ``summary.json``).

    Args:
        run_dir: ``runs/<name>`` or a bundle (:mod:`utils.bundle`).
        data: the prepared dataset ``data/<name>`` (labels and channels must match the run's).
        output: ``results/<name>``.
        split: ``train``, ``val``, ``test`` or ``all``; ``cv`` for a run of folds: every fold's val cases predicted by
            their own fold's model, with each fold's summary in ``summary.json`` (:mod:`utils.evaluate.ensemble`).
        options: the inference, scoring and picture settings (:class:`Options`; its defaults when ``None``).
        predict: optional ``batch -> probabilities`` used instead of the run's model (tests); for a run of folds one
            for all or a mapping fold index -> function.
        source_root: where the dataset's raw files are now (``--source-root``); cases whose raw files are missing
            are scored against the prepared labels (:mod:`utils.evaluate.sources`).

    Raises:
        FileNotFoundError, ValueError: a missing or incompatible run or dataset, or an empty split.
    """
    if source_root is not None and not Path(source_root).is_dir():
        raise FileNotFoundError(f"{source_root}: --source-root folder not found")
    options = options or Options()
    predictor = open_predictor(run_dir, options, predict)
    config = predictor.config
    dataset = fold_view(predictor, PreparedDataset(data, source_root))  # one fold's run: its fold's train and val
    check_compatible(config, dataset)
    assignment = cv_assignment(dataset, predictor) if split == "cv" else None
    case_ids = list(assignment) if assignment is not None else dataset.split(split)
    if not case_ids:
        raise ValueError(f"{dataset.path / 'splits.json'}: split {split!r} is empty")
    note = missing_note(dataset, case_ids)
    if note:
        log.warning(note)
    output = open_output(output)
    values = label_values(dataset.manifest)
    names = class_names(dataset.labels, values)
    decide_on = training_dataset(config.data, dataset) or dataset
    plan = resolve_plan(
        options,
        dataset.num_classes,
        run_dir,
        validation_cases(predictor, decide_on, options),
        plan_key(options, run_dir, decide_on.path),
    )
    settings_key = {
        "run": str(Path(run_dir).resolve()),
        "model_file": model_stamp(run_dir),
        "data": str(dataset.path.resolve()),
        **options.key(),
        "plan": plan,
    }
    if assignment is not None:  # each case by its own fold, not by the ensemble: not the same result
        settings_key["cross_validation"] = True

    def inputs(case_id: str) -> str:
        case = dataset.cases[case_id]
        prepared = [dataset.path / case[k] for k in ("image", "label") if case.get(k)]
        spec = dataset.spec(case_id)
        return file_stamps([*prepared, *spec.image, spec.label])

    def process(case_id: str) -> dict:
        spec = dataset.spec(case_id)
        source, rebuilt = read_source(dataset, case_id)
        image, geometry = prepared_without_label(dataset, case_id, source)
        display = source.image if options.pictures != "none" else None
        source.image = None  # the source image serves only the pictures: not held through inference without them
        model = predictor.member(assignment[case_id]) if assignment is not None else predictor
        keep = ProbabilityWriter(output, case_id, geometry, source.writer) if options.save_probabilities else None
        classes = segment(model, image, geometry, options, plan, keep)
        truth = source.label if spec.label else None
        entry = {"id": case_id, "geometry": dataset.geometry(case_id), "writer": source.writer}
        record = finish_case(output, entry, classes, truth, display, source.affine, values, names, options)
        record = {**record, "probabilities": keep.written} if keep is not None else record
        return {**record, "truth": "prepared"} if rebuilt else record

    records, failures = run_cases(case_ids, process, output, settings_key, options.progress, inputs)
    settings = {**settings_key, "split": split, "model": config.model, "patch_size": config.patch_size}
    plan = {**plan, "lcc_class_names": [dataset.labels[str(k)] for k in plan["lcc_classes"]]}
    title = f"{config.model} on {split}"
    if isinstance(predictor, Ensemble):
        settings["folds"] = sorted(predictor.members)
        title += f" (folds {', '.join(map(str, predictor.members))})"
    extra = {"folds": fold_summaries(records, failures, assignment, names, options.metrics)} if assignment else None
    return write_results(output, records, failures, names, options, settings, plan, title, extra)


def open_predictor(
    run_dir: str | os.PathLike, options: Options, predict: Callable | Mapping[int, Callable] | None = None
) -> Predictor | Ensemble:
    """The run's model, or the :class:`~utils.evaluate.ensemble.Ensemble` of a run of folds (``runs/NAME/fold_I``).

    Raises:
        FileNotFoundError, ValueError: a missing or unreadable run, or folds that do not fit together.
    """

    def member(folder: Path, fold_predict: Callable | None) -> Predictor:
        config, model, fold_predict = open_run(folder, options.engine, fold_predict)
        return Predictor(model, config, fold_predict)

    return open_models(run_dir, member, predict)


def open_output(output: str | os.PathLike) -> Path:
    """Create the results folder, prove it writable and delete the temporary files a killed run left there.

    Raises:
        fileio.OutputError: the folder cannot be created or written.
    """
    folder = fileio.check_writable(output)
    removed = fileio.remove_stale_temporaries(folder)
    if removed:
        log.info("%s: removed %d temporary file(s) of an interrupted run", folder, removed)
    return Path(output)


def finish_case(
    output: Path,
    case: dict,
    classes: np.ndarray,
    truth: np.ndarray | None,
    image: np.ndarray | None,
    affine: np.ndarray,
    values: Sequence[int],
    names: Mapping[str, str],
    options: Options,
) -> dict:
    """Write, score and draw one predicted case; returns its record (``cases/<id>.json``).

    Args:
        case: ``{"id", "geometry", "writer"}`` as in the manifest, the geometry as a
            :class:`~utils.geometry.GeometryRecord`.
        classes, truth: class maps on the source grid (truth ``None`` when unlabelled), classes of the run.
        image, affine: the source image ``(Z, Y, X, C)`` (``None`` without pictures) and its affine, for the pictures.
        values: label value of each class (``label_values``).
    """
    spacing = case["geometry"].source_spacing
    mask = source_values(classes, list(int(v) for v in values))
    written = write_mask(mask, case, output)
    record = {
        "id": case["id"],
        "masks": [str(Path(p).relative_to(output)) for p in written],
        "metrics": None,
        "predicted_ml": predicted_volumes(classes, values, spacing),
    }
    if truth is not None:
        truth_values = source_values(truth, list(int(v) for v in values))
        record["metrics"] = score(mask, truth_values, values, spacing, options)
    title = describe(record, names)
    by_class = {k: names[str(int(v))] for k, v in enumerate(values) if k > 0}
    record.update(draw_case(output, case["id"], image, truth, classes, affine, by_class, options, title))
    return record
