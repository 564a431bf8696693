"""Segmentation losses in `keras.ops`, registered so that saved `.keras` models load without `custom_objects`.

Every loss takes channels-last tensors: `y_pred` probabilities (the softmax output) of shape `(B, *spatial, C)` with
one to three spatial axes, and `y_true` either one-hot of the same shape or an integer label map `(B, *spatial)`
(Keras's "sparse" form, what the training samplers yield: 12 times fewer bytes to build and hand over than float32
one-hot for three classes); a label map is one-hot encoded inside the loss. A single-channel `y_pred` (C = 1) is
read as a sigmoid foreground probability: the overlap losses then score that channel alone (as MONAI does with
`sigmoid=True`) and the cross-entropy losses use the binary form. A loss is minimised and its best value is 0;
a class absent from both `y_true` and `y_pred` never produces NaN.

Each loss is a pure function returning one value per sample, shape `(B,)` (with `batch=True` the single batch
value is repeated for each sample, so that the mean over the batch is that value), plus a thin
`keras.losses.Loss` class. Option names follow MONAI (`include_background`, `batch`, `squared_pred`,
`smooth_nr`, `smooth_dr`, `w_type`, `alpha`, `beta`, `gamma`, `lambda_dice`, `lambda_ce`, `lambda_focal`), and
with the same options `dice`, `gdl`, `dice_ce` and `tversky` give MONAI's `DiceLoss`, `GeneralizedDiceLoss`,
`DiceCELoss` and `TverskyLoss` (MONAI's cross-entropy takes logits; ours takes their softmax, which gives the
same value up to the clipping of probabilities to `[EPSILON, 1 - EPSILON]`).

Use `get_loss(name, **kwargs)` to build one by name; `LOSSES` lists the names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import keras
from keras import ops

EPSILON = 1e-7
_GDL_WEIGHTS = ("square", "simple", "uniform")


def dense_truth(y_true, y_pred):
    """`y_true` as one-hot in the dtype of `y_pred`: a label map `(B, *spatial)` one rank below `y_pred` is one-hot
    encoded over the channels of `y_pred` (for a single sigmoid channel it becomes that channel); one-hot truth is
    only cast."""
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape) - 1:
        channels = y_pred.shape[-1]
        if channels == 1:
            return ops.expand_dims(ops.cast(y_true, y_pred.dtype), -1)
        return ops.one_hot(ops.cast(y_true, "int32"), channels, dtype=y_pred.dtype)
    return ops.cast(y_true, y_pred.dtype)


def _check_inputs(y_true, y_pred):
    """Checks ranks and channel counts; returns `y_true` one-hot in the dtype of `y_pred`."""
    y_pred = ops.convert_to_tensor(y_pred)
    if len(y_pred.shape) < 3 or len(y_pred.shape) > 5:
        raise ValueError(
            f"y_pred must have shape (B, *spatial, C) with 1 to 3 spatial axes, got shape {tuple(y_pred.shape)}."
        )
    y_true = dense_truth(y_true, y_pred)
    if len(y_true.shape) != len(y_pred.shape):
        raise ValueError(
            f"y_true (shape {tuple(y_true.shape)}) and y_pred (shape {tuple(y_pred.shape)}) do not match: "
            "y_true must be one-hot (B, *spatial, C) or a label map (B, *spatial)."
        )
    channels_true, channels_pred = y_true.shape[-1], y_pred.shape[-1]
    if channels_true is not None and channels_pred is not None and channels_true != channels_pred:
        raise ValueError(
            f"y_true has {channels_true} channels but y_pred has {channels_pred}; "
            "y_true must be one-hot (B, *spatial, C) or a label map (B, *spatial)."
        )
    return y_true, y_pred


def _drop_background(y_true, y_pred, include_background: bool):
    """Removes channel 0 unless `include_background` or there is a single (sigmoid) channel."""
    if include_background or y_pred.shape[-1] == 1:
        return y_true, y_pred
    return y_true[..., 1:], y_pred[..., 1:]


def _reduce_axes(y, batch: bool) -> list[int]:
    """The spatial axes of `y` (plus the batch axis when `batch`): the axes a dice sums over."""
    axes = list(range(1, len(y.shape) - 1))
    return [0, *axes] if batch else axes


def _per_sample(value, y):
    """Returns `value` of shape `(B, ...)` averaged to `(B,)`, or a scalar repeated to `(B,)`."""
    if len(value.shape) == 0:
        return value + ops.zeros_like(y[(slice(None),) + (0,) * (len(y.shape) - 1)])
    if len(value.shape) == 1:
        return value
    return ops.mean(ops.reshape(value, (ops.shape(value)[0], -1)), axis=-1)


def _as_binary_pair(y_true, y_pred):
    """Turns a single sigmoid channel into the two channels `[1 - p, p]`, so that softmax formulas apply."""
    if y_pred.shape[-1] != 1:
        return y_true, y_pred
    return ops.concatenate([1.0 - y_true, y_true], axis=-1), ops.concatenate([1.0 - y_pred, y_pred], axis=-1)


def _class_weight_vector(class_weights, num_channels: int, dtype):
    if class_weights is None:
        return None
    weights = ops.convert_to_tensor(list(class_weights), dtype=dtype)
    if len(class_weights) != num_channels:
        raise ValueError(
            f"class_weights has {len(class_weights)} values but y_pred has {num_channels} channels "
            "(give one weight per channel, background included; two for a single sigmoid channel)."
        )
    return weights


def dice_loss(
    y_true,
    y_pred,
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
):
    """Soft dice loss, `1 - (2 sum(p t) + smooth_nr) / (sum(p) + sum(t) + smooth_dr)` averaged over classes.

    Milletari et al., "V-Net", 3DV 2016. Equals MONAI's `DiceLoss` with the same options.

    Args:
        y_true: one-hot truth `(B, *spatial, C)` or a label map `(B, *spatial)`.
        y_pred: probabilities, shape `(B, *spatial, C)`.
        include_background: keep channel 0 in the average (ignored for a single channel).
        batch: sum over the batch before dividing (one dice per class for the whole batch).
        squared_pred: use `sum(p**2) + sum(t**2)` in the denominator.
        smooth_nr: added to the numerator; a class absent from truth and prediction then scores 0 loss.
        smooth_dr: added to the denominator; avoids division by zero.

    Returns:
        The loss per sample, shape `(B,)`.

    Raises:
        ValueError: when the shapes of `y_true` and `y_pred` differ.
    """
    y_true, y_pred = _check_inputs(y_true, y_pred)
    y_true, y_pred = _drop_background(y_true, y_pred, include_background)
    axes = _reduce_axes(y_pred, batch)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    if squared_pred:
        total = ops.sum(ops.square(y_true), axis=axes) + ops.sum(ops.square(y_pred), axis=axes)
    else:
        total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    loss = 1.0 - (2.0 * intersection + smooth_nr) / (total + smooth_dr)
    return _per_sample(ops.mean(loss, axis=-1), y_true)


def generalized_dice_loss(
    y_true,
    y_pred,
    include_background: bool = True,
    batch: bool = False,
    w_type: str = "square",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
):
    """Generalized dice loss: dice with class weights `1 / volume**2`, `1 / volume` or 1 (`w_type`).

    Sudre et al., "Generalised Dice overlap as a deep learning loss function for highly unbalanced
    segmentations", DLMIA 2017. Equals MONAI's `GeneralizedDiceLoss`: with `square` or `simple` weights a class absent
    from the truth gets the largest weight of the present classes, and when no class is present every weight is
    0 and the loss is 0 whatever the prediction (use `dice` to penalise false positives on empty images).

    Args:
        y_true: one-hot truth `(B, *spatial, C)` or a label map `(B, *spatial)`.
        y_pred: probabilities, shape `(B, *spatial, C)`.
        include_background: keep channel 0 (ignored for a single channel).
        batch: compute one loss for the whole batch.
        w_type: `"square"`, `"simple"` or `"uniform"`.
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.

    Returns:
        The loss per sample, shape `(B,)`.

    Raises:
        ValueError: for an unknown `w_type` or mismatched shapes.
    """
    if w_type not in _GDL_WEIGHTS:
        raise ValueError(f"w_type must be one of {list(_GDL_WEIGHTS)}, got {w_type!r}.")
    y_true, y_pred = _check_inputs(y_true, y_pred)
    y_true, y_pred = _drop_background(y_true, y_pred, include_background)
    axes = _reduce_axes(y_pred, batch)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    volume = ops.sum(y_true, axis=axes)
    if w_type == "uniform":
        weights = ops.ones_like(volume)
    else:
        present = volume > 0
        safe_volume = ops.where(present, volume, ops.ones_like(volume))
        weights = 1.0 / (ops.square(safe_volume) if w_type == "square" else safe_volume)
        weights = ops.where(present, weights, ops.zeros_like(weights))
        largest = ops.max(weights, axis=-1, keepdims=True)
        weights = ops.stop_gradient(ops.where(present, weights, largest))
    numerator = 2.0 * ops.sum(intersection * weights, axis=-1) + smooth_nr
    denominator = ops.sum(total * weights, axis=-1) + smooth_dr
    return _per_sample(1.0 - numerator / denominator, y_true)


def tversky_loss(
    y_true,
    y_pred,
    include_background: bool = True,
    batch: bool = False,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
):
    """Tversky loss, `1 - (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr)` averaged over classes.

    Salehi et al., "Tversky loss function for image segmentation using 3D fully convolutional deep networks",
    MLMI 2017. `alpha` weighs false positives, `beta` false negatives; 0.5 / 0.5 is the dice loss. Equals
    MONAI's `TverskyLoss` with the same options.

    Args:
        y_true: one-hot truth `(B, *spatial, C)` or a label map `(B, *spatial)`.
        y_pred: probabilities, shape `(B, *spatial, C)`.
        include_background: keep channel 0 (ignored for a single channel).
        batch: compute one loss per class for the whole batch.
        alpha: weight of the false positives.
        beta: weight of the false negatives.
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.

    Returns:
        The loss per sample, shape `(B,)`.
    """
    y_true, y_pred = _check_inputs(y_true, y_pred)
    y_true, y_pred = _drop_background(y_true, y_pred, include_background)
    axes = _reduce_axes(y_pred, batch)
    true_pos = ops.sum(y_true * y_pred, axis=axes)
    false_pos = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    false_neg = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    score = (true_pos + smooth_nr) / (true_pos + alpha * false_pos + beta * false_neg + smooth_dr)
    return _per_sample(ops.mean(1.0 - score, axis=-1), y_true)


def focal_loss(y_true, y_pred, gamma: float = 2.0, class_weights: Sequence[float] | None = None):
    """Softmax focal loss, `-sum_c w_c (1 - p_c)**gamma t_c log(p_c)` averaged over voxels.

    Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, in its multi-class softmax form;
    `class_weights` plays the part of the paper's alpha. With `gamma=0` and no weights it is cross-entropy.
    For a single sigmoid channel it is the binary (sigmoid) focal loss. MONAI's `FocalLoss(use_softmax=True)`
    also averages over the channel axis, so its value is ours divided by C.

    Args:
        y_true: one-hot truth `(B, *spatial, C)` or a label map `(B, *spatial)`.
        y_pred: probabilities, shape `(B, *spatial, C)`; clipped to `[EPSILON, 1 - EPSILON]`.
        gamma: focusing parameter (>= 0).
        class_weights: optional weight per channel (background included), length C.

    Returns:
        The loss per sample, shape `(B,)`.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}.")
    y_true, y_pred = _check_inputs(y_true, y_pred)
    y_true, y_pred = _as_binary_pair(y_true, y_pred)
    probabilities = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
    terms = -y_true * ops.log(probabilities)
    if gamma:
        terms = terms * ops.power(1.0 - probabilities, gamma)
    weights = _class_weight_vector(class_weights, y_pred.shape[-1], y_pred.dtype)
    if weights is not None:
        terms = terms * weights
    return _per_sample(ops.sum(terms, axis=-1), y_true)


