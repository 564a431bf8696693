"""Prediction on new images: raw files of any supported format, prepared exactly as the run's training data was.

``evaluation.py --run runs/NAME --input PATH --output results/NAME`` lands here. The run folder's ``dataset/`` (a
copy made when training started, :func:`utils.runs.write_dataset_record`; for older runs the training dataset that
``config.json`` names in ``data``) holds the training dataset's ``manifest.json``, with the preprocessing settings
(spacing, window, normalisation, crop, label remapping), and ``fingerprint.json``, the dataset statistics some of
them need (median spacing, CT intensity percentiles): the run predicts after its training dataset is gone. Each new
case is read by :func:`utils.formats.discover` / :func:`utils.formats.load_case` with the training's label
remapping, prepared by :func:`utils.preprocessing.prepare_case` *without its label* (so a ``foreground`` crop cannot
peek at the truth), predicted, written back on its source grid, and scored when it has a label. Results are laid out
as in :mod:`utils.evaluate.pipeline`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from utils import console, fileio
from utils.evaluate.ensemble import Ensemble
from utils.evaluate.options import Options
from utils.evaluate.pipeline import (
    class_names,
    file_stamps,
    finish_case,
    label_values,
    model_stamp,
    open_output,
    open_predictor,
    plan_key,
    resolve_plan,
    run_cases,
    segment,
    training_dataset,
    validation_cases,
)
from utils.evaluate.probabilities import ProbabilityWriter
from utils.evaluate.results import write_results
from utils.formats import class_indices, discover, load_case, source_values
from utils.prepared import read_manifest
from utils.preprocessing import PreprocessSettings, prepare_case
from utils.runs import DATASET_RECORD, TrainingConfig, dataset_record

log = logging.getLogger(__name__)
READER_OPTIONS = (
    "label",
    "image_pattern",
    "label_pattern",
    "channel_patterns",
    "patient_pattern",
    "hdf5_image_keys",
    "hdf5_label_key",
    "source_spacing",
)


@dataclasses.dataclass
class TrainingPreparation:
    """How the run's training data was prepared: what a new image needs to be prepared the same way."""

    path: Path
    manifest: dict
    fingerprint: dict
    settings: PreprocessSettings

    @classmethod
    def of_run(
        cls, config: TrainingConfig, data: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None
    ) -> TrainingPreparation:
        """From ``data`` (``--data``) when given, else from the run's own record of its training dataset
        (``runs/<name>/dataset/``, :func:`utils.runs.write_dataset_record`), else, for runs trained before that
        record, from the training dataset folder the run config names.

        Raises:
            FileNotFoundError: none of them is there (name the training dataset with ``--data``).
            ValueError: its labels or channels differ from the run's, or its manifest is of another version.
        """
        record = dataset_record(run_dir) if run_dir is not None and not data else None
        path = Path(data or record or config.data or "")
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{path / 'manifest.json'}: the run's training dataset is needed for its preprocessing settings "
                f"(the run folder holds no copy in {DATASET_RECORD}/: it was trained before runs kept one); "
                "pass its folder with --data if it moved"
            )
        manifest = read_manifest(path)
        fingerprint_path = path / "fingerprint.json"
        fingerprint = fileio.read_json(fingerprint_path) if fingerprint_path.is_file() else None
        if manifest.get("labels") != config.labels or len(manifest.get("channels", {})) != config.num_channels:
            raise ValueError(f"{path}: labels or channels differ from those of the run ({config.labels})")
        recorded = config.dataset_preprocessing
        if recorded and recorded != manifest["preprocessing"]:
            log.warning("%s: preprocessing differs from the run's record of it; using the dataset's", path)
        return cls(path, manifest, fingerprint, PreprocessSettings(**manifest["preprocessing"]))

    @property
    def channel_names(self) -> list[str]:
        channels = self.manifest["channels"]
        return [channels[k] for k in sorted(channels, key=int)]

    def reader_options(self, options: dict | None) -> dict:
        """The user's reader options plus the training's label remapping (``label_map``, ``binarize``) and channel
        count (``num_channels``: files named ``<case>_0000`` ... are grouped into cases of that many channels)."""
        unknown = sorted(set(options or {}) - set(READER_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reader option(s) {unknown}; known: {list(READER_OPTIONS)}")
        return {
            **{k: v for k, v in (options or {}).items() if v is not None},
            "label_map": self.settings.label_map,
            "binarize": self.settings.binarize,
            "num_channels": len(self.manifest["channels"]),
        }


@console.logged_to("evaluation.log")
def predict_images(
    run_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    fmt: str = "auto",
    reader_options: dict | None = None,
    data: str | os.PathLike | None = None,
    options: Options | None = None,
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Predict every case found under ``input_path``; write masks, pictures and, for labelled cases, scores.

    Args:
        run_dir: ``runs/<name>``, or a bundle ``bundles/<name>`` (:mod:`utils.bundle`; ``options.engine`` picks Keras
            or onnxruntime).
        input_path: a folder or file in a format of :mod:`utils.formats`.
        output: ``results/<name>``.
        fmt: ``auto`` or a reader name (``msd``, ``files``, ``hdf5``, ``brats``, ``dicom``, ``png``).
        reader_options: reader options of :data:`READER_OPTIONS` (``label``, ``image_pattern``, ...).
        data: the run's training dataset folder when it is not where ``config.json`` says.
        options: inference, post-processing and scoring settings (:class:`utils.evaluate.pipeline.Options`).
        predict: optional ``batch -> probabilities`` used instead of the run's model (tests); for a run of folds
            (ensembled) one for all or a mapping fold index -> function.

    Returns:
        The summary (also in ``summary.json``).

    Raises:
        FileNotFoundError, ValueError: a missing run, training dataset or input, or images whose channel count
            differs from the run's.
    """
    options = options or Options()
    predictor = open_predictor(run_dir, options, predict)
    config = predictor.config
    record_folder = predictor.run_folder if isinstance(predictor, Ensemble) else run_dir
    training = TrainingPreparation.of_run(config, data, record_folder)
    source = discover(input_path, fmt, training.reader_options(reader_options))
    if len(source.channels) != config.num_channels:
        raise ValueError(
            f"{input_path}: {len(source.channels)} channel(s) {list(source.channels.values())}, but the run was "
            f"trained on {config.num_channels} {training.channel_names}"
        )
    output = open_output(output)
    values = label_values(training.manifest)
    names = class_names(training.manifest["labels"], values)
    validation_set = training_dataset(data or config.data)  # for --postprocess auto; gone with the dataset
    plan = resolve_plan(
        options,
        config.num_classes,
        run_dir,
        validation_cases(predictor, validation_set, options) if validation_set is not None else None,
        plan_key(options, run_dir, data or config.data or training.path),
    )
    specs = {spec.id: spec for spec in source.cases}
    settings_key = {
        "run": str(Path(run_dir).resolve()),
        "model_file": model_stamp(run_dir),
        "input": str(Path(input_path).resolve()),
        "format": source.format,
        "training_data": str(training.path.resolve()),
        **options.key(),
        "plan": plan,
    }

    def process(case_id: str) -> dict:
        case = load_case(specs[case_id], integers=True)  # a CT stays int16 (half the memory) until resampled
        truth = None
        if case.label is not None:
            truth = class_indices(source_values(case.label, source.label_values or None), [int(v) for v in values])
            case.label = None
        display = case.image if options.pictures != "none" else None  # the source image serves only the pictures
        release = display is None  # without them, preparation takes the image over and frees it once resampled
        image, _, record = prepare_case(
            case, training.settings, training.fingerprint, training.channel_names, release=release
        )
        case.image = None
        keep = ProbabilityWriter(output, case_id, record, case.writer) if options.save_probabilities else None
        classes = segment(predictor, image, record, options, plan, keep)
        del image
        writer = {**case.writer, "label_values": [int(v) for v in values], "labels": training.manifest["labels"]}
        entry = {"id": case_id, "geometry": record, "writer": writer}
        result = finish_case(output, entry, classes, truth, display, case.affine, values, names, options)
        return {**result, "probabilities": keep.written} if keep is not None else result

    def inputs(case_id: str) -> str:
        return file_stamps(specs[case_id].source_files())

    records, failures = run_cases(list(specs), process, output, settings_key, options.progress, inputs)
    settings = {**settings_key, "model": config.model, "patch_size": config.patch_size}
    title = f"{config.model} on {Path(input_path).name}"
    if isinstance(predictor, Ensemble):
        settings["folds"] = sorted(predictor.members)
        title += f" (folds {', '.join(map(str, predictor.members))})"
    plan = {**plan, "lcc_class_names": [training.manifest["labels"][str(k)] for k in plan["lcc_classes"]]}
    return write_results(output, records, failures, names, options, settings, plan, title)
