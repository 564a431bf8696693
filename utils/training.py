"""Training: resolve the settings, build the model and the sampler, fit with validation on whole volumes.

The run folder (DESIGN.md) receives ``config.json`` (every resolved setting, the plan, backend and versions),
``model.keras`` (best validation mean foreground dice), ``last.keras`` (with optimizer state) plus ``state.json``
(epochs done, best score, time used, learning-rate schedule state) for ``--resume``, ``history.csv``, ``curves.png``,
``model_summary.txt`` and ``tensorboard/``. Every file is written atomically, so a run killed at any moment resumes
from its last complete epoch and then sees the batches and learning rates the uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

import model as model_zoo
from utils import fileio, planning
from utils.augment import PRESETS, Augmenter, augmentation_settings
from utils.dataset import PreparedDataset
from utils.distribute import (
    STRATEGIES,
    Distribution,
    enable_determinism,
    make_distribution,
    mixed_precision_policy,
    summary_writer,
)
from utils.inference import predict_volume
from utils.losses import LOSSES, deep_supervision_compile_args, get_loss
from utils.metrics import MeanForegroundDice, compute_case_metrics
from utils.plots import plot_curves
from utils.sampling import PatchSampler, StackSampler
from utils.workers import guarded

log = logging.getLogger(__name__)

SOURCES = ("volumes", "slices", "patches")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("poly", "cosine", "plateau", "none")
LR_SCALINGS = ("none", "linear", "sqrt")
WORKER_MODES = ("thread", "process")

# Every setting, its default and its type. ``int+``: an integer >= 1; ``ints``: a list of integers; ``None`` defaults
# are planned or mean "off". A config file or the flags may set any of them.
SETTINGS: dict[str, tuple[object, object]] = {
    "model": ("unet3d", tuple(model_zoo.MODELS)),
    "model_args": ({}, "dict"),
    "loss": ("dice_ce", tuple(LOSSES)),
    "loss_args": ({}, "dict"),
    "source": ("volumes", SOURCES),
    "patch_size": (None, "ints"),
    "batch_size": (None, "int+"),
    "memory_budget": (planning.DEFAULT_MEMORY_GB, "float+"),
    "epochs": (1000, "int+"),
    "steps_per_epoch": (100, "int+"),
    "lr": (3e-3, "float+"),
    "optimizer": ("adam", OPTIMIZERS),
    "momentum": (0.99, "float"),
    "weight_decay": (0.0, "float"),
    "schedule": ("poly", SCHEDULES),
    "poly_exponent": (0.9, "float+"),
    "warmup_epochs": (0.0, "float"),
    "plateau_patience": (10, "int+"),
    "plateau_factor": (0.5, "float+"),
    "min_lr": (0.0, "float"),
    "grad_clip": (None, "float+"),
    "lr_scaling": ("none", LR_SCALINGS),
    "augment": ("default", PRESETS),
    "augmentation": ({}, "dict"),
    "foreground_ratio": (0.33, "float"),
    "pad_placement": ("centre", ("centre", "random")),
    "workers": (1, "int+"),
    "worker_mode": ("thread", WORKER_MODES),
    "time_limit": (None, "float+"),
    "early_stopping": (0, "int"),
    "val_overlap": (0.5, "float"),
    "tensorboard": (True, "bool"),
    "tensorboard_images": (3, "int"),
    "mixed_precision": (False, "bool"),
    "strategy": ("default", STRATEGIES),
    "deterministic": (False, "bool"),
    "seed": (0, "int"),
}
DEFAULTS = {key: default for key, (default, _) in SETTINGS.items()}
RUN_KEYS = ("data", "output", "resume")
# Settings a resumed run may change (they steer the run, not what is learnt).
RESUME_MAY_CHANGE = ("epochs", "time_limit", "early_stopping", "workers", "worker_mode", "tensorboard_images")
# Per-architecture defaults chosen for dice per second on a small budget (see benchmarks/RESULTS.md).
MODEL_DEFAULTS = {
    "unet": {"filters": 16, "norm": "instance", "stem_stride": 2},
}
STATE_FILE = "state.json"


def check_settings(settings: dict) -> None:
    """Refuse unknown keys and values of the wrong type, quoting them, before any work is done.

    Raises:
        ValueError: naming the first bad key and its value.
    """
    unknown = sorted(set(settings) - set(SETTINGS) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(SETTINGS)}")
    for key, value in settings.items():
        if key in RUN_KEYS or value is None:
            continue
        kind = SETTINGS[key][1]
        if not _matches(value, kind):
            expected = f"one of {list(kind)}" if isinstance(kind, tuple) else _KIND_NAMES[kind]
            raise ValueError(f"setting {key!r} must be {expected}, got {value!r}")


_KIND_NAMES = {
    "dict": "a mapping",
    "ints": "a list of positive integers",
    "int": "an integer",
    "int+": "an integer >= 1",
    "float": "a number",
    "float+": "a positive number",
    "bool": "true or false",
}


def _matches(value, kind) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(kind, tuple):
        return isinstance(value, str) and value in kind
    return {
        "dict": isinstance(value, dict),
        "ints": isinstance(value, list | tuple) and all(isinstance(v, int) and v >= 1 for v in value),
        "int": is_int,
        "int+": is_int and value >= 1,
        "float": is_number and math.isfinite(value),
        "float+": is_number and math.isfinite(value) and value > 0,
        "bool": isinstance(value, bool),
    }[kind]


def model_family(name: str) -> str:
    return name[:-2] if name.endswith(("2d", "3d")) else name


def spatial_dims(name: str) -> int:
    if not name.endswith(("2d", "3d")):
        raise ValueError(f"model name {name!r} must end with 2d or 3d")
    return int(name[-2])


def recipe_model_args(config: dict) -> dict:
    """The architecture's recipe defaults overridden by ``model_args``."""
    return {**MODEL_DEFAULTS.get(model_family(config["model"]), {}), **(config.get("model_args") or {})}


