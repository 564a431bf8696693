"""Segmentation architectures for 2D and 3D images, one builder per architecture.

Every builder takes a channels-last ``input_shape`` (``(H, W, C)`` for 2D, ``(D, H, W, C)`` for 3D; spatial
sizes may be ``None`` for fully convolutional use) and ``num_classes``, infers 2D or 3D from
``len(input_shape)`` and returns a functional ``keras.Model`` mapping ``(B, *spatial, C)`` to per-voxel
probabilities ``(B, *spatial, num_classes)``.
The final activation always runs in float32, so the models work under mixed precision. Only ``keras``,
``keras.layers`` and ``keras.ops`` are used, so the models run on the TensorFlow, JAX and PyTorch backends.

``build_model(name, input_shape, num_classes, **kwargs)`` is the single way in; ``MODELS`` maps the names
(``unet2d``, ``unet3d``, ...) to the builders.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
from keras import layers, ops

from utils import backbones
from utils.settings import USER_MODEL_PATTERN

NORMS = ("batch", "instance", "group", "none")
UPSAMPLES = ("transpose", "interp")
DOWNSAMPLES = ("maxpool", "strided")
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid", "linear")


# Small building blocks shared by every architecture.


def _spatial_ndim(input_shape: Sequence[int | None]) -> int:
    """Returns 2 or 3, the number of spatial axes of a channels-last ``input_shape``.

    Raises:
        ValueError: if ``input_shape`` is not ``(H, W, C)`` or ``(D, H, W, C)`` with a known channel count,
            or a spatial size is not positive.
    """
    shape = tuple(input_shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"input_shape must be channels last, (H, W, C) for 2D or (D, H, W, C) for 3D; got {shape!r}")
    if shape[-1] is None or int(shape[-1]) < 1:
        raise ValueError(f"input_shape must end with a positive channel count; got {shape!r}")
    for size in shape[:-1]:
        if size is not None and int(size) < 1:
            raise ValueError(f"spatial sizes in input_shape must be positive or None; got {shape!r}")
    return len(shape) - 1


def _check_divisible(input_shape: Sequence[int | None], factor: int, model: str, why: str) -> None:
    """Raises ValueError if a fixed spatial size of ``input_shape`` is not a multiple of ``factor``."""
    for axis, size in enumerate(tuple(input_shape)[:-1]):
        if size is not None and int(size) % factor != 0:
            raise ValueError(
                f"{model}: spatial size {size} (axis {axis} of input_shape {tuple(input_shape)!r}) is not "
                f"divisible by {factor}, the total down-sampling factor ({why}); use a patch size that is a "
                f"multiple of {factor} or a smaller depth"
            )


def _check_choice(option: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {list(choices)}; got {value!r}")


def _conv(ndim: int, filters: int, kernel_size=3, strides=1, dilation_rate=1, padding="same", name=None, **kw):
    conv = layers.Conv2D if ndim == 2 else layers.Conv3D
    kw.setdefault("kernel_initializer", "he_normal")
    return conv(filters, kernel_size, strides=strides, dilation_rate=dilation_rate, padding=padding, name=name, **kw)


def _conv_transpose(ndim: int, filters: int, kernel_size: int, strides: int, name: str):
    conv = layers.Conv2DTranspose if ndim == 2 else layers.Conv3DTranspose
    return conv(filters, kernel_size, strides=strides, padding="same", kernel_initializer="he_normal", name=name)


def _max_pool(ndim: int, pool_size=2, strides=None, padding="valid", name=None):
    pool = layers.MaxPooling2D if ndim == 2 else layers.MaxPooling3D
    return pool(pool_size, strides=strides, padding=padding, name=name)


def _norm(norm: str, channels: int, name: str, norm_groups: int = 8):
    """A normalisation layer over the channel axis, or None for ``norm="none"``.

    ``"instance"`` is GroupNormalization with one group per channel; ``"group"`` uses the largest divisor of
    ``channels`` that is at most ``norm_groups``.
    """
    if norm == "none":
        return None
    if norm == "batch":
        return layers.BatchNormalization(name=name)
    if norm == "instance":
        return layers.GroupNormalization(groups=-1, name=name)
    groups = max(g for g in range(1, min(norm_groups, channels) + 1) if channels % g == 0)
    return layers.GroupNormalization(groups=groups, name=name)


def _activation(activation: str, ndim: int, name: str):
    """An activation layer: ``"leaky_relu"`` has slope 0.01 (nnU-Net), ``"prelu"`` one slope per channel."""
    if activation == "leaky_relu":
        return layers.LeakyReLU(negative_slope=0.01, name=name)
    if activation == "prelu":
        return layers.PReLU(shared_axes=list(range(1, ndim + 1)), name=name)
    return layers.Activation(activation, name=name)


def _norm_act(x, ndim: int, norm: str, activation: str, name: str, norm_groups: int = 8):
    """Applies ``norm`` then ``activation``; layers are named ``{name}_norm`` and ``{name}_act``."""
    norm_layer = _norm(norm, x.shape[-1], f"{name}_norm", norm_groups)
    if norm_layer is not None:
        x = norm_layer(x)
    return _activation(activation, ndim, f"{name}_act")(x)


def _conv_norm_act(x, ndim, filters, name, norm, activation, strides=1, kernel_size=3, dilation_rate=1, groups=8):
    """Conv → norm → activation, named ``{name}``, ``{name}_norm``, ``{name}_act`` (no bias before a norm)."""
    x = _conv(ndim, filters, kernel_size, strides, dilation_rate, name=name, use_bias=norm == "none")(x)
    return _norm_act(x, ndim, norm, activation, name, groups)


def _output_head(x, ndim: int, num_classes: int, output_activation: str, name: str = "out"):
    """1×1 convolution ``{name}_conv`` to ``num_classes`` channels, then the float32 activation ``{name}``."""
    x = _conv(ndim, num_classes, kernel_size=1, name=f"{name}_conv", kernel_initializer="glorot_uniform")(x)
    return layers.Activation(output_activation, dtype="float32", name=name)(x)


def _check_output_activation(output_activation: str, num_classes: int) -> None:
    _check_choice("output_activation", output_activation, OUTPUT_ACTIVATIONS)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1; got {num_classes!r}")
    if output_activation == "softmax" and num_classes == 1:
        raise ValueError(
            "output_activation='softmax' with num_classes=1 gives a constant output; use "
            "output_activation='sigmoid' for one class, or num_classes=2"
        )


def _level_filters(level: int, filters: int, filter_growth: float, max_filters: int) -> int:
    """Feature channels at resolution level ``level`` (1 = the first level)."""
    return int(min(round(filters * filter_growth ** (level - 1)), max_filters))


# The U-Net family: one generic encoder-decoder serves unet, resunet and attention_unet.


def _conv_block(x, ndim, filters, name, *, convs, norm, activation, strides, norm_groups):
    """``convs`` × (conv → norm → activation); the first convolution carries ``strides``."""
    for i in range(1, convs + 1):
        x = _conv_norm_act(
            x,
            ndim,
            filters,
            f"{name}_conv{i}",
            norm,
            activation,
            strides=strides if i == 1 else 1,
            groups=norm_groups,
        )
    return x


def _shortcut(x, ndim, filters, name, *, strides, norm, norm_groups):
    """Identity, or a strided 1×1 convolution (+ norm) when the shape changes."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    x = _conv(ndim, filters, kernel_size=1, strides=strides, name=f"{name}_skip", use_bias=norm == "none")(x)
    norm_layer = _norm(norm, filters, f"{name}_skip_norm", norm_groups)
    return x if norm_layer is None else norm_layer(x)


