"""``evaluation.py --run runs/NAME --export bundles/NAME``: a trained run as a self-contained bundle.

The bundle's layout and how it is read are in :mod:`utils.bundle`. Export gathers what prediction needs and the run
alone may lack: the preprocessing record, labels and channels come from the run's training dataset (as
``evaluation.py --input`` takes them, :class:`utils.evaluate.predict.TrainingPreparation`); the training time and
best validation dice from the run's ``state.json`` and ``config.json``; the test scores from an evaluation's
``summary.json`` (``--results``), when given. Before ``bundle.json`` is written, the ONNX network is run on one
random batch beside the Keras network and their largest difference is recorded (``checks``); more than
:data:`MAX_ENGINE_DIFFERENCE` stops the export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from utils import console, fileio
from utils.bundle import (
    BUNDLE_FILE,
    FILES,
    BundleRecord,
    copy_file,
    export_onnx,
    export_saved_model,
    inference_network,
    is_bundle,
)
from utils.evaluate.options import Options
from utils.evaluate.predict import TrainingPreparation
from utils.geometry import TARGET_AXCODES
from utils.inference import onnx_predictor
from utils.runs import DATASET_RECORD, TrainingConfig, fold_folders, load_run, model_path
from utils.settings import WHOLE_SLICE_MODELS

log = logging.getLogger(__name__)
MAX_ENGINE_DIFFERENCE = 1e-4
RUN_EXTRAS = ("history.csv", "curves.png")


@console.logged_to("export.log")
def export_bundle(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    data: str | os.PathLike | None = None,
    options: Options | None = None,
    results: str | os.PathLike | None = None,
) -> BundleRecord:
    """Write ``output`` (``bundles/<name>``) from the run ``run_dir``; returns what ``bundle.json`` holds.

    Args:
        run_dir: ``runs/<name>`` (its best model, ``config.json`` and ``state.json``).
        output: the bundle folder; a previous bundle there is replaced file by file.
        data: the run's training dataset, when it is no longer where the run's ``config.json`` says.
        options: the inference settings recorded as the bundle's (overlap, blend, batch size, mirroring).
        results: an evaluation's results folder of this run, whose ``summary.json`` gives the model card's test
            scores.

    Raises:
        FileNotFoundError: a missing run, training dataset or results summary.
        ValueError: ``run_dir`` is itself a bundle, an unreadable run, or an export whose engines disagree.
    """
    options = options or Options()
    if is_bundle(run_dir):
        raise ValueError(f"{run_dir}: is a bundle already; export from the run folder it came from")
    folds = fold_folders(run_dir)
    if folds:
        raise ValueError(
            f"{run_dir}: a run of {len(folds)} folds; a bundle holds one network: export one fold "
            f"(--run {next(iter(folds.values()))})"
        )
    summary = _read_summary(results)
    config, network = load_run(run_dir)
    training = TrainingPreparation.of_run(config, data, run_dir)
    output = fileio.check_writable(output)
    _remove_interrupted(output)
    (output / BUNDLE_FILE).unlink(missing_ok=True)  # until the new one is complete, the folder is no bundle
    log.info("exporting %s (%s) to %s", run_dir, config.model, output)
    files = dict(FILES)
    copy_file(model_path(run_dir), output / FILES["keras"])
    copy_file(Path(run_dir) / "config.json", output / FILES["config"])
    builder = config.model_source
    if builder and builder.endswith(".py") and Path(builder).is_file():
        files["builder"] = f"builder/{Path(builder).name}"
        copy_file(Path(builder), output / files["builder"])
    for name in RUN_EXTRAS:
        if (Path(run_dir) / name).is_file():
            files[name.split(".")[0]] = name
            copy_file(Path(run_dir) / name, output / name)
    files["dataset"] = _write_dataset_record(training, output / DATASET_RECORD)
    network = inference_network(network, config)
    started = time.perf_counter()
    export_saved_model(network, output / FILES["saved_model"])
    export_onnx(network, output / FILES["onnx"])
    log.info("SavedModel and ONNX written in %.1f s", time.perf_counter() - started)
    record = BundleRecord(
        name=output.resolve().name,
        model=config.model,
        model_args=config.model_args,
        patch_size=list(config.patch_size or []),
        whole_slices=config.model in WHOLE_SLICE_MODELS,
        input_shape=list(network.inputs[0].shape),
        num_classes=config.num_classes,
        num_channels=config.num_channels,
        labels=training.manifest["labels"],
        label_values=[int(v) for v in training.manifest.get("label_values") or sorted(map(int, config.labels))],
        channels=training.manifest["channels"],
        orientation=list(TARGET_AXCODES),
        preprocessing=training.manifest["preprocessing"],
        resolved=training.manifest.get("resolved", {}),
        fingerprint=training.fingerprint,
        inference=_inference_settings(options, config),
        files=files,
        source=_source(run_dir, config, training),
        checks={"onnx_max_difference": _engine_difference(network, output / FILES["onnx"], config)},
    )
    fileio.write_text(output / FILES["card"], model_card(record, config, _state(run_dir), training, summary))
    fileio.write_json(output / BUNDLE_FILE, record.to_json())
    return record


def _write_dataset_record(training: TrainingPreparation, folder: Path) -> str:
    """The run's record of its training dataset (:func:`utils.runs.write_dataset_record`) in the bundle, made from
    the dataset itself for runs trained before they kept one: ``manifest.json`` without per-case entries,
    ``fingerprint.json`` and ``splits.json``. Prediction from the bundle reads it as it reads a run's."""
    manifest = {**training.manifest, "cases": []}
    manifest.setdefault("num_cases", len(training.manifest.get("cases", [])))
    with fileio.atomic_group():
        fileio.write_json(folder / "manifest.json", manifest)
        if training.fingerprint:
            fileio.write_json(folder / "fingerprint.json", training.fingerprint)
        if (training.path / "splits.json").is_file():
            copy_file(training.path / "splits.json", folder / "splits.json")
    return folder.name


