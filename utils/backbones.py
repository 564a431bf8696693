"""Pretrained 2D encoders from ``keras.applications`` for ``unet2d`` (``model.py`` builds the decoder on them).

An encoder is the application without its classification top (``include_top=False``), wrapped as one nested,
multi-output ``keras.Model`` named ``"encoder"`` whose outputs are its feature maps at strides 2, 4, 8, 16 and 32
(ConvNeXt has no stride-2 map: its stem is a 4 x 4 convolution of stride 4). The taps are the layers
segmentation_models (Yakubovskiy 2019) uses as skips; ConvNeXt's convolutions with one group per channel are rebuilt as
the equal depthwise convolutions (fast on a CPU, exportable). Being one layer of the segmentation model, the encoder is
frozen with ``model.get_layer("encoder").trainable = False``, and its weights are saved alone with
``model.get_layer("encoder").save_weights("encoder.weights.h5")``.

Channels: ImageNet weights expect 3 channels. Every model with a backbone starts with a learned 1 x 1 convolution
``input_adapter`` from the image's channels to 3, initialised so that an image normalised to mean 0 and standard
deviation 1 per channel (this toolkit's z-scores) arrives in the range and channel order the backbone's ImageNet
weights were trained on: one channel is repeated to the three, three channels are passed one to one, other counts are
averaged into each of the three; then scaled by ImageNet's statistics where the backbone needs it (``caffe``: BGR,
0-255 minus the mean, ResNet; ``torch``: ImageNet-standardised, mean 0 and standard deviation 1, DenseNet, and
EfficientNet and ConvNeXt without their own rescaling and normalisation layers, which the encoder leaves out: their
constants would not export to ONNX). Training then adapts it. Channel repetition alone would fix the mapping; the
learned convolution starts from it and can weigh the channels of a four-channel MRI.

Weights: ``None`` (random), ``"imagenet"`` (Keras's own download cache, ``~/.keras/models``; fetched by Keras on first
use, never by this toolkit's tests), or the path of a weights file: Keras's ``*_notop.h5`` files (loaded into the
application without its top), or a ``.weights.h5`` / ``.keras`` file of the encoder, such as ``encoder.weights.h5``
saved from a model of this toolkit as above (loaded into the encoder). The weights live in the ``.keras``
file afterwards: a saved model reloads without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from utils.settings import BACKBONE_NAMES

ENCODER_STRIDE = 32  # every backbone halves the resolution five times: patch sizes must be multiples of 32
# U-Net options that do not apply on a backbone: the encoder fixes its depth and how it down-samples
FIXED_BY_ENCODER = ("depth", "stem_stride", "full_res_skip", "downsample", "residual")
IMAGENET_STD = (0.229, 0.224, 0.225)  # RGB, of pixel values in [0, 1]


@dataclass(frozen=True)
class Backbone:
    """A ``keras.applications`` constructor, the layers tapped for the skips (``name`` for a layer's output,
    ``"<name"`` for its input), their strides, and the input convention of its ImageNet weights."""

    application: str
    taps: tuple[str, ...]
    strides: tuple[int, ...]
    convention: str
    options: tuple[tuple[str, object], ...] = ()
    start: str | None = None  # the layer whose input is the encoder's: the application's own preprocessing is left out


_EFFICIENTNET_TAPS = (
    "block2a_expand_activation",
    "block3a_expand_activation",
    "block4a_expand_activation",
    "block6a_expand_activation",
    "top_activation",
)
_ALL_STRIDES = (2, 4, 8, 16, 32)

BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(
        "ResNet50",
        ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
        _ALL_STRIDES,
        "caffe",
    ),
    **{
        f"efficientnetb{i}": Backbone(
            f"EfficientNetB{i}", _EFFICIENTNET_TAPS, _ALL_STRIDES, "torch", start="stem_conv_pad"
        )
        for i in range(4)
    },
    "convnext_tiny": Backbone(
        "ConvNeXtTiny",
        (
            "<convnext_tiny_downsampling_block_0",
            "<convnext_tiny_downsampling_block_1",
            "<convnext_tiny_downsampling_block_2",
            "",  # the model's output
        ),
        (4, 8, 16, 32),
        "torch",
        (("include_preprocessing", False),),
    ),
    "densenet121": Backbone(
        "DenseNet121", ("conv1_relu", "pool2_relu", "pool3_relu", "pool4_relu", "relu"), _ALL_STRIDES, "torch"
    ),
}


def check_backbone(backbone: str, input_shape: Sequence[int | None], model: str = "unet2d") -> None:
    """Raise a ``ValueError`` in one line for an unknown backbone, a 3D shape or a size the encoder cannot take.

    Args:
        backbone: a key of :data:`BACKBONES`.
        input_shape: ``(H, W, C)``; ``H`` and ``W`` may be None, else multiples of :data:`ENCODER_STRIDE`.
        model: the model's name, for the message.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"{model}: unknown backbone {backbone!r}; choose one of {list(BACKBONE_NAMES)}")
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"{model}: backbone {backbone!r} is a 2D encoder; got input_shape {shape!r} (use (H, W, C))")
    sizes = [None if size is None else int(size) for size in shape[:2]]
    if any(size is not None and size % ENCODER_STRIDE for size in sizes):
        fitting = " ".join("N" if s is None else str(-(-s // ENCODER_STRIDE) * ENCODER_STRIDE) for s in sizes)
        raise ValueError(
            f"{model} with backbone {backbone!r}: input size {shape[0]}x{shape[1]} is not a multiple of "
            f"{ENCODER_STRIDE}, the encoder's total stride, along each axis; use a patch size such as {fitting}"
        )


def build_encoder(backbone: str, spatial_shape: Sequence[int | None], weights: str | None = None) -> keras.Model:
    """The encoder ``"encoder"``: ``(B, H, W, 3)`` to the feature maps at :attr:`Backbone.strides`, finest first.

    Args:
        backbone: a key of :data:`BACKBONES`.
        spatial_shape: ``(H, W)`` (None allowed), multiples of :data:`ENCODER_STRIDE`.
        weights: ``None``, ``"imagenet"`` or a weights file (module docstring).

    Raises:
        FileNotFoundError: ``weights`` names a file that does not exist.
        ValueError: ImageNet weights that Keras could not fetch, or a file that does not fit the backbone.
    """
    spec = BACKBONES[backbone]
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise FileNotFoundError(f"{weights}: encoder weights file of backbone {backbone!r} not found")
    own_file = weights is not None and str(weights).endswith((".weights.h5", ".keras"))
    constructor = getattr(keras.applications, spec.application)
    shape = (*tuple(spatial_shape), 3)
    try:
        base = constructor(
            include_top=False, weights=None if own_file else weights, input_shape=shape, **dict(spec.options)
        )
        start = base.get_layer(spec.start).input if spec.start else base.inputs
        encoder = keras.Model(start, [_tap(base, name) for name in spec.taps], name="encoder")
        if any(_grouped(layer) for layer in leaf_layers(encoder)):
            encoder = _as_depthwise(encoder)
        if own_file:
            encoder.load_weights(weights)
    except Exception as error:  # Keras raises many types for a failed download or a foreign file
        why = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if weights == "imagenet":
            raise ValueError(
                f"backbone {backbone!r}: Keras could not get its ImageNet weights ({why}); connect once so that "
                "Keras caches them in ~/.keras/models, or give --encoder-weights FILE"
            ) from error
        raise ValueError(f"{weights}: not a weights file of {spec.application} without its top ({why})") from error
    return encoder


def leaf_layers(model: keras.Model) -> list:
    """The layers of a model with those of nested models (the encoder, ConvNeXt's blocks) in their place."""
    found = []
    for layer in model.layers:
        found += leaf_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return found


def _grouped(layer) -> bool:
    """A convolution with one group per channel (ConvNeXt's 7 x 7 ones)."""
    return isinstance(layer, keras.layers.Conv2D) and 1 < layer.groups == layer.filters


def _as_depthwise(encoder: keras.Model) -> keras.Model:
    """The encoder with every one-group-per-channel ``Conv2D`` as the equal ``DepthwiseConv2D`` (same name and
    weights, kernel ``(k, k, 1, C)`` as ``(k, k, C, 1)``). TensorFlow runs grouped convolutions on a CPU through XLA
    (a ConvNeXt training step of two 32 x 32 images took 14 s, now 1.4 s), and tf2onnx cannot convert them."""

    def clone(layer):
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=clone)
        if _grouped(layer):
            return keras.layers.DepthwiseConv2D(
                layer.kernel_size, strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate,
                use_bias=layer.use_bias, name=layer.name, dtype=layer.dtype_policy,
            )  # fmt: skip
        return layer.__class__.from_config(layer.get_config())

    converted = keras.models.clone_model(encoder, clone_function=clone)
    old = {layer.name: layer for layer in leaf_layers(encoder)}
    for layer in leaf_layers(converted):
        if not layer.weights:
            continue
        weights = old[layer.name].get_weights()
        if _grouped(old[layer.name]):
            weights = [weights[0].reshape(layer.kernel.shape), *weights[1:]]
        layer.set_weights(weights)
    return converted


def _tap(base: keras.Model, name: str):
    if not name:
        return base.outputs[0]
    if name.startswith("<"):
        return base.get_layer(name[1:]).input
    return base.get_layer(name).output


def adapter_weights(backbone: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The initial kernel ``(1, 1, channels, 3)`` and bias ``(3,)`` of ``input_adapter`` (module docstring)."""
    convention = BACKBONES[backbone].convention
    std = np.asarray(IMAGENET_STD)
    if convention == "torch":
        scale, offset = np.ones(3), np.zeros(3)
    else:  # caffe: BGR, the mean subtracted, not divided by the standard deviation
        scale, offset = 255 * std[::-1], np.zeros(3)
    if channels == 3:
        mixing = np.eye(3)[:, ::-1] if convention == "caffe" else np.eye(3)
    else:
        mixing = np.full((channels, 3), 1.0 / channels)
    kernel = (mixing * scale[None, :]).reshape(1, 1, channels, 3)
    return kernel.astype("float32"), offset.astype("float32")


def add_input_adapter(inputs, backbone: str):
    """The learned 1 x 1 convolution ``input_adapter``: ``(B, H, W, C)`` to ``(B, H, W, 3)``, initialised by
    :func:`adapter_weights`."""
    channels = int(inputs.shape[-1])
    kernel, bias = adapter_weights(backbone, channels)
    adapter = keras.layers.Conv2D(3, 1, name="input_adapter")
    outputs = adapter(inputs)
    adapter.set_weights([kernel, bias])
    return outputs


def encoder_of(model: keras.Model):
    """The nested ``encoder`` of a model built with a backbone, else None."""
    try:
        return model.get_layer("encoder")
    except ValueError:
        return None
