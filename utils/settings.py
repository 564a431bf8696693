"""Every choice and default that the three scripts show, in one place.

``data_gen.py``, ``train.py`` and ``evaluation.py`` build their flags (choices, defaults, help) from the tables
below, and the library modules take their choice lists from here, so a default is written once. A test checks that
every flag's default equals its setting's. This module imports nothing heavy: ``--help`` stays instant.

A :class:`Setting` says what a value must be with plain Python types: ``type`` (``int``, ``float``, ``bool``,
``str``, ``dict`` or ``list``), ``choices``, ``minimum`` (inclusive), ``positive`` (``> 0``) and, for lists, the
type and bounds of every ``item``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

# Names whose implementations live in heavier modules; tests check that they match (model.MODELS, utils.losses.LOSSES,
# utils.formats.FORMATS, utils.metrics.METRICS).
MODEL_NAMES = (
    "unet2d",
    "unet3d",
    "resunet2d",
    "resunet3d",
    "attention_unet2d",
    "attention_unet3d",
    "dilated2d",
    "dilated3d",
    "fcn2d",
    "fcn3d",
    "twopath2d",
)
# A user's builder instead of a name: a Python file or an importable module, and a function with build_model's
# signature.
USER_MODEL_PATTERN = r"[^:\s]+\.py:[A-Za-z_]\w*|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"
# Pretrained 2D encoders of unet2d (keras.applications; utils.backbones.BACKBONES).
BACKBONE_NAMES = (
    "resnet50",
    "efficientnetb0",
    "efficientnetb1",
    "efficientnetb2",
    "efficientnetb3",
    "convnext_tiny",
    "densenet121",
)
LOSS_NAMES = ("dice", "gdl", "dice_ce", "gdl_ce", "ce", "weighted_ce", "tversky", "focal", "dice_focal")
LAYOUTS = ("msd", "files", "hdf5", "brats", "dicom", "png", "nnunet", "folders")
METRIC_NAMES = ("dice", "iou", "hd95", "assd", "nsd", "precision", "sensitivity", "volume_truth_ml", "volume_pred_ml")
# Scores logged each epoch besides the dice (utils.metrics.TRAINING_METRICS): fg_<name> on the training batches,
# val_<name> on the validation cases.
TRAINING_METRIC_NAMES = ("iou", "fscore")

# Preparation (data_gen.py).
WINDOW_PRESETS = {
    "soft_tissue": (-135.0, 250.0),
    "liver": (-100.0, 200.0),
    "lung": (-1000.0, 400.0),
    "brain": (0.0, 80.0),
    "bone": (-450.0, 1050.0),
}
NORMALIZATIONS = ("auto", "zscore", "zscore_dataset", "zscore_nonzero", "minmax", "ct", "none")
EQUALIZATIONS = ("none", "hist", "clahe")
CROPS = ("none", "foreground", "nonzero")
INTERPOLATIONS = {"nearest": 0, "linear": 1, "bspline": 3}
EXPORT_KINDS = ("volumes", "slices", "patches")
SLICE_FILTERS = ("all", "foreground")
PATCH_SAMPLINGS = ("random", "grid")
# Exported slices of different in-plane sizes are padded to one size: along each axis the largest size that is at
# most this many times the median (utils/prepare/exports.py, plan_slice_size); larger slices are cropped around
# their foreground or tiled.
SLICE_SIZE_OUTLIER = 1.5

# Training (train.py).
SOURCES = ("volumes", "slices", "patches")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("poly", "cosine", "plateau", "none")
LR_SCALINGS = ("none", "linear", "sqrt")
WORKER_MODES = ("thread", "process")
PAD_PLACEMENTS = ("centre", "random")
AUGMENT_PRESETS = ("none", "default", "light", "strong")
STRATEGIES = ("default", "mirrored", "multiworker")
VALIDATION_MODES = ("auto", "volumes", "patches")
DEFAULT_MEMORY_GB = 8.0
# 2D plans on a CPU keep a training step near STEP_SECONDS: the batch (and the patch of the models trained on
# patches) is capped at what the CPU trains in that time, from the model's floating-point operations per sample
# and cores x CPU_GFLOPS_PER_CORE of the CPU's kind (utils/train/planning.py). Measured with TensorFlow on an AMD
# EPYC with AVX-512 (2 cores): the CPU recipe's 2D U-Net trains at about 60 GFLOP/s per core (oneDNN), the two-path
# CNN at about 30 (XLA); the lower is kept, and the other kinds are scaled by vector width. On a GPU the memory
# plan stands.
STEP_SECONDS = 1.0
CPU_GFLOPS_PER_CORE = {"amx": 30.0, "avx512": 30.0, "avx2": 15.0, "avx": 8.0, "other": 8.0}
# Architectures trained on patches of their receptive field and applied fully convolutionally to whole slices.
WHOLE_SLICE_MODELS = ("twopath2d",)

# Evaluation (evaluation.py).
BLENDS = ("gaussian", "constant")
PICTURES = ("all", "overlays", "none")
POSTPROCESS_CHOICES = ("none", "lcc", "auto")
CONNECTIVITIES = (1, 2, 3)
ENGINES = ("keras", "onnx")


@dataclass(frozen=True)
class Setting:
    """One setting: its default, what a value must be, and the sentence ``--help`` shows.

    Attributes:
        default: the value used when nobody sets it; ``None`` means "planned" or "off" (the help says which).
        help: the flag's help, without the default (added by :meth:`help_text`).
        type: ``int``, ``float``, ``bool``, ``str``, ``dict`` or ``list``.
        choices: the allowed values, if only some are.
        minimum: the smallest allowed number (inclusive).
        positive: numbers must be ``> 0``.
        item: for lists, the type of each item (bounds from ``minimum`` / ``positive`` apply to items).
        metavar: the flag's placeholder in ``--help``.
        default_text: how the default reads in ``--help`` when ``str(default)`` would not say it well.
        pattern: a regular expression of strings allowed besides ``choices`` (a user's builder for ``model``).
        pattern_text: how those strings read in messages, e.g. ``FILE.py:FUNCTION``.
    """

    default: Any
    help: str
    type: type = str
    choices: tuple | None = None
    minimum: float | None = None
    positive: bool = False
    item: type | None = None
    metavar: str | None = None
    default_text: str | None = None
    pattern: str | None = None
    pattern_text: str | None = None

    def check(self, key: str, value: Any) -> None:
        """Raise a ``ValueError`` quoting ``key`` and ``value`` when ``value`` is not allowed (``None`` always is)."""
        if value is None:
            return
        is_list = self.type is list
        values = list(value) if is_list and isinstance(value, list | tuple) else [value]
        allowed = (not is_list or isinstance(value, list | tuple)) and all(
            self._fits(v, self.item if is_list else self.type) for v in values
        )
        if allowed and self.choices is not None:
            allowed = all(self.allows(v) for v in values)
        if not allowed:
            raise ValueError(f"setting {key!r} must be {self.describe()}, got {value!r}")

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is one of the ``choices`` or a string matching ``pattern``."""
        if self.choices is None or value in self.choices:
            return True
        return self.pattern is not None and isinstance(value, str) and re.fullmatch(self.pattern, value) is not None

    def _fits(self, value: Any, kind: type | None) -> bool:
        if kind in (int, float):
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if not is_number or (kind is int and not isinstance(value, int)) or not math.isfinite(value):
                return False
            if self.minimum is not None and value < self.minimum:
                return False
            return not (self.positive and value <= 0)
        return isinstance(value, kind) if kind is not None else True

    def describe(self) -> str:
        """What a value must be, in words: ``one of ['adam', 'sgd']``, ``an integer >= 1``, ``a positive number``."""
        if self.choices is not None:
            extra = f" or {self.pattern_text}" if self.pattern_text else ""
            return f"{'a list of values from' if self.type is list else 'one of'} {list(self.choices)}{extra}"
        if self.type is list:
            noun = {int: "integers", float: "numbers", str: "strings"}.get(self.item, "values")
            return "a list of " + self._bounded(noun, article="")
        noun = {int: "integer", float: "number"}.get(self.type)
        if noun is None:
            return {bool: "true or false", dict: "a mapping", str: "a string"}.get(self.type, "a value")
        return self._bounded(noun, article="an " if noun == "integer" else "a ")

    def _bounded(self, noun: str, article: str) -> str:
        if self.positive:
            return f"{article and 'a '}positive {noun}"
        return f"{article}{noun}" + (f" >= {self.minimum:g}" if self.minimum is not None else "")

    def help_text(self) -> str:
        """The help sentence with ``(default: ...)`` appended."""
        if self.default_text is not None:
            shown = self.default_text
        elif isinstance(self.default, bool):
            shown = "on" if self.default else "off"
        elif isinstance(self.default, list | tuple):
            shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in self.default)
        elif isinstance(self.default, float):
            shown = f"{self.default:g}"
        else:
            shown = str(self.default)
        return f"{self.help} (default: {shown})"


