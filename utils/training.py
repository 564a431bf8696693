"""Training: resolve the settings, build the model and the sampler, fit with validation on whole volumes.

The run folder (DESIGN.md) receives ``config.json`` (every resolved setting, backend and versions), ``model.keras``
(best validation mean foreground dice), ``last.keras`` (with optimizer state) plus ``state.json`` (epoch, best score,
time used) for ``--resume``, ``history.csv``, ``curves.png`` and ``model_summary.txt``. Every file is written
atomically, so a run killed at any moment resumes from its last complete epoch.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

import model as model_zoo
from utils import fileio
from utils.dataset import PreparedDataset
from utils.inference import predict_volume
from utils.losses import get_loss
from utils.metrics import MeanForegroundDice, compute_case_metrics
from utils.plots import plot_curves
from utils.sampling import PatchSampler, random_flips

log = logging.getLogger(__name__)

DEFAULTS = {
    "model": "unet3d",
    "model_args": {},
    "loss": "dice_ce",
    "loss_args": {},
    "patch_size": None,
    "batch_size": None,
    "epochs": 1000,
    "steps_per_epoch": 100,
    "lr": 3e-3,
    "optimizer": "adam",
    "schedule": "poly",
    "augment": "default",
    "foreground_ratio": 0.33,
    "time_limit": None,
    "val_overlap": 0.5,
    "mixed_precision": False,
    "seed": 0,
}
# Per-architecture defaults chosen for dice per second on a small budget (see benchmarks/RESULTS.md).
MODEL_DEFAULTS = {
    "unet": {"filters": 16, "depth": 3, "norm": "instance", "stem_stride": 2},
}
MAX_PATCH = {2: 256, 3: 128}
STATE_FILE = "state.json"


def model_family(name: str) -> str:
    return name[:-2] if name.endswith(("2d", "3d")) else name


def spatial_dims(name: str) -> int:
    if not name.endswith(("2d", "3d")):
        raise ValueError(f"model name {name!r} must end with 2d or 3d")
    return int(name[-2])


def resolved_model_args(config: dict) -> dict:
    """The architecture's recipe defaults overridden by ``model_args``."""
    return {**MODEL_DEFAULTS.get(model_family(config["model"]), {}), **(config.get("model_args") or {})}


def build(config: dict, num_channels: int, num_classes: int) -> keras.Model:
    """Build the configured model for the configured patch size."""
    shape = (*config["patch_size"], num_channels)
    return model_zoo.build_model(config["model"], shape, num_classes, **resolved_model_args(config))


def plan_patch_size(config: dict, dataset: PreparedDataset) -> list[int]:
    """Smallest patch that holds the median case (2D: the median slice), rounded up to what the model accepts."""
    ndim = spatial_dims(config["model"])
    median = np.asarray(dataset.fingerprint.get("median_shape") or _median_prepared_shape(dataset), dtype=float)
    target = median[-ndim:]
    target = np.minimum(target, MAX_PATCH[ndim])
    for divisor in (1, 2, 4, 8, 16, 32, 64, 128):
        patch = [int(math.ceil(t / divisor) * divisor) for t in target]
        try:
            build({**config, "patch_size": patch}, dataset.num_channels, dataset.num_classes)
        except ValueError as error:
            if "divisible" in str(error):
                continue
            raise
        keras.backend.clear_session()
        return patch
    raise ValueError(f"no patch size near {target.tolist()} fits model {config['model']}")


def _median_prepared_shape(dataset: PreparedDataset) -> list[float]:
    return np.median([c["geometry"]["shape"] for c in dataset.manifest["cases"]], axis=0).tolist()