def cross_entropy_loss(y_true, y_pred, class_weights: Sequence[float] | None = None):
    """Categorical cross-entropy `-sum_c w_c t_c log(p_c)` averaged over voxels (binary for a single channel).

    Equals PyTorch's `CrossEntropyLoss(weight=class_weights)` on the logits with one-hot (probability)
    targets, hence the cross-entropy term of MONAI's `DiceCELoss`: weighted terms are averaged over voxels,
    not divided by the sum of the weights.

    Args:
        y_true: one-hot truth `(B, *spatial, C)` or a label map `(B, *spatial)`.
        y_pred: probabilities, shape `(B, *spatial, C)`; clipped to `[EPSILON, 1 - EPSILON]`.
        class_weights: optional weight per channel (background included), length C.

    Returns:
        The loss per sample, shape `(B,)`.
    """
    return focal_loss(y_true, y_pred, gamma=0.0, class_weights=class_weights)


def dice_ce_loss(
    y_true,
    y_pred,
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
):
    """`lambda_dice * dice_loss + lambda_ce * cross_entropy_loss`, as MONAI's `DiceCELoss`.

    The cross-entropy always includes the background channel (as in MONAI); the dice options apply to the
    dice term.

    Returns:
        The loss per sample, shape `(B,)`.
    """
    dice = dice_loss(y_true, y_pred, include_background, batch, squared_pred, smooth_nr, smooth_dr)
    return lambda_dice * dice + lambda_ce * cross_entropy_loss(y_true, y_pred)