def defaults(table: dict[str, Setting]) -> dict[str, Any]:
    """``{key: default}`` of a table (copies of mutable defaults)."""
    return {key: _copy(setting.default) for key, setting in table.items()}


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


_UNET_RECIPE = (
    "CPU: unet filters 16, instance norm, stem_stride 2, light augmentation; GPU: filters 32 up to 320, stem_stride 1, "
    "deep supervision, strong augmentation, sgd lr 0.01, mixed precision; depth planned"
)

TRAINING: dict[str, Setting] = {
    "model": Setting(
        "unet3d",
        "architecture: a name, or your own builder as FILE.py:FUNCTION or package.module:FUNCTION with build_model's "
        "signature (name, input_shape, num_classes, **kwargs); give it --patch-size",
        choices=MODEL_NAMES,
        pattern=USER_MODEL_PATTERN,
        pattern_text="FILE.py:FUNCTION",
    ),
    "model_args": Setting(
        {},
        'architecture options as JSON, e.g. \'{"filters": 32, "deep_supervision": true}\'',
        type=dict,
        metavar="JSON",
        default_text=f"{{}}, then the recipe ({_UNET_RECIPE})",
    ),
    "backbone": Setting(
        None,
        "unet2d only: a pretrained 2D encoder from keras.applications under the U-Net decoder (patch sizes multiples "
        "of 32); the image's channels reach its 3 through a learned 1x1 convolution",
        choices=BACKBONE_NAMES,
        default_text="none: the U-Net's own encoder",
    ),
    "encoder_weights": Setting(
        None,
        "weights of the --backbone: imagenet (Keras's cache, ~/.keras/models, downloaded by Keras on first use) or a "
        "weights file of the keras.applications model without its top (e.g. resnet50_..._notop.h5, or "
        "encoder.weights.h5 saved from a run's model.get_layer('encoder'))",
        metavar="imagenet|FILE",
        default_text="none: random",
    ),
    "freeze_encoder_epochs": Setting(
        0,
        "keep the --backbone's weights fixed for this many first epochs (the decoder and the input adapter learn), "
        "then train everything; the model is recompiled at each change",
        type=int,
        minimum=0,
        metavar="N",
    ),
    "loss": Setting("dice_ce", "loss", choices=LOSS_NAMES),
    "loss_args": Setting({}, "loss options as JSON, e.g. '{\"batch\": true}'", type=dict, metavar="JSON"),
    "source": Setting(
        "volumes",
        "train from volumes/, or from the slices/ or patches/ stacks of data_gen.py --export",
        choices=SOURCES,
    ),
    "patch_size": Setting(
        None,
        "D H W for 3D, H W for 2D",
        type=list,
        item=int,
        positive=True,
        metavar="N",
        default_text="planned from the median shape and --memory-budget",
    ),
    "batch_size": Setting(None, "samples per step per device", type=int, minimum=1, default_text="planned"),
    "memory_budget": Setting(
        DEFAULT_MEMORY_GB, "memory of one device the plan may use, in GiB", type=float, positive=True, metavar="GB"
    ),
    "epochs": Setting(1000, "maximum epochs (--time-limit usually ends first)", type=int, minimum=1),
    "steps_per_epoch": Setting(100, "steps per epoch", type=int, minimum=1),
    "lr": Setting(3e-3, "initial learning rate", type=float, positive=True),
    "optimizer": Setting("adam", "adam, or sgd with Nesterov momentum", choices=OPTIMIZERS),
    "momentum": Setting(0.99, "SGD momentum", type=float),
    "weight_decay": Setting(0.0, "decoupled weight decay", type=float),
    "schedule": Setting(
        "poly",
        "learning-rate decay over the epochs or the time limit, whichever ends first; plateau: times "
        "--plateau-factor after --plateau-patience epochs without a better validation dice",
        choices=SCHEDULES,
    ),
    "poly_exponent": Setting(0.9, "exponent of the poly schedule", type=float, positive=True),
    "warmup_epochs": Setting(0.0, "linear warm-up from 0 over this many epochs", type=float),
    "plateau_patience": Setting(10, "epochs without improvement before a cut", type=int, minimum=1),
    "plateau_factor": Setting(0.5, "learning-rate cut of the plateau schedule", type=float, positive=True),
    "min_lr": Setting(0.0, "floor of the learning rate", type=float),
    "grad_clip": Setting(
        None, "clip the global gradient norm to this (nnU-Net: 12)", type=float, positive=True, default_text="off"
    ),
    "lr_scaling": Setting("none", "scale the learning rate with the number of replicas", choices=LR_SCALINGS),
    "augment": Setting(
        "light",
        "augmentation preset: none; default (mirroring on every axis); light (mirroring, mild rotation and scaling, "
        "noise, brightness, contrast, gamma); strong (nnU-Net's rotation, scaling, "
        "elastic, noise, blur, brightness, contrast, low resolution, gamma, 90-degree turns, mirroring). Tune any "
        "transform with --augmentation or 'augmentation' in --config",
        choices=AUGMENT_PRESETS,
    ),
    "augmentation": Setting(
        {},
        'per-transform options as JSON, added to the preset, e.g. \'{"rotation": {"p": 0.3, "angle": [-15, '
        "15]}}'; transforms: rotation, scale, elastic, noise, blur, brightness, contrast, lowres, gamma, rot90, flip "
        "(options and defaults: utils/train/augment.py)",
        type=dict,
        metavar="JSON",
    ),
    "foreground_ratio": Setting(
        0.33,
        "expected share of samples placed on a foreground voxel, a class drawn uniformly among those present",
        type=float,
    ),
    "pad_placement": Setting(
        "centre",
        "where a case smaller than the patch sits in it: centred, or at a random offset (a shift)",
        choices=PAD_PLACEMENTS,
    ),
    "workers": Setting(
        1,
        "parallel batch builders (tf.data threads under --strategy; 1: built in the training loop); batches stay "
        "the same for any number of workers",
        type=int,
        minimum=1,
    ),
    "worker_mode": Setting("thread", "workers as threads or processes", choices=WORKER_MODES),
    "time_limit": Setting(
        None,
        "stop after the last whole epoch that fits in this many minutes (the schedule follows it)",
        type=float,
        positive=True,
        metavar="MINUTES",
        default_text="none",
    ),
    "early_stopping": Setting(
        0, "stop after this many epochs without a better validation dice (0: off)", type=int, metavar="EPOCHS"
    ),
    "val_overlap": Setting(0.5, "sliding-window overlap of validation", type=float),
    "validation": Setting(
        "auto",
        "what is scored after each epoch: volumes (every validation volume whole), patches (seeded validation "
        "patches, as nnU-Net does during training; evaluation.py scores whole volumes), or auto: volumes when they "
        "cost at most a fifth of an epoch's training work, else patches",
        choices=VALIDATION_MODES,
    ),
    "metrics": Setting(
        [],
        "scores logged each epoch besides the dice, as fg_<name> (training batches) and val_<name> (validation), "
        "in history.csv, curves.png and TensorBoard: iou (Jaccard), fscore (F1; on argmax masks it equals the dice, "
        "logged under the name the PNG workflow used); each a mean over the foreground classes",
        type=list,
        choices=TRAINING_METRIC_NAMES,
        default_text="none: the dice only",
    ),
    "tensorboard": Setting(True, "write tensorboard/ event files", type=bool),
    "tensorboard_images": Setting(
        3, "validation cases shown as image | truth | prediction in TensorBoard", type=int, metavar="N"
    ),
    "mixed_precision": Setting(
        False, "mixed_float16 with float32 outputs (on a CPU without float16 kernels: mixed_bfloat16)", type=bool
    ),
    "strategy": Setting(
        "default",
        "default: one device; mirrored: every local GPU (tf.distribute.MirroredStrategy; JAX: DataParallel); "
        "multiworker: several hosts from TF_CONFIG (MultiWorkerMirroredStrategy); --batch-size is per device",
        choices=STRATEGIES,
    ),
    "deterministic": Setting(False, "deterministic kernels: the same seed gives the same weights (slower)", type=bool),
    "seed": Setting(0, "seed of weights, batches and augmentation", type=int),
    "fold": Setting(
        None,
        "train fold I of the dataset's splits.json (data_gen.py --folds K or --splits FILE) into --output/fold_I/, "
        "a complete run folder; evaluation.py --run --output ensembles the folds found there",
        type=int,
        minimum=0,
        metavar="I",
        default_text="none: the train and val split",
    ),
}
# Settings a resumed run may change (they steer the run, not what is learnt).
RESUME_MAY_CHANGE = ("epochs", "time_limit", "early_stopping", "workers", "worker_mode", "tensorboard_images")
# The recipe follows the device train.py trains on; flags and config files override any part of it.
# cpu: the settings' defaults and a small U-Net, chosen for dice per CPU-minute (see benchmarks/RESULTS.md).
# gpu: nnU-Net's full-resolution recipe: 32 base filters up to 320 without a strided stem, deep supervision, strong
# augmentation, SGD 1e-2 with poly decay, mixed precision, and process workers to keep the GPU fed (gpu_workers()).
RECIPES = {
    "cpu": {
        "settings": {},
        "model_defaults": {"unet": {"filters": 16, "norm": "instance", "stem_stride": 2, "full_res_skip": 4}},
    },
    "gpu": {
        "settings": {
            "augment": "strong",
            "optimizer": "sgd",
            "lr": 1e-2,
            "schedule": "poly",
            "mixed_precision": True,
            "worker_mode": "process",
        },
        "model_defaults": {
            "unet": {"filters": 32, "max_filters": 320, "norm": "instance", "stem_stride": 1, "deep_supervision": True}
        },
    },
}