def _read_summary(results: str | os.PathLike | None) -> dict | None:
    if results is None:
        return None
    path = Path(results) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; --results names a folder written by evaluation.py --output")
    return fileio.read_json(path)


def _remove_interrupted(output: Path) -> None:
    """Delete what an interrupted export left: temporary files and half-written SavedModel folders."""
    fileio.remove_stale_temporaries(output)
    for path in output.glob(f".{FILES['saved_model']}.*"):
        shutil.rmtree(path, ignore_errors=True)


def _state(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "state.json"
    try:
        return fileio.read_json(path) if path.is_file() else {}
    except ValueError:
        return {}


def _inference_settings(options: Options, config: TrainingConfig) -> dict:
    return {
        "overlap": options.overlap,
        "blend": options.blend,
        "batch_size": options.batch_size or config.batch_size or 2,
        "tta": options.tta,
        "whole_slices": config.model in WHOLE_SLICE_MODELS,
    }


def _source(run_dir: str | os.PathLike, config: TrainingConfig, training: TrainingPreparation) -> dict:
    return {
        "run": str(Path(run_dir).resolve()),
        "training_data": str(training.path.resolve()),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "toolkit": f"{console.DISTRIBUTION} {console.version()}",
        "backend": config.backend,
        "versions": config.versions,
    }


def _engine_difference(network, onnx_path: Path, config: TrainingConfig) -> float:
    """The largest difference between the Keras network's and the ONNX file's probabilities on one random batch.

    Raises:
        ValueError: above :data:`MAX_ENGINE_DIFFERENCE`.
    """
    window = [int(n) if n is not None else 32 for n in network.inputs[0].shape[1:-1]]
    batch = np.random.default_rng(0).normal(size=(2, *window, config.num_channels)).astype(np.float32)
    expected = np.asarray(network.predict_on_batch(batch), dtype=np.float32)
    difference = float(np.max(np.abs(onnx_predictor(onnx_path)(batch) - expected)))
    if not difference <= MAX_ENGINE_DIFFERENCE:
        raise ValueError(
            f"{onnx_path}: its probabilities differ from the Keras model's by {difference:.2e} on a random batch "
            f"(at most {MAX_ENGINE_DIFFERENCE:g} allowed); the ONNX conversion of {config.model} is not faithful"
        )
    log.info("ONNX and Keras agree on a random batch: largest difference %.2e", difference)
    return difference


def model_card(
    record: BundleRecord, config: TrainingConfig, state: dict, training: TrainingPreparation, summary: dict | None
) -> str:
    """``MODEL_CARD.md``: data, channels, spacing, training settings and time, scores, intended use and limits."""
    manifest = training.manifest
    names = [record.labels[k] for k in sorted(record.labels, key=int)]
    foreground = ", ".join(names[1:]) or "foreground"
    lines = [
        f"# Model card: {record.name}",
        "",
        f"A `{record.model}` network that segments {foreground} in {_channels_text(record)} volumes, trained with "
        f"{record.source['toolkit']} on the {config.backend or 'unknown'} backend and exported "
        f"{record.source['exported']}.",
        "",
        "## Intended use",
        "",
        f"Research and development: segmenting {foreground} in images like the training data (same modality and "
        "channels, similar spacing, field of view and anatomy), prepared exactly as `bundle.json` records. Predict "
        "with `evaluation.py --run <this folder> --input DIR [--engine keras|onnx]`, which prepares each image, "
        "predicts and writes the mask on the image's own grid. Not a medical device: its masks are not for "
        "diagnosis or treatment without review by a qualified person.",
        "",
        "## Data",
        "",
        *_data_lines(record, manifest, training.path),
        "",
        "## Training",
        "",
        *_training_lines(config, state),
        "",
        "## Scores",
        "",
        *score_lines(config, state, summary),
        "",
        "## Inputs and outputs",
        "",
        f"- Input `{record.files.get('saved_model')}/` (signature `serving_default`) and `{record.files['onnx']}`: "
        f"`image`, float32 `{_shape_text(record.input_shape)}` = (batch, {_axes_text(record)}, channels), a "
        "*prepared* image (reoriented, cropped, resampled and normalised as above).",
        f"- Output: class probabilities `{_shape_text([*record.input_shape[:-1], record.num_classes])}`, classes in "
        f"the order {', '.join(f'{i} {n}' for i, n in enumerate(names))}.",
        f"- Whole volumes: sliding window of {_window_text(record)}, overlap {record.inference['overlap']}, "
        f"{record.inference['blend']} blending, mirroring {record.inference['tta'] or 'off'}; the probabilities are "
        "resampled to the source resolution, arg-maxed and the crop and reorientation undone.",
        f"- ONNX and Keras agree within {record.checks.get('onnx_max_difference', float('nan')):.1e} on a random "
        "batch (checked at export).",
        "",
        "## Limits",
        "",
        f"- Trained on {_count_text(training.path)} from one dataset; other scanners, protocols, contrasts, "
        "spacings, fields of view or pathologies may fail without warning. Check its masks on your own data first.",
        "- The preprocessing is part of the model: images prepared any other way (another orientation, spacing, "
        "window or normalisation) give wrong masks. `bundle.json` holds every setting and the dataset statistics.",
        "- Scores above are on the held-out cases of the same dataset; they do not transfer to other data.",
        *([_WHOLE_SLICES_LIMIT] if record.whole_slices else []),
        "",
    ]
    return "\n".join(lines)


_WHOLE_SLICES_LIMIT = (
    "- Trained on patches of its receptive field; the exported network is its same-padded rebuild, which takes "
    "whole slices (zeros around the slice, as the training patches were not padded)."
)


def _channels_text(record: BundleRecord) -> str:
    return " + ".join(record.channels[k] for k in sorted(record.channels, key=int))


def _data_lines(record: BundleRecord, manifest: dict, dataset: Path) -> list[str]:
    source = manifest.get("source", {})
    settings = record.preprocessing
    median = record.resolved.get("median_spacing")
    spacing = settings.get("spacing")
    if spacing == "original":
        spacing = f"each image's own (no resampling; the training median was {_numbers(median)} mm)"
    elif spacing == "median":
        spacing = f"the training median, {_numbers(median)} mm (z, y, x)"
    elif isinstance(spacing, list):
        spacing = f"{_numbers(spacing)} mm (z, y, x)"
    labels = ", ".join(
        f"{k} {record.labels[k]} (source value {v})"
        for k, v in zip(sorted(record.labels, key=int), record.label_values, strict=False)
    )
    return [
        f"- Dataset: {manifest.get('name', dataset.name)} ({source.get('format', 'unknown format')}), "
        f"{_count_text(dataset)}.",
        f"- Channels: {', '.join(f'{k} {v}' for k, v in sorted(record.channels.items(), key=lambda i: int(i[0])))}.",
        f"- Labels: {labels}.",
        f"- Orientation: array axes (0, 1, 2) point to ({', '.join(record.orientation)}).",
        f"- Spacing: {spacing}; downsampling {settings.get('downsample', 1)}; image interpolation order "
        f"{settings.get('image_order')}.",
        f"- Intensities: window {settings.get('window') or 'none'}, percentile clipping "
        f"{settings.get('clip_percentiles') or 'none'}, equalisation {settings.get('equalize')}, normalisation "
        f"{settings.get('normalize')}.",
        f"- Crop: {settings.get('crop')} (margin {settings.get('crop_margin')} voxels).",
    ]


def _training_lines(config: TrainingConfig, state: dict) -> list[str]:
    elapsed = state.get("elapsed_s")
    epochs = config.epochs_done or int(state.get("epoch", 0))
    devices = [d for d in config.device.get("devices", []) if d != "cpu"]
    cpu = config.device.get("cpu") or {}
    device = ", ".join(devices) or f"the CPU ({cpu.get('model', 'unknown')}, {cpu.get('cores', '?')} cores)"
    return [
        f"- Model: `{config.model}` {_options(config.model_args)}, {config.num_channels} channel(s) in, "
        f"{config.num_classes} classes out.",
        f"- Patch {config.patch_size}, batch {config.batch_size}, from {config.source}; loss `{config.loss}` "
        f"{_options(config.loss_args)}.",
        f"- Optimizer {config.optimizer}, learning rate {config.lr:g}, schedule {config.schedule}; augmentation "
        f"{config.augment}; mixed precision {'on' if config.mixed_precision else 'off'}; seed {config.seed}.",
        f"- {epochs} epoch(s) of up to {config.steps_per_epoch} steps"
        + (f" in {elapsed / 60:.1f} min" if isinstance(elapsed, int | float) else "")
        + f" on {device}, recipe {config.recipe}.",
    ]


def score_lines(config: TrainingConfig, state: dict, summary: dict | None) -> list[str]:
    """The best validation dice (``config.json``, else the run's ``state.json``) and the test scores of ``summary``."""
    best = config.best_val_dice if config.best_val_dice is not None else state.get("best")
    if isinstance(best, int | float) and np.isfinite(best):
        epoch = "" if state.get("best_epoch") is None else f" {int(state['best_epoch']) + 1}"
        lines = [f"- Validation dice (mean foreground, best epoch{epoch}): {best:.4f}"]
    else:
        lines = ["- Validation dice: not recorded"]
    if summary is None:
        lines.append(
            "- Test dice: not measured at export (export with --results RESULTS, the folder of an evaluation.py "
            "--data DATA --split test of this run)"
        )
        return lines
    mean = (summary.get("foreground_mean") or {}).get("dice")
    split = (summary.get("settings") or {}).get("split", "held-out")
    lines.append(f"- Test dice ({split} split, {summary.get('num_scored')} cases): foreground mean {_number(mean)}")
    for key, entry in (summary.get("classes") or {}).items():
        dice = (entry.get("dice") or {}).get("mean")
        lines.append(f"  - {entry.get('name', key)} (value {key}): {_number(dice)}")
    return lines


def _options(options: dict) -> str:
    return f"`{json.dumps(options)}`" if options else "(defaults)"


def _count_text(dataset: Path) -> str:
    splits = dataset / "splits.json"
    try:
        counts = {k: len(v) for k, v in fileio.read_json(splits).items() if k in ("train", "val", "test")}
    except (OSError, ValueError):
        return "an unknown number of cases"
    return f"{sum(counts.values())} cases (" + ", ".join(f"{k} {n}" for k, n in counts.items()) + ")"


def _window_text(record: BundleRecord) -> str:
    return "whole slices" if record.whole_slices else " x ".join(map(str, record.patch_size))


def _axes_text(record: BundleRecord) -> str:
    return "y, x" if len(record.input_shape) == 4 else "z, y, x"


def _shape_text(shape: list) -> str:
    words = ["N" if i == 0 and n is None else "?" if n is None else str(n) for i, n in enumerate(shape)]
    return "(" + ", ".join(words) + ")"


def _numbers(values) -> str:
    return " x ".join(f"{float(v):g}" for v in values) if values else "unknown"


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"