def generalized_dice_ce_loss(
    y_true,
    y_pred,
    include_background: bool = True,
    batch: bool = False,
    w_type: str = "square",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
):
    """`lambda_dice * generalized_dice_loss + lambda_ce * cross_entropy_loss`.

    Returns:
        The loss per sample, shape `(B,)`.
    """
    gdl = generalized_dice_loss(y_true, y_pred, include_background, batch, w_type, smooth_nr, smooth_dr)
    return lambda_dice * gdl + lambda_ce * cross_entropy_loss(y_true, y_pred)


def dice_focal_loss(
    y_true,
    y_pred,
    include_background: bool = True,
    batch: bool = False,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    gamma: float = 2.0,
    class_weights: Sequence[float] | None = None,
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
):
    """`lambda_dice * dice_loss + lambda_focal * focal_loss` (MONAI's `DiceFocalLoss` divides its focal term by C).

    The focal term always includes the background channel, and `gamma` and `class_weights` apply to it only.

    Returns:
        The loss per sample, shape `(B,)`.
    """
    dice = dice_loss(y_true, y_pred, include_background, batch, squared_pred, smooth_nr, smooth_dr)
    return lambda_dice * dice + lambda_focal * focal_loss(y_true, y_pred, gamma, class_weights)


class _OptionsLoss(keras.losses.Loss):
    """Applies a pure loss function with fixed keyword options; the options are the config."""

    def __init__(self, fn: Callable, options: dict, reduction: str, name: str, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._fn = fn
        self._options = options

    def call(self, y_true, y_pred):
        return self._fn(y_true, y_pred, **self._options)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(self._options)
        return config


def _weights_list(class_weights):
    return None if class_weights is None else [float(weight) for weight in class_weights]


@keras.saving.register_keras_serializable(package="medseg")
class DiceLoss(_OptionsLoss):
    """Soft dice loss (see `dice_loss`)."""

    def __init__(
        self,
        include_background: bool = True,
        batch: bool = False,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        reduction: str = "sum_over_batch_size",
        name: str = "dice",
        dtype=None,
    ):
        options = dict(
            include_background=include_background,
            batch=batch,
            squared_pred=squared_pred,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )
        super().__init__(dice_loss, options, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="medseg")
class GeneralizedDiceLoss(_OptionsLoss):
    """Generalized dice loss of Sudre et al. (see `generalized_dice_loss`)."""

    def __init__(
        self,
        include_background: bool = True,
        batch: bool = False,
        w_type: str = "square",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        reduction: str = "sum_over_batch_size",
        name: str = "gdl",
        dtype=None,
    ):
        if w_type not in _GDL_WEIGHTS:
            raise ValueError(f"w_type must be one of {list(_GDL_WEIGHTS)}, got {w_type!r}.")
        options = dict(
            include_background=include_background,
            batch=batch,
            w_type=w_type,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )
        super().__init__(generalized_dice_loss, options, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="medseg")
class DiceCELoss(_OptionsLoss):
    """Dice plus cross-entropy (see `dice_ce_loss`)."""

    def __init__(
        self,
        include_background: bool = True,
        batch: bool = False,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        reduction: str = "sum_over_batch_size",
        name: str = "dice_ce",
        dtype=None,
    ):
        options = dict(
            include_background=include_background,
            batch=batch,
            squared_pred=squared_pred,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )
        super().__init__(dice_ce_loss, options, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="medseg")
class GeneralizedDiceCELoss(_OptionsLoss):
    """Generalized dice plus cross-entropy (see `generalized_dice_ce_loss`)."""

    def __init__(
        self,
        include_background: bool = True,
        batch: bool = False,
        w_type: str = "square",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        reduction: str = "sum_over_batch_size",
        name: str = "gdl_ce",
        dtype=None,
    ):
        if w_type not in _GDL_WEIGHTS:
            raise ValueError(f"w_type must be one of {list(_GDL_WEIGHTS)}, got {w_type!r}.")
        options = dict(
            include_background=include_background,
            batch=batch,
            w_type=w_type,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )
        super().__init__(generalized_dice_ce_loss, options, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="medseg")
class CrossEntropyLoss(_OptionsLoss):
    """Categorical (or, for one sigmoid channel, binary) cross-entropy on probabilities."""

    def __init__(self, reduction: str = "sum_over_batch_size", name: str = "ce", dtype=None):
        super().__init__(cross_entropy_loss, {}, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="medseg")
class WeightedCrossEntropyLoss(_OptionsLoss):
    """Cross-entropy with a weight per class, e.g. `class_weights=[1, 5, 2, 4]`; see `cross_entropy_loss`."""

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        reduction: str = "sum_over_batch_size",
        name: str = "weighted_ce",
        dtype=None,
    ):
        if class_weights is None:
            raise ValueError("weighted_ce needs class_weights: one weight per channel, e.g. [1, 5, 2, 4].")
        if min(class_weights) < 0:
            raise ValueError(f"class_weights must be >= 0, got {list(class_weights)}.")
        options = dict(class_weights=_weights_list(class_weights))
        super().__init__(cross_entropy_loss, options, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="medseg")