def gpu_workers(cpu_count: int | None = None) -> int:
    """Loader processes of the GPU recipe: one per CPU core but one, at most 8."""
    return max(1, min(8, (cpu_count or os.cpu_count() or 2) - 1))


PREPARE: dict[str, Setting] = {
    "format": Setting("auto", "input layout; auto detects it", choices=("auto", *LAYOUTS)),
    "spacing": Setting(
        ["median"],
        "target voxel spacing: 'median' (dataset median), 'original' (no resampling) or three numbers Z Y X in mm",
        type=list,
        metavar="MM",
    ),
    "normalize": Setting(
        "auto",
        "auto: z-score per case for MR, dataset-percentile clip + z-score for CT; zscore: per case; "
        "zscore_dataset: the dataset's mean and std; zscore_nonzero: per case inside the non-zero voxels, 0 outside; "
        "minmax: to [0, 1] (or the window); none",
        choices=NORMALIZATIONS,
    ),
    "equalize": Setting(
        "none",
        "histogram equalisation into [0, 1] after the window: hist (whole volume) or clahe (per slice); with "
        "--normalize auto nothing more is done",
        choices=EQUALIZATIONS,
    ),
    "interpolation": Setting(
        "linear",
        "image resampling: linear, bspline (cubic) or nearest; labels use nearest, then each class keeps its source "
        "volume",
        choices=tuple(sorted(INTERPOLATIONS)),
    ),
    "downsample": Setting(
        1,
        "integer in-plane downsampling on top of --spacing, e.g. 2 turns 512x512 into 256x256",
        type=int,
        minimum=1,
        metavar="N",
    ),
    "crop": Setting("none", "crop to a bounding box", choices=CROPS),
    "crop_margin": Setting(0, "voxels kept around the crop box", type=int, minimum=0),
    "export": Setting(
        ["volumes"],
        "what to write besides the manifest: volumes (always written), slices, patches",
        type=list,
        choices=EXPORT_KINDS,
    ),
    "slice_size": Setting(
        None,
        "resize exported slices to H W (linear for images, nearest for labels)",
        type=list,
        item=int,
        positive=True,
        metavar="N",
        default_text="no resizing: slices of different sizes are padded to one size planned from the prepared "
        "shapes, larger ones cropped around the foreground (train, val) or tiled (test); slices/<split>_index.json "
        "records each row's window",
    ),
    "slice_filter": Setting(
        "all",
        "slices export of train/val: all slices or only those with foreground; test keeps all",
        choices=SLICE_FILTERS,
    ),
    "patch_sampling": Setting(
        "random", "random centres (see --patch-ratio) or a grid covering each volume", choices=PATCH_SAMPLINGS
    ),
    "patches_per_case": Setting(8, "random patches per case", type=int, minimum=1),
    "patch_ratio": Setting(
        [1.0, 1.0],
        "weights of patch centres on foreground and background voxels, e.g. 1 1.5; 1 0 = always on foreground",
        type=list,
        item=float,
        minimum=0,
    ),
    "split": Setting([0.8, 0.2, 0.0], "patient-level split fractions", type=list, item=float, minimum=0),
    "splits": Setting(
        None,
        "your own split instead of --split: a splits.json of this toolkit (train, val, test and optional folds) or "
        "nnU-Net's splits_final.json (a list of folds, each with train and val case ids); unlabelled cases it does "
        "not name go to test",
        metavar="FILE",
        default_text="none: drawn with --split and --seed",
    ),
    "folds": Setting(
        None,
        "K-fold cross-validation at patient level, seeded: the labelled cases outside the test fraction of --split "
        "fall into K folds; splits.json lists each fold's train and val cases (train.py --fold I) and keeps fold "
        "0's as its train and val",
        type=int,
        minimum=2,
        metavar="K",
        default_text="no folds",
    ),
    "seed": Setting(0, "seed of the split", type=int),
    "workers": Setting(1, "processes over cases", type=int, minimum=1),
    "source_root": Setting(
        None,
        "the folder manifest.json stores the source files' paths relative to (files outside it stay absolute), so "
        "that dataset and raw files can move; evaluation.py --source-root says where it went",
        metavar="DIR",
        default_text="the --input folder (or an input file's folder), widened to hold a --label folder beside it",
    ),
}