def build(config: dict, num_channels: int, num_classes: int) -> keras.Model:
    """Build the configured model for the configured patch size."""
    shape = (*config["patch_size"], num_channels)
    return model_zoo.build_model(config["model"], shape, num_classes, **config["model_args"])


def stack_paths(dataset: PreparedDataset, source: str, split: str) -> tuple[Path, Path]:
    """``<source>/<split>_images.npy`` and ``_labels.npy`` of a prepared dataset."""
    folder = dataset.path / source
    return folder / f"{split}_images.npy", folder / f"{split}_labels.npy"


def _stack_row_shape(dataset: PreparedDataset, source: str) -> list[int]:
    images, labels = stack_paths(dataset, source, "train")
    for path in (images, labels):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found; write it with data_gen.py --export {source} (or --source volumes)"
            )
    record = dataset.path / source / "export.json"
    if source == "slices" and record.is_file() and fileio.read_json(record).get("settings", {}).get("slice_size"):
        log.warning(
            "%s: the slices were resized at export; validation (and evaluation.py) predict the prepared volumes at "
            "their own size, so the model sees another scale there",
            record,
        )
    return list(fileio.load_npy(labels).shape[1:])


def resolve_config(overrides: dict, dataset: PreparedDataset, replicas: int = 1) -> dict:
    """Fill every setting: flags/config file first, then planned values, then defaults. Validates the result.

    Raises:
        ValueError: an unknown setting, a value of the wrong type, or settings that do not fit together.
        FileNotFoundError: ``source`` stacks that were not exported.
    """
    check_settings(overrides)
    chosen = {k: v for k, v in overrides.items() if v is not None and k not in RUN_KEYS}
    config = copy.deepcopy({**DEFAULTS, **chosen})
    ndim = spatial_dims(config["model"])
    if config["patch_size"] is not None and len(config["patch_size"]) != ndim:
        raise ValueError(f"model {config['model']} needs a patch size of {ndim} numbers, got {config['patch_size']}")
    if not 0.0 <= config["foreground_ratio"] <= 1.0:
        raise ValueError(f"foreground_ratio must be within [0, 1], got {config['foreground_ratio']}")
    if not 0.0 <= config["val_overlap"] < 1.0:
        raise ValueError(f"val_overlap must be within [0, 1), got {config['val_overlap']}")
    target = None
    if config["source"] != "volumes":
        rows = _stack_row_shape(dataset, config["source"])
        if len(rows) != ndim:
            raise ValueError(
                f"{config['source']}/ rows are {len(rows)}D {rows}; model {config['model']} is {ndim}D "
                f"(use a {len(rows)}d model)"
            )
        target = rows
    augmentation_settings(config["augment"], ndim, config["augmentation"])
    get_loss(config["loss"], **config["loss_args"])
    planned = planning.plan(
        config["model"],
        dataset.fingerprint,
        dataset.num_channels,
        dataset.num_classes,
        model_args=recipe_model_args(config),
        patch_size=config["patch_size"],
        batch_size=config["batch_size"],
        memory_gb=config["memory_budget"],
        target_shape=target,
    )
    config.update(patch_size=planned["patch_size"], batch_size=planned["batch_size"], model_args=planned["model_args"])
    config["plan"] = planned["plan"]
    config["replicas"] = replicas
    config["global_batch_size"] = config["batch_size"] * replicas
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


PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [245, 130, 48], [145, 30, 180]],
    dtype=np.uint8,
)


def side_by_side(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, min_size: int = 128) -> np.ndarray:
    """``image | truth | prediction`` as one RGB ``uint8`` picture: the slice ``(H, W, C)`` (first channel, scaled
    between its 0.5 and 99.5 percentiles) in grey, the label maps ``(H, W)`` in class colours; enlarged by pixel
    repetition to at least ``min_size`` rows."""
    channel = np.asarray(image, dtype=np.float32)[..., 0]
    low, high = np.percentile(channel, [0.5, 99.5])
    grey = np.clip((channel - low) / max(high - low, 1e-6), 0, 1)
    grey = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
    colour = [PALETTE[np.asarray(m, dtype=np.intp) % len(PALETTE)] for m in (truth, pred)]
    gap = np.full((grey.shape[0], 2, 3), 255, dtype=np.uint8)
    strip = np.concatenate([grey, gap, colour[0], gap, colour[1]], axis=1)
    factor = max(1, int(math.ceil(min_size / strip.shape[0])))
    return np.repeat(np.repeat(strip, factor, axis=0), factor, axis=1)


class Validation(keras.callbacks.Callback):
    """After each epoch, predict every validation volume whole (:func:`utils.inference.predict_volume`) and log
    ``val_dice`` (mean foreground dice over cases) and ``val_dice_<k>`` per class. Keeps, for the first
    ``num_examples`` cases, the axial slice with the most foreground as ``(image, truth, prediction)``."""

    def __init__(self, dataset: PreparedDataset, case_ids: Sequence[str], config: dict, num_examples: int = 0):
        super().__init__()
        self.dataset, self.case_ids, self.config = dataset, list(case_ids), config
        self.num_examples = num_examples
        self.examples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def evaluate(self) -> dict:
        num_classes = self.config["num_classes"]
        means, per_class = [], []
        for i, case_id in enumerate(self.case_ids):
            image, truth = self.dataset.image(case_id), np.asarray(self.dataset.label(case_id))
            probabilities = predict_volume(
                self.model,
                image,
                self.config["patch_size"],
                num_classes,
                overlap=self.config["val_overlap"],
                batch_size=self.config["batch_size"],
            )
            pred = np.argmax(probabilities, -1)
            mean, classes = mean_foreground_dice(pred, truth, num_classes)
            means.append(mean)
            per_class.append(classes)
            if i < self.num_examples:
                z = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(axis=1)))
                self.examples[case_id] = (np.asarray(image[z]), truth[z], pred[z])
        logs = {"val_dice": float(np.nanmean(means)) if np.isfinite(means).any() else float("nan")}
        for k, values in enumerate(np.array(per_class, dtype=float).T, start=1):
            logs[f"val_dice_{k}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        return logs

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.case_ids:
            logs.update(self.evaluate())


def monitored_score(logs: dict) -> float:
    """The score that picks the best model: ``val_dice``, else the training foreground dice."""
    if "val_dice" in logs:
        return float(logs["val_dice"])
    for key, value in logs.items():
        if key.endswith("fg_dice") and not key.startswith("val_"):
            return float(value)
    return float("nan")


class LearningRate(keras.callbacks.Callback):
    """The learning rate of every step: warm-up, then ``poly`` ``(1 - p) ** 0.9`` (nnU-Net), ``cosine``
    ``(1 + cos(pi p)) / 2``, ``plateau`` (times ``plateau_factor`` after ``plateau_patience`` epochs without a better
    score) or ``none``.

    The progress ``p`` is the larger of the fraction of epochs done and, under a time limit, the fraction of the time
    used. Within an epoch the time is extrapolated from the time at its start and the previous epoch's step time, so
    every host of a distributed run computes the same rate, and the rate is a function of ``state`` and the step.
    ``state`` (plateau scale, best score, epochs without improvement, last step time) goes to ``state.json``.
    """

    def __init__(self, config: dict, base_lr: float, clock: Callable[[], float], distribution: Distribution, state):
        super().__init__()
        self.config, self.base_lr, self.clock, self.distribution = config, base_lr, clock, distribution
        self.limit = float(config["time_limit"]) * 60 if config["time_limit"] else None
        self.state = {"scale": 1.0, "best": float("nan"), "wait": 0, "step_time": 0.0, **(state or {})}
        self.epoch, self.epoch_start = 0, 0.0

    def progress(self, batch: int) -> float:
        steps = self.config["steps_per_epoch"]
        done = (self.epoch + batch / steps) / self.config["epochs"]
        if self.limit:
            done = max(done, (self.epoch_start + batch * self.state["step_time"]) / self.limit)
        return float(min(done, 1.0))

    def rate(self, batch: int) -> float:
        schedule, progress = self.config["schedule"], self.progress(batch)
        if schedule == "poly":
            factor = (1 - progress) ** self.config["poly_exponent"]
        elif schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = self.state["scale"]
        warmup = self.config["warmup_epochs"]
        epochs_done = self.epoch + (batch + 1) / self.config["steps_per_epoch"]
        if warmup > 0 and epochs_done < warmup:
            factor *= epochs_done / warmup
        return max(self.base_lr * factor, self.config["min_lr"])

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_start = self.distribution.agree(self.clock())

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.rate(batch)

    def on_epoch_end(self, epoch, logs=None):
        steps = self.config["steps_per_epoch"]
        train_time = self.distribution.agree(self.clock()) - self.epoch_start
        self.state["step_time"] = float(train_time / steps)
        if logs is None:
            return
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.config["schedule"] == "plateau":
            score = monitored_score(logs)
            if np.isfinite(score) and not (score <= self.state["best"]):
                self.state.update(best=float(score), wait=0)
            else:
                self.state["wait"] += 1
                if self.state["wait"] >= self.config["plateau_patience"]:
                    self.state.update(scale=self.state["scale"] * self.config["plateau_factor"], wait=0)
                    log.info("plateau: learning rate now %.3g", self.base_lr * self.state["scale"])


class TensorBoard(keras.callbacks.Callback):
    """Scalars (every logged value and the learning rate) and ``image | truth | prediction`` pictures of the
    validation slices, each epoch, into ``tensorboard/`` (see :func:`utils.distribute.summary_writer`)."""

    def __init__(self, writer, validation: Validation):
        super().__init__()
        self.writer, self.validation = writer, validation

    def on_epoch_end(self, epoch, logs=None):
        scalars = {("val/" if k.startswith("val_") else "train/") + k: v for k, v in (logs or {}).items()}
        self.writer.scalars(scalars, step=epoch)
        pictures = {f"val_slices/{case}": side_by_side(*views) for case, views in self.validation.examples.items()}
        if pictures:
            self.writer.images(pictures, step=epoch)

    def on_train_end(self, logs=None):
        self.writer.close()


class RunRecorder(keras.callbacks.Callback):
    """After each epoch: checkpoints (best and last), ``state.json``, ``history.csv``, ``curves.png`` (chief host
    only), then the stopping rules: the time limit (stop when another epoch would not fit in the remaining time) and
    early stopping (``patience`` epochs without a better score). Every host takes the same decision."""

    def __init__(self, run_dir: Path, history: list[dict], state: dict, clock, config: dict, schedule: LearningRate,
                 distribution: Distribution):  # fmt: skip
        super().__init__()
        self.run_dir, self.history, self.state = run_dir, history, state
        self.clock, self.config, self.schedule, self.distribution = clock, config, schedule, distribution
        self.limit = float(config["time_limit"]) * 60 if config["time_limit"] else None
        self.epoch_start = 0.0
        self.durations: list[float] = list(state.get("durations", []))

    @property
    def best(self) -> float:
        return float(self.state["best"])

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        score = monitored_score(logs)
        improved = np.isfinite(score) and (not np.isfinite(self.best) or score > self.best)
        chief = self.distribution.is_chief
        if improved:
            self.state.update(best=float(score), best_epoch=epoch)
            if chief:
                save_model(self.model, self.run_dir / "model.keras")
        elapsed = self.distribution.agree(self.clock())
        self.durations.append(elapsed - self.epoch_start)
        row = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}, "time_s": round(elapsed, 1)}
        self.history.append(row)
        self.state.update(
            epoch=epoch + 1, elapsed_s=elapsed, schedule=self.schedule.state, durations=self.durations[-3:]
        )
        if chief:
            save_model(self.model, self.run_dir / "last.keras")
            write_history(self.run_dir / "history.csv", self.history)
            fileio.write_json(self.run_dir / STATE_FILE, self.state)
            plot_curves(self.history, self.run_dir / "curves.png")
        if self.limit and elapsed + np.mean(self.durations[-3:]) > self.limit:
            log.info("time limit reached after epoch %d (%.1f min)", epoch + 1, elapsed / 60)
            self.model.stop_training = True
        patience = self.config["early_stopping"]
        if patience > 0 and epoch - int(self.state.get("best_epoch", epoch)) >= patience:
            log.info("early stopping: no better score for %d epochs", patience)
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
        rows = [
            {k: (float(v) if v not in ("", None) else float("nan")) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]
    for row in rows:
        if "epoch" in row:
            row["epoch"] = int(row["epoch"])
    return rows


def make_optimizer(config: dict, lr: float) -> keras.optimizers.Optimizer:
    """Adam, or SGD with Nesterov momentum; ``grad_clip`` clips the global gradient norm (nnU-Net: 12)."""
    options = {"learning_rate": lr, "global_clipnorm": config["grad_clip"]}
    if config["weight_decay"]:
        options["weight_decay"] = config["weight_decay"]
    if config["optimizer"] == "adam":
        return keras.optimizers.Adam(**options)
    return keras.optimizers.SGD(momentum=config["momentum"], nesterov=True, **options)


def compile_model(model: keras.Model, config: dict, lr: float) -> list[tuple[int, ...]] | None:
    """Compile with the configured loss; a model with several outputs (deep supervision) gets one weighted loss per
    output. Returns the target stride of each output, or ``None`` for a single output."""
    optimizer = make_optimizer(config, lr)
    outputs = model.outputs
    if len(outputs) == 1:
        model.compile(
            optimizer=optimizer,
            loss=get_loss(config["loss"], **config["loss_args"]),
            metrics=[MeanForegroundDice(config["num_classes"])],
        )
        return None
    model.compile(
        optimizer=optimizer,
        metrics=[[MeanForegroundDice(config["num_classes"])]] + [[] for _ in outputs[1:]],
        **deep_supervision_compile_args(config["loss"], len(outputs), **config["loss_args"]),
    )
    return output_strides(model, config["patch_size"])


def output_strides(model: keras.Model, patch_size: Sequence[int]) -> list[tuple[int, ...]] | None:
    if len(model.outputs) == 1:
        return None
    return [tuple(p // s for p, s in zip(patch_size, out.shape[1:-1], strict=True)) for out in model.outputs]


def make_sampler(config: dict, dataset: PreparedDataset, distribution: Distribution, start_epoch: int, strides):
    """The training sampler of the configured ``source``; under ``tf.distribute`` each replica draws its own
    ``batch_size``, else this process draws the batch of its local replicas."""
    ndim = len(config["patch_size"])
    augment = None
    if config["augment"] != "none" or config["augmentation"]:
        augment = Augmenter(augmentation_settings(config["augment"], ndim, config["augmentation"]), ndim)
    per_call = config["batch_size"] * (1 if distribution.strategy is not None else distribution.local_replicas)
    options = dict(
        batch_size=per_call,
        steps_per_epoch=config["steps_per_epoch"],
        foreground_ratio=config["foreground_ratio"],
        augment=augment,
        seed=config["seed"],
        start_epoch=start_epoch,
        shard=distribution.worker_index,
        target_strides=strides,
        random_padding=config["pad_placement"] == "random",
    )
    if distribution.strategy is None and config["workers"] > 1:
        options.update(
            workers=config["workers"],
            use_multiprocessing=config["worker_mode"] == "process",
            max_queue_size=2 * config["workers"],
        )
    if config["source"] == "volumes":
        train_ids = dataset.split("train")
        labelled = [c for c in train_ids if dataset.cases[c].get("label")]
        if not labelled:
            raise ValueError(f"{dataset.path / 'splits.json'}: the train split holds no labelled case")
        return PatchSampler(
            dataset.image, dataset.label, labelled, config["patch_size"], config["num_classes"], **options
        )
    images, labels = stack_paths(dataset, config["source"], "train")
    return StackSampler(
        fileio.load_npy(images), fileio.load_npy(labels), config["patch_size"], config["num_classes"], **options
    )


def train(config_overrides: dict) -> dict:
    """Train a model as configured and write the run folder; returns the resolved config with the best score.

    Args:
        config_overrides: settings from flags or a config file (keys of :data:`SETTINGS`); ``data`` and ``output``
            are required, ``resume`` continues the run in ``output``.

    Raises:
        FileNotFoundError: the prepared dataset is missing; or ``resume`` without a previous run.
        ValueError: a bad setting, or a run folder made for another dataset.
    """
    check_settings(config_overrides)
    dataset = PreparedDataset(config_overrides["data"])
    run_dir = Path(config_overrides["output"])
    resume = bool(config_overrides.get("resume"))
    saved = _resume_config(run_dir, dataset, config_overrides) if resume else None
    strategy = (saved or config_overrides).get("strategy") or DEFAULTS["strategy"]
    distribution = make_distribution(strategy)
    previous_policy = keras.config.dtype_policy()
    try:
        return _train(config_overrides, dataset, run_dir, saved, distribution)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if keras.backend.backend() == "jax" and distribution.name != "default":
            keras.distribution.set_distribution(None)


def _train(overrides: dict, dataset: PreparedDataset, run_dir: Path, saved, distribution: Distribution) -> dict:
    config = saved or resolve_config(overrides, dataset, distribution.num_replicas)
    config["output"] = str(run_dir)
    if config["deterministic"]:
        enable_determinism()
    keras.utils.set_random_seed(int(config["seed"]))
    if config["mixed_precision"]:
        config["precision_policy"] = config.get("precision_policy") or mixed_precision_policy()
        keras.config.set_dtype_policy(config["precision_policy"])
    lr = distribution.scaled_lr(config["lr"], config["lr_scaling"])
    fresh = {"epoch": 0, "best": float("nan"), "elapsed_s": 0.0, "schedule": {}}
    state = {**fresh, **fileio.read_json(run_dir / STATE_FILE)} if saved else fresh
    with distribution.scope():
        if saved:
            model = load_model(run_dir / "last.keras")
            strides = output_strides(model, config["patch_size"])
        else:
            model = build(config, dataset.num_channels, dataset.num_classes)
            strides = compile_model(model, config, lr)
    if distribution.is_chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        fileio.write_json(run_dir / "config.json", config)
        fileio.write_text(run_dir / "model_summary.txt", model_zoo.model_summary_text(model))

    sampler = make_sampler(config, dataset, distribution, int(state["epoch"]), strides)
    started = time.monotonic() - float(state["elapsed_s"])

    def clock() -> float:
        return time.monotonic() - started

    history = read_history(run_dir / "history.csv")[: int(state["epoch"])] if saved else []
    schedule = LearningRate(config, lr, clock, distribution, state.get("schedule"))
    examples = config["tensorboard_images"] if config["tensorboard"] else 0
    validation = Validation(dataset, dataset.split("val"), config, num_examples=examples)
    recorder = RunRecorder(run_dir, history, state, clock, config, schedule, distribution)
    callbacks = [schedule, validation]
    writer = summary_writer(run_dir / "tensorboard") if config["tensorboard"] and distribution.is_chief else None
    if writer is not None:
        callbacks.append(TensorBoard(writer, validation))
    callbacks.append(recorder)
    limit = float(config["time_limit"]) * 60 if config["time_limit"] else None
    if state["epoch"] < config["epochs"] and not (limit and clock() >= limit) and not _stopped_early(state, config):
        distribution.prepare_fit(model, sampler)
        with guarded(distribution.input_for_fit(sampler, config["workers"])) as (data, watch):
            model.fit(
                data,
                epochs=config["epochs"],
                steps_per_epoch=config["steps_per_epoch"],
                initial_epoch=int(state["epoch"]),
                callbacks=[*callbacks, *watch],
                shuffle=False,
                verbose=2 if os.environ.get("CI") else "auto",
            )
    config["best_val_dice"] = recorder.best
    config["epochs_done"] = int(recorder.state["epoch"])
    return config


def _stopped_early(state: dict, config: dict) -> bool:
    patience = config["early_stopping"]
    return patience > 0 and "best_epoch" in state and state["epoch"] - 1 - state["best_epoch"] >= patience


def _resume_config(run_dir: Path, dataset: PreparedDataset, overrides: dict) -> dict:
    for name in ("config.json", "last.keras", STATE_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name}: not found; cannot --resume (start without --resume)")
    config = fileio.read_json(run_dir / "config.json")
    if config.get("labels") != dataset.labels or config.get("num_channels") != dataset.num_channels:
        raise ValueError(f"{run_dir}: the run was made for a dataset with other labels or channels than {dataset.path}")
    config = {**DEFAULTS, **config}
    changed = sorted(
        key
        for key, value in overrides.items()
        if key in SETTINGS and key not in RESUME_MAY_CHANGE and value is not None and _differs(value, config.get(key))
    )
    if changed:
        raise ValueError(
            f"--resume continues {run_dir} with its saved settings; these differ: {changed} "
            f"(only {', '.join(RESUME_MAY_CHANGE)} may change)"
        )
    for key in RESUME_MAY_CHANGE:
        if overrides.get(key) is not None:
            config[key] = overrides[key]
    return config


def _differs(value, saved) -> bool:
    if isinstance(value, list | tuple) and isinstance(saved, list | tuple):
        return list(value) != list(saved)
    if isinstance(value, dict) and isinstance(saved, dict):
        return any(_differs(v, saved.get(k)) for k, v in value.items())
    return value != saved