class TverskyLoss(_OptionsLoss):
    """Tversky loss (see `tversky_loss`); the pancreas seed used `alpha=0.3, beta=0.7`."""

    def __init__(
        self,
        include_background: bool = True,
        batch: bool = False,
        alpha: float = 0.5,
        beta: float = 0.5,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        reduction: str = "sum_over_batch_size",
        name: str = "tversky",
        dtype=None,
    ):
        options = dict(
            include_background=include_background,
            batch=batch,
            alpha=alpha,
            beta=beta,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )
        super().__init__(tversky_loss, options, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="medseg")
class FocalLoss(_OptionsLoss):
    """Softmax focal loss of Lin et al. (see `focal_loss`)."""

    def __init__(
        self,
        gamma: float = 2.0,
        class_weights: Sequence[float] | None = None,
        reduction: str = "sum_over_batch_size",
        name: str = "focal",
        dtype=None,
    ):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}.")
        options = dict(gamma=gamma, class_weights=_weights_list(class_weights))
        super().__init__(focal_loss, options, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="medseg")
class DiceFocalLoss(_OptionsLoss):
    """Dice plus focal loss (see `dice_focal_loss`)."""

    def __init__(
        self,
        include_background: bool = True,
        batch: bool = False,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        gamma: float = 2.0,
        class_weights: Sequence[float] | None = None,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        reduction: str = "sum_over_batch_size",
        name: str = "dice_focal",
        dtype=None,
    ):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}.")
        options = dict(
            include_background=include_background,
            batch=batch,
            squared_pred=squared_pred,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            gamma=gamma,
            class_weights=_weights_list(class_weights),
            lambda_dice=lambda_dice,
            lambda_focal=lambda_focal,
        )
        super().__init__(dice_focal_loss, options, reduction, name, dtype)


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """Weights `1, 1/2, 1/4, ...` for outputs ordered from full to coarsest resolution, normalised to sum 1.

    Raises:
        ValueError: when `num_outputs` < 1.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}.")
    weights = [0.5**level for level in range(num_outputs)]
    return [weight / sum(weights) for weight in weights]


def downsample_target(y_true, spatial_shape: Sequence[int]):
    """Down-samples a one-hot target to `spatial_shape` by nearest-neighbour striding (`y[:, ::2, ::2]`, ...).

    Striding keeps one voxel of each block, so the result stays one-hot (no interpolated labels).

    Args:
        y_true: one-hot truth `(B, *spatial, C)`.
        spatial_shape: the target spatial shape; each full size must be a whole multiple of it.

    Returns:
        `y_true` at `spatial_shape`, shape `(B, *spatial_shape, C)`.

    Raises:
        ValueError: when a size is not a whole multiple of the target size.
    """
    full_shape = tuple(y_true.shape[1:-1])
    spatial_shape = tuple(spatial_shape)
    if full_shape == spatial_shape:
        return y_true
    if len(full_shape) != len(spatial_shape) or any(
        full is None or size is None or size < 1 or full % size
        for full, size in zip(full_shape, spatial_shape, strict=True)
    ):
        raise ValueError(
            f"Cannot down-sample a target of spatial shape {full_shape} to {spatial_shape}: "
            "each size must be a whole multiple of the output size."
        )
    strides = [full // size for full, size in zip(full_shape, spatial_shape, strict=True)]
    return y_true[(slice(None), *(slice(None, None, stride) for stride in strides), slice(None))]


@keras.saving.register_keras_serializable(package="medseg")
class DeepSupervisionLoss(keras.losses.Loss):
    """Applies a loss to deep-supervision outputs, from full to coarsest resolution.

    Called with a list of predictions `[(B, *spatial, C), (B, *spatial / 2, C), ...]`, it returns
    `sum_i weights[i] * loss(downsample_target(y_true, shape_i), y_pred[i])`, with `weights` halving per level
    and normalised to sum 1 by default (nnU-Net's scheme). Called with a single prediction, it down-samples
    `y_true` to that prediction's shape and applies the loss, which is how `fit` uses it, since Keras applies
    one loss to each output of a multi-output model (see `deep_supervision_compile_args`)::

        model.compile(optimizer=..., **deep_supervision_compile_args("dice_ce", num_outputs=3))
        model.fit(images, (labels, labels, labels), ...)  # the full-resolution target for every output

    Args:
        loss: a loss name from `LOSSES`, or a `keras.losses.Loss`.
        weights: optional weight per output; defaults to `deep_supervision_weights(len(y_pred))`.
        loss_kwargs: options for the loss when it is given by name.
    """

    def __init__(
        self,
        loss: str | keras.losses.Loss = "dice_ce",
        weights: Sequence[float] | None = None,
        loss_kwargs: dict | None = None,
        reduction: str = "sum_over_batch_size",
        name: str = "deep_supervision",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(loss, dict):
            loss = keras.saving.deserialize_keras_object(loss)
        self.loss = get_loss(loss, **(loss_kwargs or {})) if isinstance(loss, str) else loss
        self.weights = None if weights is None else [float(weight) for weight in weights]

    def _single(self, y_true, y_pred):
        y_true = downsample_target(dense_truth(y_true, ops.convert_to_tensor(y_pred)), y_pred.shape[1:-1])
        return self.loss.call(y_true, y_pred)

    def call(self, y_true, y_pred):
        if not isinstance(y_pred, (list, tuple)):
            return self._single(y_true, y_pred)
        weights = self.weights or deep_supervision_weights(len(y_pred))
        if len(weights) != len(y_pred):
            raise ValueError(f"Got {len(weights)} weights for {len(y_pred)} deep-supervision outputs.")
        return sum(weight * self._single(y_true, output) for weight, output in zip(weights, y_pred, strict=True))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(loss=keras.saving.serialize_keras_object(self.loss), weights=self.weights)
        return config


def deep_supervision_compile_args(
    loss: str | keras.losses.Loss, num_outputs: int, weights: Sequence[float] | None = None, **loss_kwargs
) -> dict:
    """The `loss` and `loss_weights` arguments of `model.compile` for a model with deep-supervision outputs.

    Args:
        loss: a loss name from `LOSSES`, or a `keras.losses.Loss`.
        num_outputs: the number of outputs, ordered from full to coarsest resolution.
        weights: optional weight per output; defaults to `deep_supervision_weights(num_outputs)`.
        **loss_kwargs: options for the loss when it is given by name.

    Returns:
        `{"loss": [DeepSupervisionLoss, ...], "loss_weights": [...]}`, one entry per output. Feed the
        full-resolution target for every output; each loss down-samples it to its output's shape.
    """
    weights = list(weights) if weights is not None else deep_supervision_weights(num_outputs)
    if len(weights) != num_outputs:
        raise ValueError(f"Got {len(weights)} weights for {num_outputs} deep-supervision outputs.")
    wrapper = DeepSupervisionLoss(loss, loss_kwargs=loss_kwargs)
    return {"loss": [wrapper] * num_outputs, "loss_weights": weights}


LOSSES: dict[str, type[keras.losses.Loss]] = {
    "dice": DiceLoss,
    "gdl": GeneralizedDiceLoss,
    "dice_ce": DiceCELoss,
    "gdl_ce": GeneralizedDiceCELoss,
    "ce": CrossEntropyLoss,
    "weighted_ce": WeightedCrossEntropyLoss,
    "tversky": TverskyLoss,
    "focal": FocalLoss,
    "dice_focal": DiceFocalLoss,
}


def get_loss(name: str, **kwargs) -> keras.losses.Loss:
    """Builds a loss by name, e.g. `get_loss("tversky", alpha=0.3, beta=0.7)`.

    Args:
        name: one of `LOSSES`: dice, gdl, dice_ce, gdl_ce, ce, weighted_ce, tversky, focal, dice_focal.
        **kwargs: the loss's options (see its class); `reduction`, `name` and `dtype` are accepted too.

    Returns:
        A `keras.losses.Loss` whose value is minimised with best value 0.

    Raises:
        ValueError: for an unknown name or an option the loss does not take.
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid names: {', '.join(LOSSES)}.")
    loss_class = LOSSES[name]
    accepted = [param for param in inspect.signature(loss_class.__init__).parameters if param != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"Loss {name!r} does not take option(s) {unknown}; valid options: {', '.join(accepted)}.")
    return loss_class(**kwargs)
