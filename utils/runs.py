"""A trained run as both training and evaluation see it: the ``.keras`` model files and the run's ``config.json``.

Training writes a run (``utils.train``), evaluation reads it (``utils.evaluate``); the two never import each other,
so what both need to save and load a run lives here.

A run holds what prediction needs without its training dataset: ``config.json`` (the settings and the plan) and
``dataset/`` (:func:`write_dataset_record`: the training dataset's preprocessing settings, labels, channels,
normalisation statistics and splits, copied when training starts), so it keeps predicting once that dataset has
moved or been deleted, and an export bundle copies these plain JSON files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import keras

from utils import fileio
from utils.settings import TRAINING, defaults

if TYPE_CHECKING:
    from utils.prepared import PreparedDataset

log = logging.getLogger(__name__)


def load_model(path: str | os.PathLike, model_name: str | None = None, model_source: str | None = None) -> keras.Model:
    """Load a ``.keras`` file in Keras's safe mode; the toolkit's registered layers, losses and metrics are known.

    Args:
        path: the ``.keras`` file.
        model_name, model_source: a run's ``model`` and ``model_source``: when the run was built by a user's builder
            (``FILE.py:FUNCTION``), its file or module is imported first, which registers the Keras objects it
            defines.

    Raises:
        FileNotFoundError: the file (or the user's builder file) does not exist.
        ValueError: the file is not a loadable Keras model.
    """
    import model  # noqa: F401  (these imports register the toolkit's layers, losses and metrics with Keras)
    import utils.losses  # noqa: F401
    import utils.metrics  # noqa: F401

    if model_name and model.is_user_builder(model_name):
        model.load_builder(model_name, model_source)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises many types for damaged or foreign files
        raise ValueError(f"{path}: not a loadable Keras model ({type(error).__name__}: {error})") from error


def save_model(model: keras.Model, path: Path) -> None:
    """Save a ``.keras`` file atomically (with optimizer state)."""
    fileio.write_with(path, lambda tmp: model.save(tmp), suffix=".keras")


def load_run(run_dir: str | os.PathLike, load: bool = True) -> tuple[TrainingConfig, keras.Model | None]:
    """The run's resolved config and its best model (``model.keras``, else ``last.keras``), loaded in safe mode
    (``None`` with ``load=False``).

    Raises:
        FileNotFoundError: the run folder, its config or both model files are missing.
        ValueError: the model file is not a readable Keras model.
    """
    config = load_config(run_dir)
    return config, load_model(model_path(run_dir), config.model, config.model_source) if load else None


def model_path(run_dir: str | os.PathLike) -> Path:
    """``model.keras`` (best) or else ``last.keras`` of a run.

    Raises:
        FileNotFoundError: neither exists.
    """
    for name in ("model.keras", "last.keras"):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    raise FileNotFoundError(f"{run_dir}: neither model.keras nor last.keras found (train first)")


RUN_FORMAT_VERSION = 2  # 1: config.json without "format_version" (read as is: same keys)


def _setting(key: str):
    """A field whose default is the training setting's (a fresh copy for lists and mappings)."""
    default = TRAINING[key].default
    if isinstance(default, dict | list):
        return field(default_factory=lambda: defaults({key: TRAINING[key]})[key])
    return field(default=default)


@dataclass
class TrainingConfig:
    """A run's ``config.json``: every training setting after planning, plus what the run was trained on and with.

    The first block holds the keys of :data:`utils.settings.TRAINING` (their meaning and defaults are there); the
    second what :func:`utils.train.config.resolve_config` adds; the last what training records when it ends.
    Evaluation reads it through :func:`load_config` without importing the training code.
    """

    model: str = _setting("model")
    model_args: dict = _setting("model_args")
    backbone: str | None = _setting("backbone")
    encoder_weights: str | None = _setting("encoder_weights")
    freeze_encoder_epochs: int = _setting("freeze_encoder_epochs")
    loss: str = _setting("loss")
    loss_args: dict = _setting("loss_args")
    source: str = _setting("source")
    patch_size: list[int] | None = _setting("patch_size")
    batch_size: int | None = _setting("batch_size")
    memory_budget: float = _setting("memory_budget")
    epochs: int = _setting("epochs")
    steps_per_epoch: int = _setting("steps_per_epoch")
    lr: float = _setting("lr")
    optimizer: str = _setting("optimizer")
    momentum: float = _setting("momentum")
    weight_decay: float = _setting("weight_decay")
    schedule: str = _setting("schedule")
    poly_exponent: float = _setting("poly_exponent")
    warmup_epochs: float = _setting("warmup_epochs")
    plateau_patience: int = _setting("plateau_patience")
    plateau_factor: float = _setting("plateau_factor")
    min_lr: float = _setting("min_lr")
    grad_clip: float | None = _setting("grad_clip")
    lr_scaling: str = _setting("lr_scaling")
    augment: str = _setting("augment")
    augmentation: dict = _setting("augmentation")
    foreground_ratio: float = _setting("foreground_ratio")
    pad_placement: str = _setting("pad_placement")
    workers: int = _setting("workers")
    worker_mode: str = _setting("worker_mode")
    time_limit: float | None = _setting("time_limit")
    early_stopping: int = _setting("early_stopping")
    val_overlap: float = _setting("val_overlap")
    validation: str = _setting("validation")
    metrics: list[str] = _setting("metrics")
    tensorboard: bool = _setting("tensorboard")
    tensorboard_images: int = _setting("tensorboard_images")
    mixed_precision: bool = _setting("mixed_precision")
    strategy: str = _setting("strategy")
    deterministic: bool = _setting("deterministic")
    seed: int = _setting("seed")
    fold: int | None = _setting("fold")

    model_source: str | None = None  # a user's builder (model FILE.py:FUNCTION): the file's absolute path or module
    plan: dict = field(default_factory=dict)
    recipe: str = "cpu"
    replicas: int = 1
    global_batch_size: int | None = None
    num_classes: int = 0
    num_channels: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    channels: dict[str, str] = field(default_factory=dict)
    dataset_preprocessing: dict = field(default_factory=dict)
    data: str = ""
    backend: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    output: str = ""
    device: dict = field(default_factory=dict)
    precision_policy: str | None = None
    best_val_dice: float | None = None
    epochs_done: int = 0
    format_version: int = RUN_FORMAT_VERSION

    def to_json(self) -> dict:
        """The plain mapping written as ``config.json``."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping, where: str | os.PathLike = "config.json") -> TrainingConfig:
        """Read a ``config.json`` mapping.

        Raises:
            ValueError: not a mapping, a newer format, an unknown key, or a setting of the wrong type, naming
                ``where`` and, for a config this toolkit cannot read, the command to rerun.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
            raise ValueError(
                f"{where}: written by a newer version of train.py (format {version!r}, this toolkit reads up to "
                f"{RUN_FORMAT_VERSION}); update the toolkit or train the run again with this one"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; retrain with this version of train.py")
        for key in TRAINING.keys() & data.keys():
            try:
                TRAINING[key].check(key, data[key])
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
        return cls(**{**data, "format_version": RUN_FORMAT_VERSION})

    def settings(self) -> dict:
        """The training settings alone (the keys of :data:`utils.settings.TRAINING`)."""
        return {key: getattr(self, key) for key in TRAINING}


def load_config(run_dir: str | os.PathLike) -> TrainingConfig:
    """The :class:`TrainingConfig` of ``runs/<name>/config.json``.

    Raises:
        FileNotFoundError: no ``config.json`` in the run folder.
        ValueError: it is not a readable training config.
    """
    path = Path(run_dir) / "config.json"
    return TrainingConfig.from_json(fileio.read_json(path), path)


FOLD_PREFIX = "fold_"  # runs/<name>/fold_<i>/: fold i of a cross-validation (train.py --fold i), a run of its own


def fold_folder(run_dir: str | os.PathLike, fold: int) -> Path:
    """``runs/<name>/fold_<fold>``."""
    return Path(run_dir) / f"{FOLD_PREFIX}{int(fold)}"


def fold_folders(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{i: runs/<name>/fold_<i>}`` of a run trained with ``--fold``, by fold index; empty for a single run (a folder
    with its own ``config.json``) or a folder without folds."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file() or not run_dir.is_dir():
        return {}
    found = {}
    for child in run_dir.iterdir():
        index = child.name[len(FOLD_PREFIX) :]
        if child.is_dir() and child.name.startswith(FOLD_PREFIX) and index.isdigit():
            found[int(index)] = child
    return dict(sorted(found.items()))


def first_config(run_dir: str | os.PathLike) -> TrainingConfig:
    """The config of a run, or of the first fold with one of a run of folds (their settings agree but for the fold).

    Raises:
        FileNotFoundError: neither the run nor any fold has a ``config.json``.
        ValueError: it is not a readable training config.
    """
    for folder in fold_folders(run_dir).values():
        if (folder / "config.json").is_file():
            return load_config(folder)
    return load_config(run_dir)


DATASET_RECORD = "dataset"  # runs/<name>/dataset/: the training dataset's record, copied when training starts


def write_dataset_record(run_dir: str | os.PathLike, dataset: PreparedDataset) -> Path:
    """Copy into ``runs/<name>/dataset/`` what prediction needs from the training dataset, so that the run predicts
    new images after that dataset is moved or deleted: ``manifest.json`` without its per-case entries (the
    preprocessing settings, labels with names and source values, channels, the resolved spacing and CT statistics),
    ``fingerprint.json`` (the normalisation statistics) and ``splits.json`` (the cases trained and validated on).
    The plan is in the run's ``config.json``. Returns the folder.
    """
    folder = Path(run_dir) / DATASET_RECORD
    source = {k: v for k, v in dataset.manifest.get("source", {}).items() if k != "root_from_dataset"}
    manifest = {
        **dataset.manifest,
        "source": source,
        "cases": [],
        "num_cases": len(dataset.cases),
        "copied_from": str(dataset.path.resolve()),
    }
    with fileio.atomic_group():
        fileio.write_json(folder / "manifest.json", manifest)
        fileio.write_json(folder / "splits.json", dataset.splits)
        if dataset.fingerprint:
            fileio.write_json(folder / "fingerprint.json", dataset.fingerprint)
    return folder


def dataset_record(run_dir: str | os.PathLike) -> Path | None:
    """``runs/<name>/dataset/`` when the run holds its training dataset's record (runs trained before it did not)."""
    folder = Path(run_dir) / DATASET_RECORD
    return folder if (folder / "manifest.json").is_file() else None