EVALUATE: dict[str, Setting] = {
    "split": Setting(
        "test",
        "with --data: train, val, test or all; cv (a run of folds on a dataset with folds): every case of a fold's "
        "val scored by that fold's model, as nnU-Net's cross-validation",
    ),
    "overlap": Setting(0.5, "sliding-window overlap in [0, 1)", type=float, minimum=0),
    "blend": Setting(
        "gaussian", "weighting of overlapping windows: gaussian (sigma = patch/8) or constant", choices=BLENDS
    ),
    "pictures": Setting(
        "all",
        "per-case pictures: all (overlays/<id>.png and an animated .gif), overlays (png only) or none",
        choices=PICTURES,
    ),
    "postprocess": Setting(
        "none",
        "lcc: keep the largest connected component of every class; auto: only for the classes where that raises "
        "the mean dice on the training dataset's validation split (decided once, stored in the run folder's "
        "postprocessing.json)",
        choices=POSTPROCESS_CHOICES,
    ),
    "connectivity": Setting(
        1, "neighbours of connected components: 1 faces, 2 edges, 3 corners", type=int, choices=CONNECTIVITIES
    ),
    "metrics": Setting(list(METRIC_NAMES), "metrics to compute", type=list, choices=METRIC_NAMES, default_text="all"),
    "nsd_tolerance": Setting(1.0, "tolerance of nsd in mm", type=float, positive=True),
    "engine": Setting(
        "keras",
        "what runs the network: keras (the .keras model) or onnx (a bundle's model.onnx with onnxruntime; --run "
        "must then be a bundle written by --export)",
        choices=ENGINES,
    ),
    "save_probabilities": Setting(
        False,
        "also write each case's class probabilities on the source grid (before post-processing): "
        "probabilities/<id>.npz (key 'probabilities', float16, shape (K, Z, Y, X): classes, then the mask's array as "
        "SimpleITK reads it, nnU-Net's layout) and, "
        "for NIfTI, NRRD and MHA sources, probabilities/<id>.nii.gz (float32, 4D, classes last)",
        type=bool,
    ),
    "source_root": Setting(
        None,
        "with --data: the folder the dataset's raw files are in now (the --input of data_gen.py, moved); cases whose "
        "raw files are missing are scored against the prepared labels, with a note saying so",
        metavar="DIR",
        default_text="the input folder recorded in manifest.json, else one at the same place relative to the dataset",
    ),
    "predictions": Setting(
        None,
        "score masks another tool wrote, no model: folders of masks (NIfTI, NRRD, MHA, 2D PNG; a results folder's "
        "masks/), matched to --truth by case id (the file name without its suffix and a trailing _seg, _label, _mask "
        "or _pred); two or more folders are compared case by case (paired Wilcoxon test per class)",
        type=list,
        metavar="DIR",
        default_text="none",
    ),
    "truth": Setting(
        None,
        "with --predictions: the folder of true label maps (or a dataset folder with labelsTr/ and dataset.json, "
        "whose labels name the classes)",
        metavar="DIR",
        default_text="none",
    ),
}