def plan_batch_size(config: dict) -> int:
    """Batch size for the patch: 2 for 3D patches (nnU-Net's choice), more for small 2D slices."""
    voxels = int(np.prod(config["patch_size"]))
    if len(config["patch_size"]) == 3:
        return 2 if voxels > 64**3 else 4
    return int(np.clip(2**18 // max(voxels, 1), 2, 32))


def resolve_config(overrides: dict, dataset: PreparedDataset) -> dict:
    """Fill every setting: flags/config file first, then derived values, then defaults. Validates the result."""
    unknown = sorted(set(overrides) - set(DEFAULTS) - {"data", "output", "resume"})
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    config = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    if config["model"] not in model_zoo.MODELS:
        raise ValueError(f"unknown model {config['model']!r}; choose one of {sorted(model_zoo.MODELS)}")
    ndim = spatial_dims(config["model"])
    if config["patch_size"] is None:
        config["patch_size"] = plan_patch_size(config, dataset)
    config["patch_size"] = [int(v) for v in config["patch_size"]]
    if len(config["patch_size"]) != ndim:
        raise ValueError(f"model {config['model']} needs a patch size of {ndim} numbers, got {config['patch_size']}")
    if config["batch_size"] is None:
        config["batch_size"] = plan_batch_size(config)
    for key in ("batch_size", "epochs", "steps_per_epoch"):
        if int(config[key]) < 1:
            raise ValueError(f"{key} must be at least 1, got {config[key]}")
    if config["lr"] <= 0:
        raise ValueError(f"lr must be positive, got {config['lr']}")
    config["model_args"] = resolved_model_args(config)
    config["num_classes"] = dataset.num_classes
    config["num_channels"] = dataset.num_channels
    config["labels"] = dataset.labels
    config["channels"] = dataset.manifest["channels"]
    config["dataset_preprocessing"] = dataset.manifest["preprocessing"]
    config["data"] = str(Path(overrides["data"]).resolve())
    config["backend"] = keras.backend.backend()
    config["versions"] = {"keras": keras.__version__, "numpy": np.__version__, "python": platform.python_version()}
    config["versions"][config["backend"]] = _backend_version(config["backend"])
    return config


def _backend_version(backend: str) -> str:
    try:
        return __import__(backend).__version__
    except (ImportError, AttributeError):
        return "unknown"


def mean_foreground_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """Mean over foreground classes of the case's dice (classes empty in both are left out), and per-class dice."""
    scores = compute_case_metrics(pred, truth, range(1, num_classes), (1.0,) * truth.ndim, metrics=("dice",))
    per_class = [float(scores[k]["dice"]) for k in range(1, num_classes)]
    finite = [v for v in per_class if np.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), per_class


class Validation(keras.callbacks.Callback):
    """After each epoch, predict every validation volume whole and log ``val_dice`` (mean foreground dice)."""

    def __init__(self, dataset: PreparedDataset, case_ids: Sequence[str], config: dict):
        super().__init__()
        self.dataset, self.case_ids, self.config = dataset, list(case_ids), config

    def evaluate(self) -> dict:
        num_classes = self.config["num_classes"]
        means, per_class = [], []
        for case_id in self.case_ids:
            probabilities = predict_volume(
                self.model,
                self.dataset.image(case_id),
                self.config["patch_size"],
                num_classes,
                overlap=self.config["val_overlap"],
                batch_size=self.config["batch_size"],
            )
            mean, classes = mean_foreground_dice(np.argmax(probabilities, -1), self.dataset.label(case_id), num_classes)
            means.append(mean)
            per_class.append(classes)
        logs = {"val_dice": float(np.nanmean(means)) if means else float("nan")}
        for k, values in enumerate(np.array(per_class, dtype=float).T, start=1):
            logs[f"val_dice_{k}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        return logs

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.case_ids:
            logs.update(self.evaluate())


class TimedPolyDecay(keras.callbacks.Callback):
    """Polynomial learning-rate decay ``lr * (1 - progress) ** 0.9`` (nnU-Net), where progress is the larger of the
    epoch fraction and, under a time limit, the fraction of the time budget used. Also ``cosine`` and ``none``."""

    def __init__(self, base_lr: float, schedule: str, epochs: int, steps: int, clock, time_limit_s: float | None):
        super().__init__()
        self.base_lr, self.schedule, self.epochs, self.steps = base_lr, schedule, epochs, steps
        self.clock, self.time_limit_s = clock, time_limit_s
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def progress(self, batch: int) -> float:
        done = (self.epoch + batch / self.steps) / self.epochs
        if self.time_limit_s:
            done = max(done, self.clock() / self.time_limit_s)
        return float(min(done, 0.999))

    def on_train_batch_begin(self, batch, logs=None):
        if self.schedule == "none" or batch % 10:
            return
        progress = self.progress(batch)
        if self.schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = (1 - progress) ** 0.9
        self.model.optimizer.learning_rate.assign(self.base_lr * factor)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class RunRecorder(keras.callbacks.Callback):
    """Checkpoints (best and last), ``state.json``, ``history.csv`` and ``curves.png`` after each epoch, and the
    time limit: training stops when another epoch would not fit in the remaining time."""

    def __init__(self, run_dir: Path, history: list[dict], best: float, clock, time_limit_s: float | None):
        super().__init__()
        self.run_dir, self.history, self.best = run_dir, history, best
        self.clock, self.time_limit_s = clock, time_limit_s
        self.epoch_start = 0.0
        self.durations: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        score = logs.get("val_dice", logs.get("fg_dice", float("nan")))
        improved = np.isfinite(score) and (not np.isfinite(self.best) or score > self.best)
        if improved:
            self.best = float(score)
            save_model(self.model, self.run_dir / "model.keras")
        save_model(self.model, self.run_dir / "last.keras")
        self.durations.append(self.clock() - self.epoch_start)
        row = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}, "time_s": round(self.clock(), 1)}
        self.history.append(row)
        write_history(self.run_dir / "history.csv", self.history)
        fileio.write_json(self.run_dir / STATE_FILE, {"epoch": epoch + 1, "best": self.best, "elapsed_s": self.clock()})
        plot_curves(self.history, self.run_dir / "curves.png")
        if self.time_limit_s and self.clock() + np.mean(self.durations[-3:]) > self.time_limit_s:
            log.info("time limit reached after epoch %d (%.1f min)", epoch + 1, self.clock() / 60)
            self.model.stop_training = True


def load_model(path: str | os.PathLike) -> keras.Model:
    """Load a ``.keras`` file in Keras's safe mode; the toolkit's registered layers, losses and metrics are known.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a loadable Keras model.
    """
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


def write_history(path: Path, history: list[dict]) -> None:
    """Write the per-epoch log as CSV (columns: the union of every epoch's keys)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    fileio.write_text(path, buffer.getvalue())


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [
            {k: (float(v) if v not in ("", None) else float("nan")) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


def make_optimizer(config: dict) -> keras.optimizers.Optimizer:
    if config["optimizer"] == "adam":
        return keras.optimizers.Adam(learning_rate=config["lr"])
    if config["optimizer"] == "sgd":
        return keras.optimizers.SGD(learning_rate=config["lr"], momentum=0.99, nesterov=True)
    raise ValueError(f"optimizer must be adam or sgd, got {config['optimizer']!r}")


def make_augment(config: dict):
    if config["augment"] == "none":
        return None
    if config["augment"] in ("default", "strong", "flips"):
        return random_flips()
    raise ValueError(f"augment must be none, default or strong, got {config['augment']!r}")


def train(config_overrides: dict) -> dict:
    """Train a model as configured and write the run folder; returns the resolved config with the best score.

    Args:
        config_overrides: settings from flags or a config file; ``data`` and ``output`` are required.

    Raises:
        FileNotFoundError: the prepared dataset is missing; or ``resume`` without a previous run.
        ValueError: a bad setting, or a run folder made for another dataset.
    """
    dataset = PreparedDataset(config_overrides["data"])
    run_dir = Path(config_overrides["output"])
    resume = bool(config_overrides.get("resume"))
    if resume:
        config = _resume_config(run_dir, dataset, config_overrides)
    else:
        config = resolve_config(config_overrides, dataset)
    config["output"] = str(run_dir)
    keras.utils.set_random_seed(int(config["seed"]))
    if config["mixed_precision"]:
        keras.mixed_precision.set_global_policy("mixed_float16")
    train_ids, val_ids = dataset.split("train"), dataset.split("val")
    labelled = [c for c in train_ids if dataset.cases[c].get("label")]
    if not labelled:
        raise ValueError(f"{dataset.path / 'splits.json'}: the train split holds no labelled case")

    state = fileio.read_json(run_dir / STATE_FILE) if resume else {"epoch": 0, "best": float("nan"), "elapsed_s": 0.0}
    if resume:
        model = load_model(run_dir / "last.keras")
    else:
        model = build(config, dataset.num_channels, dataset.num_classes)
        model.compile(
            optimizer=make_optimizer(config),
            loss=get_loss(config["loss"], **config["loss_args"]),
            metrics=[MeanForegroundDice(dataset.num_classes)],
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_json(run_dir / "config.json", config)
    fileio.write_text(run_dir / "model_summary.txt", model_zoo.model_summary_text(model))

    sampler = PatchSampler(
        dataset.image,
        dataset.label,
        labelled,
        config["patch_size"],
        dataset.num_classes,
        batch_size=config["batch_size"],
        steps_per_epoch=config["steps_per_epoch"],
        foreground_ratio=config["foreground_ratio"],
        augment=make_augment(config),
        seed=config["seed"],
    )
    sampler.set_epoch(state["epoch"])
    started = time.monotonic() - float(state["elapsed_s"])
    clock = lambda: time.monotonic() - started
    limit = float(config["time_limit"]) * 60 if config["time_limit"] else None
    history = read_history(run_dir / "history.csv")[: state["epoch"]] if resume else []
    recorder = RunRecorder(run_dir, history, float(state["best"]), clock, limit)
    callbacks = [
        TimedPolyDecay(config["lr"], config["schedule"], config["epochs"], config["steps_per_epoch"], clock, limit),
        Validation(dataset, val_ids, config),
        recorder,
    ]
    if state["epoch"] < config["epochs"] and not (limit and clock() >= limit):
        model.fit(
            sampler,
            epochs=config["epochs"],
            initial_epoch=state["epoch"],
            callbacks=callbacks,
            verbose=2 if os.environ.get("CI") else "auto",
        )
    config["best_val_dice"] = recorder.best
    return config


def _resume_config(run_dir: Path, dataset: PreparedDataset, overrides: dict) -> dict:
    for name in ("config.json", "last.keras", STATE_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name}: not found; cannot --resume (start without --resume)")
    config = fileio.read_json(run_dir / "config.json")
    if config.get("labels") != dataset.labels or config.get("num_channels") != dataset.num_channels:
        raise ValueError(f"{run_dir}: the run was made for a dataset with other labels or channels than {dataset.path}")
    for key in ("epochs", "time_limit"):
        if overrides.get(key) is not None:
            config[key] = overrides[key]
    return config
