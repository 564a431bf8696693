"""The segmentation losses as pure functions in ``keras.ops``: each returns one value per sample, shape ``(B,)``.

Inputs are channels-last: ``y_pred`` probabilities ``(B, *spatial, C)`` and ``y_true`` one-hot of the same shape or
an integer label map ``(B, *spatial)``. :mod:`utils.losses` wraps each in a registered ``keras.losses.Loss`` and
documents the conventions (options named as MONAI names them, a minimised loss whose best value is 0).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    class_weights: Sequence[float] | None = None,
):
    """`lambda_dice * dice_loss + lambda_ce * cross_entropy_loss`, as MONAI's `DiceCELoss`.

    The cross-entropy always includes the background channel (as in MONAI); the dice options apply to the
    dice term, `class_weights` (one per channel) to the cross-entropy term (MONAI's `weight`).

    Returns:
        The loss per sample, shape `(B,)`.
    """
    dice = dice_loss(y_true, y_pred, include_background, batch, squared_pred, smooth_nr, smooth_dr)
    return lambda_dice * dice + lambda_ce * cross_entropy_loss(y_true, y_pred, class_weights)


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
    class_weights: Sequence[float] | None = None,
):
    """`lambda_dice * generalized_dice_loss + lambda_ce * cross_entropy_loss`; `class_weights` (one per channel,
    background included) weigh the cross-entropy term: generalized dice plus weighted cross-entropy (BraTS seed).

    Returns:
        The loss per sample, shape `(B,)`.
    """
    gdl = generalized_dice_loss(y_true, y_pred, include_background, batch, w_type, smooth_nr, smooth_dr)
    return lambda_dice * gdl + lambda_ce * cross_entropy_loss(y_true, y_pred, class_weights)


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
