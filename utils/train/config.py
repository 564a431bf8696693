"""The training settings: every key a config file or a flag may set, its default and its type; checking them;
resolving them against a prepared dataset (planned patch and batch size, backend and versions) into the run's
``config.json``; and the rules for ``--resume``.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
from pathlib import Path

import keras
import numpy as np

import model as model_zoo
from utils import fileio
from utils.losses import LOSSES, get_loss
from utils.prepared import PreparedDataset
from utils.train import planning
from utils.train.augment import PRESETS, augmentation_settings
from utils.train.distribute import STRATEGIES

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
