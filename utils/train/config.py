"""The training settings: every key a config file or a flag may set, its default and its type; checking them;
resolving them against a prepared dataset (planned patch and batch size, backend and versions) into the run's
``config.json``; and the rules for ``--resume``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import platform
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

import model as model_zoo
from utils import fileio
from utils.backbones import FIXED_BY_ENCODER
from utils.losses import get_loss
from utils.prepared import PreparedDataset
from utils.runs import TrainingConfig, fold_folder, load_config
from utils.settings import RECIPES, RESUME_MAY_CHANGE, TRAINING, defaults, gpu_workers
from utils.train import planning
from utils.train.augment import augmentation_settings

log = logging.getLogger(__name__)


RUN_KEYS = ("data", "output", "resume")
STATE_FILE = "state.json"


def check_settings(settings: dict) -> None:
    """Refuse unknown keys and values of the wrong type, quoting them, before any work is done.

    Raises:
        ValueError: naming the first bad key and its value.
    """
    unknown = sorted(set(settings) - set(TRAINING) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(TRAINING)}")
    for key, value in settings.items():
        if key not in RUN_KEYS:
            TRAINING[key].check(key, value)


def model_family(name: str) -> str:
    return name[:-2] if name.endswith(("2d", "3d")) else name


def spatial_dims(name: str, patch_size: Sequence[int] | None = None) -> int:
    """2 or 3, from the model's name; a user's builder (``FILE.py:FUNCTION``) takes it from the patch size."""
    if model_zoo.is_user_builder(name):
        if not patch_size:
            raise ValueError(
                f"model {name}: give --patch-size (H W for 2D, D H W for 3D); only the toolkit's own "
                "architectures are planned"
            )
        return len(patch_size)
    if not name.endswith(("2d", "3d")):
        raise ValueError(f"model name {name!r} must end with 2d or 3d")
    return int(name[-2])


def recipe_model_args(config: dict, recipe: str = "cpu") -> dict:
    """The architecture's defaults in the device recipe (:data:`utils.settings.RECIPES`) overridden by
    ``model_args``."""
    defaults_of_recipe = RECIPES[recipe]["model_defaults"].get(model_family(config["model"]), {})
    return {**defaults_of_recipe, **(config.get("model_args") or {})}


def recipe_settings(recipe: str) -> dict:
    """The settings the device recipe changes from the defaults (``cpu``: none)."""
    settings = dict(RECIPES[recipe]["settings"])
    if recipe == "gpu":
        settings["workers"] = gpu_workers()
    return settings


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


def resolve_config(
    overrides: dict, dataset: PreparedDataset, replicas: int = 1, devices: Sequence[str] = ()
) -> TrainingConfig:
    """Fill every setting: flags/config file first, then planned values, then the recipe of the device (``gpu`` when
    ``devices`` names accelerators, else ``cpu``), then the defaults. Validates the result.

    Raises:
        ValueError: an unknown setting, a value of the wrong type, or settings that do not fit together.
        FileNotFoundError: ``source`` stacks that were not exported.
    """
    check_settings(overrides)
    chosen = {k: v for k, v in overrides.items() if v is not None and k not in RUN_KEYS}
    recipe = "gpu" if devices else "cpu"
    config = copy.deepcopy({**defaults(TRAINING), **recipe_settings(recipe), **chosen})
    ndim = spatial_dims(config["model"], config["patch_size"])
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
    encoder = _backbone_args(config)
    if model_zoo.is_user_builder(config["model"]):
        planned = _user_builder_plan(config)
    else:
        planned = planning.plan(
            config["model"],
            dataset.fingerprint,
            dataset.num_channels,
            dataset.num_classes,
            model_args={**recipe_model_args(config, recipe), **encoder},
            patch_size=config["patch_size"],
            batch_size=config["batch_size"],
            memory_gb=config["memory_budget"],
            target_shape=target,
            recipe=recipe,
        )
    if encoder:  # recorded once, as config.backbone; the encoder fixes the depth and the down-sampling
        for key in ("backbone", *FIXED_BY_ENCODER):
            planned["model_args"].pop(key, None)
    config.update(patch_size=planned["patch_size"], batch_size=planned["batch_size"], model_args=planned["model_args"])
    if "lr" in planned and "lr" not in chosen:
        config["lr"] = planned["lr"] * config["lr"]
    config["plan"] = planned["plan"]
    config["recipe"] = recipe
    config["replicas"] = replicas
    config["global_batch_size"] = config["batch_size"] * replicas
    config["num_classes"] = dataset.num_classes
    config["num_channels"] = dataset.num_channels
    config["labels"] = dataset.labels
    config["channels"] = dataset.manifest["channels"]
    config["dataset_preprocessing"] = dataset.manifest["preprocessing"]
    config["data"] = str(Path(overrides["data"]).resolve())
    if model_zoo.is_user_builder(config["model"]):
        config["model_source"] = model_zoo.builder_source(config["model"])
    config["backend"] = keras.backend.backend()
    config["versions"] = {"keras": keras.__version__, "numpy": np.__version__, "python": platform.python_version()}
    config["versions"][config["backend"]] = _backend_version(config["backend"])
    return TrainingConfig(**config)


def _backbone_args(config: dict) -> dict:
    """Check ``backbone``, ``encoder_weights`` and ``freeze_encoder_epochs`` (a backbone given in ``model_args`` moves
    to ``backbone``; a weights file is recorded by its absolute path) and return the planner's extra option.

    Raises:
        ValueError: encoder options without a backbone, or a backbone for another model than unet2d.
        FileNotFoundError: the weights file does not exist.
    """
    args = config["model_args"]
    for key in ("backbone", "encoder_weights"):
        if key in args:
            given = args.pop(key)
            config[key] = config[key] or given
    backbone, weights = config["backbone"], config["encoder_weights"]
    if backbone is None:
        for key in ("encoder_weights", "freeze_encoder_epochs"):
            if config[key]:
                raise ValueError(f"--{key.replace('_', '-')} {config[key]} needs --backbone (a pretrained encoder)")
        return {}
    if config["model"] != "unet2d":
        raise ValueError(f"--backbone {backbone}: pretrained encoders serve unet2d only, not {config['model']}")
    if weights not in (None, "imagenet"):
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: --encoder-weights file not found (give imagenet or a weights file)")
        config["encoder_weights"] = str(Path(weights).resolve())
    return {"backbone": backbone}


def _user_builder_plan(config: dict) -> dict:
    """A user's builder is not planned: its patch size is the one given, its batch the planner's rule for that patch;
    the builder is imported and checked here, before any work."""
    model_zoo.load_builder(config["model"])
    patch = list(config["patch_size"])
    batch = config["batch_size"] or planning.target_batch_size(patch)
    plan = {"user_builder": model_zoo.builder_source(config["model"]), "patch_size": "given", "batch_size": "given"}
    if not config["batch_size"]:
        plan["batch_size"] = "the planner's rule for the patch (no memory estimate)"
    return {"patch_size": patch, "batch_size": batch, "model_args": dict(config["model_args"]), "plan": plan}


def _backend_version(backend: str) -> str:
    try:
        return __import__(backend).__version__
    except (ImportError, AttributeError):
        return "unknown"


def fold_run(overrides: dict, dataset: PreparedDataset) -> tuple[PreparedDataset, Path]:
    """The dataset as the run sees it and the run folder: with ``fold`` I, fold I's train and val splits of
    ``splits.json`` and ``output/fold_I`` (a complete run folder of its own); without, the dataset and ``output``.

    Raises:
        ValueError: a fold ``splits.json`` does not hold (naming it), or a fold trained from exported stacks.
    """
    run_dir, fold = Path(overrides["output"]), overrides.get("fold")
    if fold is None:
        return dataset, run_dir
    if (overrides.get("source") or "volumes") != "volumes":
        raise ValueError(
            f"--fold {fold} trains from volumes/ only (the exported slices/ and patches/ stacks hold fold 0's split); "
            "leave out --source"
        )
    return dataset.with_fold(int(fold)), fold_folder(run_dir, fold)


def _resume_config(run_dir: Path, dataset: PreparedDataset, overrides: dict) -> TrainingConfig:
    for name in ("config.json", "last.keras", STATE_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name}: not found; cannot --resume (start without --resume)")
    config = load_config(run_dir)
    if config.labels != dataset.labels or config.num_channels != dataset.num_channels:
        raise ValueError(f"{run_dir}: the run was made for a dataset with other labels or channels than {dataset.path}")
    changed = sorted(
        key
        for key, value in overrides.items()
        if key in TRAINING
        and key not in RESUME_MAY_CHANGE
        and value is not None
        and _differs(value, getattr(config, key))
    )
    if changed:
        raise ValueError(
            f"--resume continues {run_dir} with its saved settings; these differ: {changed} "
            f"(only {', '.join(RESUME_MAY_CHANGE)} may change)"
        )
    steering = {key: overrides[key] for key in RESUME_MAY_CHANGE if overrides.get(key) is not None}
    return dataclasses.replace(config, **steering)


def _differs(value, saved) -> bool:
    if isinstance(value, list | tuple) and isinstance(saved, list | tuple):
        return list(value) != list(saved)
    if isinstance(value, dict) and isinstance(saved, dict):
        return any(_differs(v, saved.get(k)) for k, v in value.items())
    return value != saved