def _residual_block(x, ndim, filters, name, *, convs, norm, activation, strides, norm_groups):
    """Post-activation residual block (He et al. 2016): the last norm output plus the shortcut, activated."""
    shortcut = _shortcut(x, ndim, filters, name, strides=strides, norm=norm, norm_groups=norm_groups)
    for i in range(1, convs + 1):
        conv_name = f"{name}_conv{i}"
        x = _conv(ndim, filters, strides=strides if i == 1 else 1, name=conv_name, use_bias=norm == "none")(x)
        norm_layer = _norm(norm, filters, f"{conv_name}_norm", norm_groups)
        x = x if norm_layer is None else norm_layer(x)
        if i < convs:
            x = _activation(activation, ndim, f"{conv_name}_act")(x)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return _activation(activation, ndim, f"{name}_act")(x)


def _preact_block(x, ndim, filters, name, *, convs, norm, activation, strides, norm_groups, first=False):
    """Pre-activation residual unit (He et al. 2016, "Identity mappings in deep residual networks").

    ``convs`` × (norm → act → conv) plus an identity or 1×1 shortcut; the output is not activated. ``first``
    skips the pre-activation of the raw input image.
    """
    shortcut = _shortcut(x, ndim, filters, name, strides=strides, norm="none", norm_groups=norm_groups)
    for i in range(1, convs + 1):
        conv_name = f"{name}_conv{i}"
        if not (first and i == 1):
            norm_layer = _norm(norm, x.shape[-1], f"{conv_name}_norm", norm_groups)
            x = x if norm_layer is None else norm_layer(x)
            x = _activation(activation, ndim, f"{conv_name}_act")(x)
        x = _conv(ndim, filters, strides=strides if i == 1 else 1, name=conv_name)(x)
    return layers.Add(name=f"{name}_add")([x, shortcut])


_BLOCKS = {"conv": _conv_block, "residual": _residual_block, "preact": _preact_block}


