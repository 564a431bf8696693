"""Export bundles: a trained run as one self-contained folder that predicts where the training data never was.

``evaluation.py --run runs/NAME --export bundles/NAME`` writes (:func:`utils.evaluate.export.export_bundle`)::

    bundles/NAME/
      bundle.json      BundleRecord: preprocessing record, labels, patch size, inference settings, files (written last)
      config.json      the run's resolved training config, as the run had it (evaluation reads a bundle like a run)
      model.keras      the run's best model, byte for byte
      saved_model/     TensorFlow SavedModel; signature serving_default: image (B, *window, C) float32, prepared as
                       bundle.json says -> probabilities (B, *window, K)
      model.onnx       the same network as ONNX (the same input and output)
      dataset/         the training dataset's record, as a run keeps it (utils.runs.write_dataset_record):
                       manifest.json without per-case entries, fingerprint.json, splits.json
      MODEL_CARD.md    data, channels, spacing, training settings and time, scores, intended use and limits
      builder/FILE.py  a user's builder file (train.py --model FILE.py:FUNCTION), so that model.keras loads
      history.csv, curves.png   the run's per-epoch log, when it had them

The exported networks are the ones inference calls: one output (the first of a deep-supervision model), float32,
and for a network trained on patches of its receptive field (:data:`utils.settings.WHOLE_SLICE_MODELS`) the
same-padded rebuild that takes whole slices of any size (``bundle.json``: ``whole_slices``). Their input is the
*prepared* image: reoriented to ``orientation``, cropped, resampled to the spacing and normalised as ``preprocessing``
(with the dataset statistics in ``fingerprint``) say; :func:`utils.preprocessing.prepare_case` does exactly that.

``evaluation.py --run bundles/NAME --input DIR [--engine keras|onnx]`` reads the bundle like a run: the network
through :func:`open_run` (the Keras model, or an onnxruntime session as the ``predict`` seam of
:func:`utils.inference.predict_volume`), the preprocessing from ``dataset/`` as a run's: neither the training dataset
nor the run folder is needed. Each file is written atomically and ``bundle.json`` last, so a folder without it is an
interrupted export (rerun it).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from utils import fileio
from utils.runs import TrainingConfig, load_config, load_model, load_run
from utils.settings import ENGINES, WHOLE_SLICE_MODELS

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT_VERSION = 1
FILES = {
    "keras": "model.keras",
    "saved_model": "saved_model",
    "onnx": "model.onnx",
    "config": "config.json",
    "card": "MODEL_CARD.md",
}
INPUT_NAME = "image"


@dataclass
class BundleRecord:
    """``bundle.json``: what a bundle's networks expect and how to get it from a raw image.

    Attributes:
        name: the bundle's name (its folder's).
        model, model_args: the architecture as ``train.py --model`` named it, and its options.
        patch_size: the sliding window, ``(H, W)`` or ``(D, H, W)``.
        whole_slices: the networks take whole slices of any size (the window is then the slice).
        input_shape: what the exported networks take, batch first (``None`` for any size).
        num_classes, num_channels: ``K`` and ``C``.
        labels: ``{class index: name}``; label_values: the value of each class in the source label files.
        channels: ``{channel index: name}`` in the order of the input's last axis.
        orientation: where the prepared array axes ``(0, 1, 2)`` point (``S, A, R``).
        preprocessing: :class:`utils.preprocessing.PreprocessSettings` as recorded in the training dataset's manifest
            (spacing, window, percentile clipping, normalisation, equalisation, crop rule and margin, interpolation,
            label remapping).
        resolved: the values those settings resolved to on the training data (median spacing, CT statistics).
        fingerprint: the training dataset's ``fingerprint.json`` (dataset-level statistics some settings need).
        inference: the sliding-window settings to predict with (overlap, blend, batch size, mirroring axes:
            ``evaluation.py``'s defaults for this run, or the flags given with ``--export``).
        files: ``{kind: relative path}`` of what the bundle holds (:data:`FILES`, plus ``builder``).
        source: where and when it was exported: the run folder, toolkit version, backend and library versions.
        checks: what the export verified (``onnx_max_difference``: the largest difference between the ONNX and the
            Keras network's probabilities on a random batch).
    """

    name: str
    model: str
    model_args: dict
    patch_size: list[int]
    whole_slices: bool
    input_shape: list
    num_classes: int
    num_channels: int
    labels: dict[str, str]
    label_values: list[int]
    channels: dict[str, str]
    orientation: list[str]
    preprocessing: dict
    resolved: dict = field(default_factory=dict)
    fingerprint: dict | None = None
    inference: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    format_version: int = BUNDLE_FORMAT_VERSION

    def to_json(self) -> dict:
        """The plain mapping written as ``bundle.json``."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping, where: str | os.PathLike = BUNDLE_FILE) -> BundleRecord:
        """Read a ``bundle.json`` mapping.

        Raises:
            ValueError: not a mapping, a newer format, missing or unknown keys, naming ``where``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int) or version > BUNDLE_FORMAT_VERSION:
            raise ValueError(
                f"{where}: bundle format {version!r}, this toolkit reads up to {BUNDLE_FORMAT_VERSION}; update the "
                "toolkit or export the bundle again with this one"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; export the bundle again with this toolkit")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{where}: not a complete bundle record ({error})") from error

    def manifest(self) -> dict:
        """The part of a prepared dataset's ``manifest.json`` that preparing and writing a new image needs."""
        return {
            "labels": self.labels,
            "label_values": self.label_values,
            "channels": self.channels,
            "preprocessing": self.preprocessing,
        }


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a bundle folder (it has ``bundle.json``) rather than a run."""
    return (Path(path) / BUNDLE_FILE).is_file()


def read_bundle(path: str | os.PathLike) -> BundleRecord:
    """The :class:`BundleRecord` of ``bundles/<name>/bundle.json``.

    Raises:
        FileNotFoundError: no ``bundle.json`` (a run folder, or an interrupted export: rerun it).
        ValueError: a damaged or newer record.
    """
    where = Path(path) / BUNDLE_FILE
    if not where.is_file():
        raise FileNotFoundError(f"{where}: not found; {path} is no complete bundle (rerun evaluation.py --export)")
    return BundleRecord.from_json(fileio.read_json(where), where)


def bundle_config(path: str | os.PathLike, record: BundleRecord | None = None) -> TrainingConfig:
    """The run's training config kept in the bundle; a user's builder is taken from the bundle's copy of its file."""
    record = record or read_bundle(path)
    config = load_config(path)
    builder = record.files.get("builder")
    if builder:
        config = replace(config, model_source=str((Path(path) / builder).resolve()))
    return config


def open_run(
    run_dir: str | os.PathLike,
    engine: str = "keras",
    predict: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[TrainingConfig, object, Callable[[np.ndarray], np.ndarray] | None]:
    """A run or a bundle, ready to predict: ``(config, Keras model or None, predict callable or None)``.

    ``engine`` ``keras`` loads the ``.keras`` model (of a run or a bundle); ``onnx`` opens a bundle's ``model.onnx``
    in onnxruntime and returns it as ``predict`` (:func:`utils.inference.onnx_predictor`). A ``predict`` given by
    the caller (tests) wins and nothing is loaded.

    Raises:
        FileNotFoundError: a missing run, bundle or model file.
        ValueError: an unknown engine, ``onnx`` for a run that is not a bundle, or an unloadable model.
    """
    from utils.inference import onnx_predictor

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not is_bundle(run_dir):
        if engine != "keras":
            raise ValueError(
                f"{run_dir}: --engine {engine} predicts from a bundle; write one with "
                f"evaluation.py --run {run_dir} --export bundles/NAME"
            )
        config, model = load_run(run_dir, load=predict is None)
        return config, model, predict
    record = read_bundle(run_dir)
    config = bundle_config(run_dir, record)
    if predict is not None:
        return config, None, predict
    if engine == "onnx":
        return config, None, onnx_predictor(Path(run_dir) / record.files.get("onnx", FILES["onnx"]))
    return config, load_model(Path(run_dir) / FILES["keras"], config.model, config.model_source), None


def inference_network(network, config: TrainingConfig):
    """The network inference calls, as a Keras model with one float32 output: the first output of a
    deep-supervision model, float32 layers for a mixed-precision one, the whole-slice rebuild of a
    :data:`utils.settings.WHOLE_SLICE_MODELS` network.

    Raises:
        ValueError: a model without symbolic inputs and outputs (a subclassed ``keras.Model``), which has no
            signature to export.
    """
    import keras

    from utils.inference import whole_slice_network

    if not getattr(network, "inputs", None) or not getattr(network, "outputs", None):
        raise ValueError(
            f"model {config.model!r} has no symbolic inputs and outputs (a subclassed keras.Model?); build it with "
            "the functional API (keras.Input ... keras.Model(inputs, outputs)) to export it"
        )
    if any(layer.dtype_policy.name != "float32" for layer in network.layers):

        def float32_layer(layer):
            if isinstance(layer, keras.Model):  # a nested model (a pretrained encoder): float32 in and throughout
                inputs = keras.tree.map_structure(lambda x: keras.Input(x.shape[1:], dtype="float32"), layer.input)
                return keras.models.clone_model(layer, clone_function=float32_layer, input_tensors=inputs)
            if not isinstance(layer, keras.layers.Layer):  # an operation such as ConvNeXt's x + y: no dtype policy
                return layer.__class__.from_config(layer.get_config())
            return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

        weights = network.get_weights()
        network = keras.models.clone_model(network, clone_function=float32_layer)
        network.set_weights(weights)
    if config.model in WHOLE_SLICE_MODELS:
        network = whole_slice_network(network, config.model, config.model_args, config.num_channels, config.num_classes)
    if len(network.outputs) > 1:
        network = keras.Model(network.inputs, network.outputs[0], name=f"{network.name}_inference")
    return network


def export_saved_model(network, folder: Path) -> Path:
    """``folder`` as a TensorFlow SavedModel of ``network`` (``serving_default``: :data:`INPUT_NAME` in,
    probabilities out), written beside it first and then put in place."""
    import keras

    spec = keras.InputSpec(shape=tuple(network.inputs[0].shape), dtype="float32", name=INPUT_NAME)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    network.export(str(temporary), format="tf_saved_model", verbose=False, input_signature=[spec])
    _replace_folder(temporary, folder)
    return folder


def export_onnx(network, path: Path) -> Path:
    """``path`` as an ONNX file of ``network`` (Keras's export, through tf2onnx on the TensorFlow backend), written
    atomically.

    Raises:
        ValueError: the exporter is not installed or cannot convert the network.
    """
    import keras

    spec = keras.InputSpec(shape=tuple(network.inputs[0].shape), dtype="float32", name=INPUT_NAME)
    quiet = logging.getLogger("tf2onnx")
    level = quiet.level
    quiet.setLevel(logging.WARNING)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():  # Keras's numpy-2 patch of tf2onnx probes np.object, which numpy warns about
            warnings.simplefilter("ignore", FutureWarning)
            network.export(str(tmp), format="onnx", verbose=False, input_signature=[spec])

    try:
        fileio.write_with(path, write, ".onnx")
    except ImportError as error:
        raise ValueError(f"{path}: ONNX export needs tf2onnx and onnx (pip install -r requirements.txt)") from error
    except OSError:
        raise
    except Exception as error:  # tf2onnx raises many types for operations it cannot convert
        raise ValueError(
            f"{path}: tf2onnx cannot convert {network.name} ({type(error).__name__}: {str(error)[:300]})"
        ) from error
    finally:
        quiet.setLevel(level)
    return path


def _replace_folder(new: Path, folder: Path) -> None:
    """Put the finished folder ``new`` where ``folder`` is, removing the old one only once the new one is in place."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def copy_file(source: Path, target: Path) -> Path:
    """Copy a file atomically (byte for byte)."""
    return fileio.write_with(target, lambda tmp: shutil.copyfile(source, tmp))