def _attention_gate(skip, gate, ndim, name):
    """Additive attention gate (Oktay et al. 2018) with the gating signal already at the skip's resolution.

    ``alpha = sigmoid(psi(relu(theta(skip) + phi(gate))))`` with 1×1 convolutions to ``channels // 2``
    features and one attention map ``(B, *spatial, 1)``; returns ``skip * alpha``, shape ``(B, *spatial,
    C_skip)``.
    """
    inter = max(skip.shape[-1] // 2, 1)
    theta = _conv(ndim, inter, kernel_size=1, name=f"{name}_theta")(skip)
    phi = _conv(ndim, inter, kernel_size=1, name=f"{name}_phi")(gate)
    f = layers.Add(name=f"{name}_add")([theta, phi])
    f = layers.Activation("relu", name=f"{name}_relu")(f)
    psi = _conv(ndim, 1, kernel_size=1, name=f"{name}_psi", kernel_initializer="glorot_uniform")(f)
    alpha = layers.Activation("sigmoid", name=f"{name}_alpha")(psi)
    return layers.Multiply(name=f"{name}_mul")([skip, alpha])


def _upsample(x, ndim, filters, name, *, mode, norm, activation, norm_groups, plain):
    """Doubles the resolution.

    ``mode="transpose"``: a 2×2 transposed convolution ``{name}``. ``mode="interp"``: interpolation ``{name}``
    (bilinear in 2D, nearest in 3D) then a 3×3 convolution ``{name}conv`` (conv → norm → act; a bare conv if
    ``plain``).
    """
    if mode == "transpose":
        return _conv_transpose(ndim, filters, 2, 2, name)(x)
    if ndim == 2:
        x = layers.UpSampling2D(2, interpolation="bilinear", name=name)(x)
    else:
        x = layers.UpSampling3D(2, name=name)(x)
    if plain:
        return _conv(ndim, filters, name=f"{name}conv")(x)
    return _conv_norm_act(x, ndim, filters, f"{name}conv", norm, activation, groups=norm_groups)


def _check_unet_options(
    input_shape,
    num_classes,
    model_name,
    *,
    depth,
    filters,
    max_filters,
    convs_per_level,
    norm,
    dropout,
    upsample,
    downsample,
    deep_supervision,
    output_activation,
    stem_stride,
    full_res_skip=0,
):
    """Raises ValueError, naming the option and its value, for a bad U-Net option or input size."""
    _check_output_activation(output_activation, num_classes)
    _check_choice("norm", norm, NORMS)
    _check_choice("upsample", upsample, UPSAMPLES)
    _check_choice("downsample", downsample, DOWNSAMPLES)
    _check_choice("stem_stride", stem_stride, (1, 2))
    for option, value in (
        ("depth", depth),
        ("filters", filters),
        ("convs_per_level", convs_per_level),
        ("max_filters", max_filters),
    ):
        if int(value) < 1:
            raise ValueError(f"{option} must be at least 1; got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    if deep_supervision and depth - 1 + (stem_stride == 2) < 2:
        raise ValueError(
            f"deep_supervision needs a decoder level below full resolution (depth >= 3, or >= 2 with "
            f"stem_stride=2); got depth={depth}, stem_stride={stem_stride}"
        )
    if int(full_res_skip) < 0:
        raise ValueError(f"full_res_skip must be at least 0 (channels); got {full_res_skip!r}")
    factor = stem_stride * 2 ** (depth - 1)
    _check_divisible(input_shape, factor, model_name, f"stem_stride={stem_stride}, depth={depth}")


def _unet_graph(
    input_shape,
    num_classes,
    *,
    model_name,
    block,
    attention,
    depth,
    filters,
    filter_growth,
    max_filters,
    convs_per_level,
    norm,
    norm_groups,
    activation,
    dropout,
    upsample,
    downsample,
    deep_supervision,
    output_activation,
    stem_stride,
    full_res_skip=0,
):
    """The encoder-decoder shared by unet, resunet and attention_unet (see ``unet`` for the options)."""
    ndim = _spatial_ndim(input_shape)
    _check_unet_options(
        input_shape, num_classes, model_name, depth=depth, filters=filters, max_filters=max_filters,
        convs_per_level=convs_per_level, norm=norm, dropout=dropout, upsample=upsample, downsample=downsample,
        deep_supervision=deep_supervision, output_activation=output_activation, stem_stride=stem_stride,
        full_res_skip=full_res_skip,
    )  # fmt: skip

    run_block = _BLOCKS[block]
    common = dict(convs=convs_per_level, norm=norm, activation=activation, norm_groups=norm_groups)
    preact = block == "preact"

    def features(level):
        return _level_filters(level, filters, filter_growth, max_filters)

    def finish(x, name):
        return _norm_act(x, ndim, norm, activation, name, norm_groups) if preact else x

    def drop(x, name):
        return layers.Dropout(dropout, name=f"{name}_drop")(x) if dropout > 0 else x

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    skips = {}
    for level in range(1, depth + 1):
        name = f"enc{level}"
        strides = stem_stride if level == 1 else 1
        if level > 1 and downsample == "maxpool":
            x = _max_pool(ndim, name=f"{name}_pool")(x)
        elif level > 1:
            strides = 2
        extra = {"first": level == 1} if preact else {}
        x = drop(run_block(x, ndim, features(level), name, strides=strides, **common, **extra), name)
        skips[level] = x

    outputs = []
    for level in range(depth - 1, 0, -1):
        name = f"dec{level}"
        x = _upsample(
            x,
            ndim,
            features(level),
            f"{name}_up",
            mode=upsample,
            norm=norm,
            activation=activation,
            norm_groups=norm_groups,
            plain=preact,
        )
        skip = skips[level]
        if attention:
            skip = _attention_gate(skip, x, ndim, f"{name}_gate")
        x = layers.Concatenate(name=f"{name}_concat")([skip, x])
        x = drop(run_block(x, ndim, features(level), name, strides=1, **common), name)
        scale = level - 1 + (stem_stride == 2)
        if deep_supervision and scale > 0:
            aux = finish(x, f"ds{scale}")
            outputs.append(_output_head(aux, ndim, num_classes, output_activation, name=f"ds{scale}_out"))

    x = finish(x, "head")
    if stem_stride == 2:
        x = _conv_transpose(ndim, features(1), 2, 2, "dec0_up")(x)
        x = _norm_act(x, ndim, norm, activation, "dec0_up", norm_groups)
        if full_res_skip:
            skip = _conv_norm_act(inputs, ndim, full_res_skip, "full_res", norm, activation, groups=norm_groups)
            x = layers.Concatenate(name="full_res_concat")([x, skip])
    main = _output_head(x, ndim, num_classes, output_activation, name="out")
    outputs = [main, *outputs[::-1]] if deep_supervision else main
    return keras.Model(inputs, outputs, name=model_name)


def _backbone_unet_graph(
    input_shape,
    num_classes,
    *,
    model_name,
    backbone,
    encoder_weights,
    filters,
    filter_growth,
    max_filters,
    convs_per_level,
    norm,
    norm_groups,
    activation,
    dropout,
    upsample,
    deep_supervision,
    output_activation,
):
    """U-Net decoder on a pretrained encoder (see ``unet``'s ``backbone``; segmentation_models' Unet layout).

    ``(B, H, W, C)`` → ``input_adapter`` → ``encoder`` (features at its strides, finest first) → five decoder levels
    ``dec4`` (stride 16) … ``dec0`` (full resolution), each up-sampling, concatenating the encoder's feature at its
    stride when there is one, and applying a conv block. Deep supervision heads ``ds1_out`` … ``ds3_out`` sit at
    strides 2, 4 and 8.
    """
    if backbone is None:
        raise ValueError(f"{model_name}: encoder_weights={encoder_weights!r} needs a backbone")
    _check_output_activation(output_activation, num_classes)
    _check_choice("norm", norm, NORMS)
    _check_choice("upsample", upsample, UPSAMPLES)
    backbones.check_backbone(backbone, input_shape, model_name)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    encoder = backbones.build_encoder(backbone, tuple(input_shape)[:2], encoder_weights)
    features = encoder(backbones.add_input_adapter(inputs, backbone))
    skips = dict(zip(backbones.BACKBONES[backbone].strides, features, strict=True))
    x = skips.pop(backbones.ENCODER_STRIDE)
    common = dict(convs=convs_per_level, norm=norm, activation=activation, norm_groups=norm_groups)
    outputs = []
    for level in range(4, -1, -1):
        name = f"dec{level}"
        channels = _level_filters(level + 1, filters, filter_growth, max_filters)
        x = _upsample(
            x, 2, channels, f"{name}_up", mode=upsample, norm=norm, activation=activation, norm_groups=norm_groups,
            plain=False,
        )  # fmt: skip
        if 2**level in skips:
            x = layers.Concatenate(name=f"{name}_concat")([skips[2**level], x])
        x = _conv_block(x, 2, channels, name, strides=1, **common)
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"{name}_drop")(x)
        if deep_supervision and 1 <= level <= 3:
            outputs.append(_output_head(x, 2, num_classes, output_activation, name=f"ds{level}_out"))
    main = _output_head(x, 2, num_classes, output_activation, name="out")
    outputs = [main, *outputs[::-1]] if deep_supervision else main
    return keras.Model(inputs, outputs, name=model_name)


def unet(
    input_shape: Sequence[int | None],
    num_classes: int,
    *,
    depth: int = 4,
    filters: int = 16,
    filter_growth: float = 2,
    max_filters: int = 320,
    convs_per_level: int = 2,
    norm: str = "batch",
    norm_groups: int = 8,
    activation: str = "leaky_relu",
    dropout: float = 0.0,
    upsample: str = "transpose",
    downsample: str = "maxpool",
    residual: bool = False,
    deep_supervision: bool = False,
    output_activation: str = "softmax",
    stem_stride: int = 1,
    full_res_skip: int = 0,
    backbone: str | None = None,
    encoder_weights: str | None = None,
    name: str | None = None,
) -> keras.Model:
    """U-Net for 2D or 3D images (Ronneberger et al. 2015; 3D: Çiçek et al. 2016; options as in nnU-Net,
    Isensee et al. 2021).

    Level 1 works at full resolution with ``filters`` channels; each further level halves the resolution (max
    pooling or a strided first convolution) and multiplies the channels by ``filter_growth`` up to
    ``max_filters``. The decoder up-samples, concatenates the skip of the same level and applies the same
    block. Layers are named ``enc{l}_conv{i}``, ``enc{l}_pool``, ``dec{l}_up``, ``dec{l}_concat``,
    ``dec{l}_conv{i}``, ``out_conv``, ``out``.

    Args:
        input_shape: ``(H, W, C)`` or ``(D, H, W, C)``; spatial sizes may be None.
        num_classes: output channels.
        depth: number of resolution levels (``depth - 1`` down-samplings).
        filters: channels at level 1.
        filter_growth: channel multiplier per level.
        max_filters: cap on the channels of any level.
        convs_per_level: 3×3 convolutions per block.
        norm: ``"batch"``, ``"instance"`` (GroupNormalization with one group per channel), ``"group"`` or
            ``"none"``.
        norm_groups: groups for ``norm="group"`` (the largest divisor of the channel count up to this).
        activation: ``"leaky_relu"`` (slope 0.01), ``"prelu"`` or any Keras activation name.
        dropout: dropout rate after each block (0 disables).
        upsample: ``"transpose"`` (2×2 transposed convolution) or ``"interp"`` (bilinear in 2D, nearest in 3D,
            then a 3×3 convolution).
        downsample: ``"maxpool"`` or ``"strided"`` (the first convolution of each level has stride 2).
        residual: use residual blocks (the block output is added to an identity or 1×1 shortcut).
        deep_supervision: also return auxiliary outputs at lower resolutions, one per decoder level below full
            resolution. The model then returns a list ``[out, ds1_out, ds2_out, ...]`` where output ``k`` has
            shape ``(B, *spatial / 2**k, num_classes)``; weight the losses with
            ``utils.losses.deep_supervision_compile_args``.
        output_activation: ``"softmax"``, ``"sigmoid"`` (one class, or independent overlapping labels) or
            ``"linear"`` (logits); always computed in float32.
        stem_stride: 1, or 2 for a cheap variant with no full-resolution convolutions: the first convolution
            has stride 2 (as in MONAI's UNet) and the decoder ends with a 2×2 transposed convolution
            ``dec0_up`` back to full resolution before the 1×1 output convolution. The total down-sampling
            factor becomes ``2 ** depth``. Training steps are 3-4× faster on CPU (unet3d, depth 3, a
            (40, 56, 40) patch).
        full_res_skip: with ``stem_stride=2``, the channels of a 3×3 convolution of the input at full resolution
            (``full_res``, then norm and activation) concatenated with ``dec0_up`` before the output (0: none): the
            only full-resolution path of the network, so that boundaries are not drawn from half-resolution
            features alone, for about a tenth more time per step (the CPU recipe uses 4: on MSD Hippocampus after
            10 minutes on a 2-core AMD EPYC with oneDNN at AVX2, held-out dice 0.874 against 0.871 without).
            Ignored with ``stem_stride=1``, whose first level is at full resolution.
        backbone: 2D only: a pretrained encoder from ``keras.applications`` (``utils.settings.BACKBONE_NAMES``,
            see ``utils/backbones.py``) instead of the U-Net's own. A learned 1×1 convolution ``input_adapter`` maps
            the ``C`` channels to the encoder's 3, the nested model ``encoder`` gives features at strides 2 to 32,
            and the decoder (``dec{l}_up``, ``dec{l}_concat``, ``dec{l}_conv{i}`` at stride ``2**l``, ``filters *
            filter_growth**l`` channels) returns to full resolution. ``depth``, ``downsample``, ``residual`` and
            ``stem_stride`` do not apply; spatial sizes must be multiples of 32.
        encoder_weights: with ``backbone``: ``None`` (random), ``"imagenet"`` (Keras's cache) or a weights file.
        name: model name (default ``unet2d`` / ``unet3d``).

    Returns:
        A model mapping ``(B, *spatial, C)`` to ``(B, *spatial, num_classes)`` probabilities (or a list of
        outputs with ``deep_supervision``).

    Raises:
        ValueError: for an unknown option value, or when a fixed spatial size is not divisible by the total
            down-sampling factor ``stem_stride * 2 ** (depth - 1)`` (32 with a ``backbone``).
        FileNotFoundError: ``encoder_weights`` names a file that does not exist.
    """
    ndim = _spatial_ndim(input_shape)
    if backbone is not None or encoder_weights is not None:
        return _backbone_unet_graph(
            input_shape, num_classes, model_name=name or f"unet{ndim}d", backbone=backbone,
            encoder_weights=encoder_weights, filters=filters, filter_growth=filter_growth, max_filters=max_filters,
            convs_per_level=convs_per_level, norm=norm, norm_groups=norm_groups, activation=activation,
            dropout=dropout, upsample=upsample, deep_supervision=deep_supervision,
            output_activation=output_activation,
        )  # fmt: skip
    return _unet_graph(
        input_shape,
        num_classes,
        model_name=name or f"unet{ndim}d",
        block="residual" if residual else "conv",
        attention=False,
        depth=depth,
        filters=filters,
        filter_growth=filter_growth,
        max_filters=max_filters,
        convs_per_level=convs_per_level,
        norm=norm,
        norm_groups=norm_groups,
        activation=activation,
        dropout=dropout,
        upsample=upsample,
        downsample=downsample,
        deep_supervision=deep_supervision,
        output_activation=output_activation,
        stem_stride=stem_stride,
        full_res_skip=full_res_skip,
    )


def resunet(
    input_shape: Sequence[int | None],
    num_classes: int,
    *,
    depth: int = 4,
    filters: int = 16,
    filter_growth: float = 2,
    max_filters: int = 320,
    convs_per_level: int = 2,
    norm: str = "batch",
    norm_groups: int = 8,
    activation: str = "prelu",
    dropout: float = 0.0,
    upsample: str = "transpose",
    deep_supervision: bool = False,
    output_activation: str = "softmax",
    stem_stride: int = 1,
    name: str | None = None,
) -> keras.Model:
    """Residual U-Net with pre-activation units, as in the BraTS seed (Zhang, Liu & Wang 2018, "Road
    extraction by deep residual U-Net"; units from He et al. 2016, "Identity mappings in deep residual
    networks").

    Every level is one pre-activation unit, ``convs_per_level`` × (norm → PReLU → 3×3 conv) plus an identity
    or 1×1 shortcut; levels below the first down-sample with a stride-2 first convolution (and a strided 1×1
    shortcut). The decoder up-samples, concatenates the skip and applies a unit; a final norm → activation
    precedes the 1×1 output convolution. Layers are named ``enc{l}_conv{i}``, ``enc{l}_skip``, ``enc{l}_add``,
    ``dec{l}_up``, ``dec{l}_concat``, ``head_norm``, ``out``.

    Args:
        input_shape: ``(H, W, C)`` or ``(D, H, W, C)``; spatial sizes may be None.
        num_classes: output channels.
        depth, filters, filter_growth, max_filters, convs_per_level, norm, norm_groups, dropout, upsample,
            deep_supervision, output_activation, stem_stride: as in ``unet``.
        activation: ``"prelu"`` (one learned slope per channel), ``"leaky_relu"`` or any Keras activation.
        name: model name (default ``resunet2d`` / ``resunet3d``).

    Returns:
        A model mapping ``(B, *spatial, C)`` to ``(B, *spatial, num_classes)`` (a list with deep supervision).

    Raises:
        ValueError: for an unknown option value, or when a fixed spatial size is not divisible by
            ``stem_stride * 2 ** (depth - 1)``.
    """
    ndim = _spatial_ndim(input_shape)
    return _unet_graph(
        input_shape, num_classes, model_name=name or f"resunet{ndim}d", block="preact", attention=False,
        depth=depth, filters=filters, filter_growth=filter_growth, max_filters=max_filters,
        convs_per_level=convs_per_level, norm=norm, norm_groups=norm_groups, activation=activation,
        dropout=dropout, upsample=upsample, downsample="strided", deep_supervision=deep_supervision,
        output_activation=output_activation, stem_stride=stem_stride,
    )  # fmt: skip


def attention_unet(
    input_shape: Sequence[int | None],
    num_classes: int,
    *,
    depth: int = 4,
    filters: int = 16,
    filter_growth: float = 2,
    max_filters: int = 320,
    convs_per_level: int = 2,
    norm: str = "batch",
    norm_groups: int = 8,
    activation: str = "leaky_relu",
    dropout: float = 0.0,
    upsample: str = "transpose",
    downsample: str = "maxpool",
    residual: bool = False,
    deep_supervision: bool = False,
    output_activation: str = "softmax",
    stem_stride: int = 1,
    name: str | None = None,
) -> keras.Model:
    """Attention U-Net (Oktay et al. 2018, "Attention U-Net: learning where to look for the pancreas").

    The ``unet`` with an additive attention gate on every skip connection: the up-sampled decoder features
    ``g`` gate the encoder features ``x`` of the same level, ``x * sigmoid(psi(relu(theta(x) + phi(g))))``,
    with one attention coefficient per voxel (as in MONAI's AttentionUnet). Gate layers are named
    ``dec{l}_gate_theta``, ``dec{l}_gate_phi``, ``dec{l}_gate_psi``, ``dec{l}_gate_alpha`` (the attention map,
    ``(B, *spatial, 1)``).

    Args:
        input_shape: ``(H, W, C)`` or ``(D, H, W, C)``; spatial sizes may be None.
        num_classes: output channels.
        depth, filters, filter_growth, max_filters, convs_per_level, norm, norm_groups, activation, dropout,
            upsample, downsample, residual, deep_supervision, output_activation, stem_stride: as in ``unet``.
        name: model name (default ``attention_unet2d`` / ``attention_unet3d``).

    Returns:
        A model mapping ``(B, *spatial, C)`` to ``(B, *spatial, num_classes)`` (a list with deep supervision).

    Raises:
        ValueError: for an unknown option value, or when a fixed spatial size is not divisible by
            ``stem_stride * 2 ** (depth - 1)``.
    """
    ndim = _spatial_ndim(input_shape)
    return _unet_graph(
        input_shape, num_classes, model_name=name or f"attention_unet{ndim}d",
        block="residual" if residual else "conv", attention=True, depth=depth, filters=filters,
        filter_growth=filter_growth, max_filters=max_filters, convs_per_level=convs_per_level, norm=norm,
        norm_groups=norm_groups, activation=activation, dropout=dropout, upsample=upsample,
        downsample=downsample, deep_supervision=deep_supervision, output_activation=output_activation,
        stem_stride=stem_stride,
    )  # fmt: skip


# Networks without a U-shaped decoder: dilated context network, FCN-8s, two-pathway CNN.


def dilated(
    input_shape: Sequence[int | None],
    num_classes: int,
    *,
    filters: int = 32,
    front_convs: int = 2,
    dilations: Sequence[int] = (1, 1, 2, 4, 8, 16, 1),
    context_filters: int | None = None,
    norm: str = "batch",
    norm_groups: int = 8,
    activation: str = "relu",
    dropout: float = 0.0,
    output_activation: str = "softmax",
    name: str | None = None,
) -> keras.Model:
    """Dilated convolutional network of the sarcoma seed: a front end plus the context-aggregation module of
    Yu & Koltun 2016 ("Multi-scale context aggregation by dilated convolutions").

    No down-sampling, so any input size works and the output is at input resolution. The front end is
    ``front_convs`` 3×3 convolutions (``front_conv{i}``); the context module is one 3×3 convolution per entry
    of ``dilations`` (``ctx_conv{i}``, dilation rates 1, 1, 2, 4, 8, 16, 1 as in the paper's basic module; the
    receptive field grows exponentially) followed by a 1×1 convolution (``ctx_conv{n+1}``) and the 1×1 output
    convolution. Every convolution is followed by ``norm`` and ``activation``.

    Args:
        input_shape: ``(H, W, C)`` or ``(D, H, W, C)``; spatial sizes may be None.
        num_classes: output channels.
        filters: channels of the front end.
        front_convs: number of front-end convolutions (0 allowed).
        dilations: dilation rate of each 3×3 context convolution.
        context_filters: channels of the context module (default ``filters``).
        norm, norm_groups, activation, output_activation: as in ``unet`` (activation default ``"relu"``).
        dropout: dropout rate before the output convolution.
        name: model name (default ``dilated2d`` / ``dilated3d``).

    Returns:
        A model mapping ``(B, *spatial, C)`` to ``(B, *spatial, num_classes)``.

    Raises:
        ValueError: for an unknown option value or a non-positive dilation.
    """
    ndim = _spatial_ndim(input_shape)
    _check_output_activation(output_activation, num_classes)
    _check_choice("norm", norm, NORMS)
    dilations = tuple(int(d) for d in dilations)
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be a non-empty list of positive integers; got {dilations!r}")
    if front_convs < 0 or filters < 1:
        raise ValueError(f"front_convs must be >= 0 and filters >= 1; got {front_convs!r}, {filters!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    context_filters = context_filters or filters

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    for i in range(1, front_convs + 1):
        x = _conv_norm_act(x, ndim, filters, f"front_conv{i}", norm, activation, groups=norm_groups)
    for i, rate in enumerate(dilations, start=1):
        x = _conv_norm_act(
            x, ndim, context_filters, f"ctx_conv{i}", norm, activation, dilation_rate=rate, groups=norm_groups
        )
    x = _conv_norm_act(
        x, ndim, context_filters, f"ctx_conv{len(dilations) + 1}", norm, activation, kernel_size=1,
        groups=norm_groups,
    )  # fmt: skip
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_drop")(x)
    outputs = _output_head(x, ndim, num_classes, output_activation)
    return keras.Model(inputs, outputs, name=name or f"dilated{ndim}d")


def fcn(
    input_shape: Sequence[int | None],
    num_classes: int,
    *,
    depth: int | None = None,
    filters: int = 16,
    filter_growth: float = 2,
    max_filters: int = 320,
    convs_per_level: int = 2,
    head_filters: int | None = None,
    norm: str = "batch",
    norm_groups: int = 8,
    activation: str = "relu",
    dropout: float = 0.0,
    output_activation: str = "softmax",
    name: str | None = None,
) -> keras.Model:
    """FCN-8s style fully convolutional network (Long, Shelhamer & Darrell 2015, "Fully convolutional networks
    for semantic segmentation").

    A VGG-like encoder of ``depth`` levels, each ``convs_per_level`` 3×3 convolutions (``enc{l}_conv{i}``) and
    a 2× max pooling (``enc{l}_pool``); a head of a 3×3 and a 1×1 convolution (``fc6``, ``fc7``, the paper's
    convolutionalised fully connected layers). Class scores are taken at three depths (``score{depth}`` from
    ``fc7``, ``score{depth-1}`` and ``score{depth-2}`` from the pooled features), the coarsest is up-sampled
    2× by a transposed convolution (``up{l}``) and added to the next (``fuse{l}``), twice, and the result is
    up-sampled by ``2 ** (depth - 2)`` to input resolution (``up_out``) before the float32 activation ``out``.
    With ``depth=5`` this is FCN-8s (scores at 1/8, 1/16, 1/32).

    Args:
        input_shape: ``(H, W, C)`` or ``(D, H, W, C)``; spatial sizes may be None.
        num_classes: output channels.
        depth: number of 2× poolings, at least 3; default 5 (FCN-8s) in 2D and 3 in 3D (scores at 1/2, 1/4,
            1/8, which fits small 3D patches such as 40×56×40).
        filters, filter_growth, max_filters, convs_per_level: encoder channels, as in ``unet``.
        head_filters: channels of ``fc6``/``fc7`` (default the next level's channels, capped by
        ``max_filters``). norm, norm_groups, activation, output_activation: as in ``unet`` (activation default
        ``"relu"``). dropout: dropout rate after ``fc6`` and ``fc7``.
        name: model name (default ``fcn2d`` / ``fcn3d``).

    Returns:
        A model mapping ``(B, *spatial, C)`` to ``(B, *spatial, num_classes)``.

    Raises:
        ValueError: for an unknown option value, ``depth < 3``, or a fixed spatial size not divisible by
            ``2 ** depth``.
    """
    ndim = _spatial_ndim(input_shape)
    model_name = name or f"fcn{ndim}d"
    depth = (5 if ndim == 2 else 3) if depth is None else int(depth)
    _check_output_activation(output_activation, num_classes)
    _check_choice("norm", norm, NORMS)
    if depth < 3:
        raise ValueError(f"fcn needs depth >= 3 (scores at three depths); got depth={depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    _check_divisible(input_shape, 2**depth, model_name, f"depth={depth} poolings")
    head_filters = head_filters or _level_filters(depth + 1, filters, filter_growth, max_filters)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    pooled = {}
    for level in range(1, depth + 1):
        channels = _level_filters(level, filters, filter_growth, max_filters)
        x = _conv_block(
            x, ndim, channels, f"enc{level}", convs=convs_per_level, norm=norm, activation=activation,
            strides=1, norm_groups=norm_groups,
        )  # fmt: skip
        x = pooled[level] = _max_pool(ndim, name=f"enc{level}_pool")(x)
    for head_name, kernel in (("fc6", 3), ("fc7", 1)):
        x = _conv_norm_act(x, ndim, head_filters, head_name, norm, activation, kernel_size=kernel, groups=norm_groups)
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"{head_name}_drop")(x)

    def score(features, level):
        return _conv(ndim, num_classes, kernel_size=1, name=f"score{level}", kernel_initializer="zeros")(features)

    x = score(x, depth)
    for level in (depth - 1, depth - 2):
        x = _conv_transpose(ndim, num_classes, 4, 2, f"up{level + 1}")(x)
        x = layers.Add(name=f"fuse{level}")([x, score(pooled[level], level)])
    factor = 2 ** (depth - 2)
    x = _conv_transpose(ndim, num_classes, 2 * factor, factor, "up_out")(x)
    outputs = layers.Activation(output_activation, dtype="float32", name="out")(x)
    return keras.Model(inputs, outputs, name=model_name)


@keras.saving.register_keras_serializable(package="medseg")
class Maxout(layers.Layer):
    """Maxout over groups of channels (Goodfellow et al. 2013, "Maxout networks").

    Maps ``(B, *spatial, units * pieces)`` to ``(B, *spatial, units)``: output channel ``c`` is the maximum of
    the input channels ``c, units + c, ..., (pieces - 1) * units + c``.

    Args:
        pieces: number of linear pieces per unit.
    """

    def __init__(self, pieces: int = 2, **kwargs):
        super().__init__(**kwargs)
        if int(pieces) < 1:
            raise ValueError(f"pieces must be at least 1; got {pieces!r}")
        self.pieces = int(pieces)

    def build(self, input_shape):
        if input_shape[-1] is None or input_shape[-1] % self.pieces:
            raise ValueError(f"Maxout: channels {input_shape[-1]} are not divisible by pieces={self.pieces}")
        self.built = True

    def call(self, inputs):
        units = inputs.shape[-1] // self.pieces
        outputs = inputs[..., :units]
        for i in range(1, self.pieces):
            outputs = ops.maximum(outputs, inputs[..., i * units : (i + 1) * units])
        return outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // self.pieces)

    def get_config(self):
        return {**super().get_config(), "pieces": self.pieces}


TWOPATH_CONTEXT = 32  # the two-pathway network's receptive field is 33 × 33: it trims 16 pixels on each side


def _twopath_trunk(x, num_classes, prefix, *, local_filters, global_filters, pieces, dropout):
    """Local and global pathway, concatenated, then the 21×21 class-score convolution (all 'valid').

    ``(B, H, W, C)`` → logits ``(B, H - 32, W - 32, num_classes)``.
    """

    def maxout_conv(inputs, filters, kernel, name):
        y = layers.Conv2D(filters * pieces, kernel, padding="valid", name=name)(inputs)
        y = Maxout(pieces, name=f"{name}_maxout")(y)
        return layers.Dropout(dropout, name=f"{name}_drop")(y) if dropout > 0 else y

    local = maxout_conv(x, local_filters, 7, f"{prefix}local_conv1")
    local = layers.MaxPooling2D(4, strides=1, name=f"{prefix}local_pool1")(local)
    local = maxout_conv(local, local_filters, 3, f"{prefix}local_conv2")
    local = layers.MaxPooling2D(2, strides=1, name=f"{prefix}local_pool2")(local)
    glob = maxout_conv(x, global_filters, 13, f"{prefix}global_conv1")
    y = layers.Concatenate(name=f"{prefix}concat")([local, glob])
    return layers.Conv2D(num_classes, 21, padding="valid", name=f"{prefix}score")(y)


def twopath(
    input_shape: Sequence[int | None],
    num_classes: int,
    *,
    local_filters: int = 64,
    global_filters: int = 160,
    pieces: int = 2,
    dropout: float = 0.0,
    padding: str = "same",
    cascade: bool = False,
    output_activation: str = "softmax",
    name: str | None = None,
) -> keras.Model:
    """Two-pathway CNN of Havaei et al. 2017 ("Brain tumor segmentation with deep neural networks"), 2D only.

    A local path (7×7 maxout convolution, 4×4 max pooling with stride 1, 3×3 maxout convolution, 2×2 max
    pooling with stride 1; ``local_conv1`` ...) and a global path (13×13 maxout convolution, ``global_conv1``)
    see the same input; their features are concatenated and a 21×21 convolution (``score``) gives the class
    scores of the centre pixel of each 33×33 window. All convolutions are 'valid', so the network labels the
    centre of a patch during training and runs fully convolutionally on whole slices at inference.

    With ``cascade=True`` this is the paper's InputCascadeCNN: the class probabilities of a first two-pathway
    net (layers prefixed ``stage1_``) are concatenated to the input of a second one, which doubles the
    context.

    Args:
        input_shape: ``(H, W, C)``; spatial sizes may be None.
        num_classes: output channels.
        local_filters: maxout units of the local path's convolutions (64 in the paper).
        global_filters: maxout units of the global path (160 in the paper).
        pieces: linear pieces per maxout unit.
        dropout: dropout rate after each maxout convolution.
        padding: ``"same"`` zero-pads the input by 16 pixels per side (32 with ``cascade``) so that the output
            has the input's size, as the other models; ``"valid"`` is the paper's network, whose output is
            ``(B, H - 32, W - 32, num_classes)`` (``H - 64`` with ``cascade``), the centre of the input.
        cascade: build the InputCascadeCNN.
        output_activation: as in ``unet``.
        name: model name (default ``twopath2d``).

    Returns:
        A model mapping ``(B, H, W, C)`` to ``(B, H, W, num_classes)`` (smaller with ``padding="valid"``).

    Raises:
        ValueError: for a 3D ``input_shape``, an unknown option value, or (``padding="valid"``) a fixed
            spatial size smaller than the receptive field, 33 (65 with ``cascade``).
    """
    ndim = _spatial_ndim(input_shape)
    if ndim != 2:
        raise ValueError(f"twopath is a 2D network; got input_shape {tuple(input_shape)!r}")
    _check_output_activation(output_activation, num_classes)
    _check_choice("padding", padding, ("same", "valid"))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    context = TWOPATH_CONTEXT * (2 if cascade else 1)
    for size in tuple(input_shape)[:-1]:
        if padding == "valid" and size is not None and size <= context:
            raise ValueError(
                f"twopath with padding='valid' needs spatial sizes above {context} (its receptive field is "
                f"{context + 1}); got input_shape {tuple(input_shape)!r}"
            )
    options = dict(local_filters=local_filters, global_filters=global_filters, pieces=pieces, dropout=dropout)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if padding == "same":
        x = layers.ZeroPadding2D(context // 2, name="pad")(x)
    if cascade:
        first = _twopath_trunk(x, num_classes, "stage1_", **options)
        first = layers.Activation(output_activation, name="stage1_out")(first)
        half = TWOPATH_CONTEXT // 2
        x = layers.Cropping2D(half, name="cascade_crop")(x)
        x = layers.Concatenate(name="cascade_concat")([x, first])
    x = _twopath_trunk(x, num_classes, "", **options)
    outputs = layers.Activation(output_activation, dtype="float32", name="out")(x)
    return keras.Model(inputs, outputs, name=name or "twopath2d")


# The registry and the single way in.

MODELS: dict[str, Callable[..., keras.Model]] = {
    "unet2d": unet,
    "unet3d": unet,
    "resunet2d": resunet,
    "resunet3d": resunet,
    "attention_unet2d": attention_unet,
    "attention_unet3d": attention_unet,
    "dilated2d": dilated,
    "dilated3d": dilated,
    "fcn2d": fcn,
    "fcn3d": fcn,
    "twopath2d": twopath,
}


def build_model(name: str, input_shape: Sequence[int | None], num_classes: int, **kwargs) -> keras.Model:
    """Builds the architecture ``name`` (a key of ``MODELS``) for ``input_shape`` and ``num_classes``.

    Args:
        name: e.g. ``"unet3d"``; the ``2d``/``3d`` suffix must match ``len(input_shape) - 1``.
        input_shape: channels last, ``(H, W, C)`` or ``(D, H, W, C)``; spatial sizes may be None.
        num_classes: output channels (classes including background for softmax).
        **kwargs: options of the builder (see its docstring), e.g. ``depth=3, filters=8``.

    Returns:
        The ``keras.Model`` (not compiled), named ``name`` unless ``kwargs`` sets ``name``.

    Raises:
        ValueError: for an unknown name, a dimension that does not match the name, an unknown option, or a bad
            value.
    """
    if is_user_builder(name):
        return build_user_model(name, input_shape, num_classes, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or give FILE.py:FUNCTION")
    ndim = _spatial_ndim(input_shape)
    if name.endswith(("2d", "3d")) and int(name[-2]) != ndim:
        raise ValueError(
            f"model {name!r} is {name[-2]}D but input_shape {tuple(input_shape)!r} has {ndim} spatial axes"
        )
    builder = MODELS[name]
    allowed = [p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; options are {allowed}")
    kwargs.setdefault("name", name)
    return builder(tuple(input_shape), int(num_classes), **kwargs)


# Your own architecture: --model my_models.py:build_my_net or --model package.module:build_my_net.


def is_user_builder(name: str) -> bool:
    """Whether ``name`` names a user's builder (``FILE.py:FUNCTION`` or ``module:FUNCTION``) rather than a key of
    :data:`MODELS`."""
    return isinstance(name, str) and re.fullmatch(USER_MODEL_PATTERN, name) is not None


def builder_source(name: str) -> str:
    """Where a user's builder comes from, for ``config.json``: the file's absolute path, or the module's name."""
    source = name.rsplit(":", 1)[0]
    return str(Path(source).resolve()) if source.endswith(".py") else source


def load_builder(name: str, source: str | None = None) -> Callable[..., keras.Model]:
    """Import a user's builder ``FILE.py:FUNCTION`` or ``module:FUNCTION`` and check its signature.

    Importing the file (or module) also registers the Keras objects it defines with
    ``@keras.saving.register_keras_serializable``, so that a saved run loads in safe mode.

    Args:
        name: ``FILE.py:FUNCTION`` (relative to the working folder) or ``package.module:FUNCTION``.
        source: where the file is when not at ``FILE.py`` (the absolute path a run's ``config.json`` recorded).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a module that cannot be imported, no such function, or a function that does not take
            ``(name, input_shape, num_classes, **kwargs)``.
    """
    if not is_user_builder(name):
        raise ValueError(f"model {name!r}: expected FILE.py:FUNCTION or package.module:FUNCTION")
    where, function = name.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where) if Path(where).is_file() or not source else Path(source)
        module = _import_file(path, name)
    else:
        try:
            module = importlib.import_module(source or where)
        except ImportError as error:
            raise ValueError(f"model {name!r}: cannot import module {where!r} ({error})") from error
    builder = getattr(module, function, None)
    if not callable(builder):
        raise ValueError(f"model {name!r}: {where} defines no function {function!r}")
    try:
        inspect.signature(builder).bind(function, (16, 16, 1), 2)
    except TypeError as error:
        raise ValueError(
            f"model {name!r}: {function}{inspect.signature(builder)} does not take (name, input_shape, num_classes, "
            f"**kwargs) like model.build_model ({error})"
        ) from error
    return builder


def _import_file(path: Path, name: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: builder file of --model {name} not found")
    module_name = "medseg_user_model_" + re.sub(r"\W", "_", str(path.resolve()))
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ValueError(f"{path}: the builder file of --model {name} fails to import ({error!r})") from error
    return module


def build_user_model(
    name: str, input_shape: Sequence[int | None], num_classes: int, source: str | None = None, **kwargs
) -> keras.Model:
    """Build a user's architecture (:func:`load_builder`) and check that it gives ``num_classes`` channels.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_builder`; options the builder refuses; a builder that does not
            return a ``keras.Model`` with ``num_classes`` output channels.
    """
    builder = load_builder(name, source)
    function = name.rsplit(":", 1)[1]
    try:
        built = builder(function, tuple(input_shape), int(num_classes), **kwargs)
    except TypeError as error:
        raise ValueError(f"model {name!r} refused its options {sorted(kwargs)} ({error})") from error
    if not isinstance(built, keras.Model):
        raise ValueError(f"model {name!r} returned {type(built).__name__}, not a keras.Model")
    channels = [output.shape[-1] for output in built.outputs]
    if channels[0] != num_classes:
        raise ValueError(f"model {name!r} gives {channels[0]} output channels; the dataset has {num_classes} classes")
    return built


def model_summary_text(model: keras.Model, line_length: int = 140) -> str:
    """The text of ``model.summary()`` (plain text, for ``runs/<name>/model_summary.txt``).

    Keras draws the table with ``rich``, which cuts it at the terminal width (80 columns when not a terminal);
    ``COLUMNS`` is raised while the table is drawn so that no column is cut.
    """
    lines = []
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(line_length + 10)
    try:
        model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=line_length)
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(lines).rstrip() + "\n"
