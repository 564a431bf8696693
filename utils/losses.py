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

The pure functions live in :mod:`utils.loss_functions`. Use `get_loss(name, **kwargs)` to build one by name;
`LOSSES` lists the names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import keras
from keras import ops

from utils.loss_functions import (
    _GDL_WEIGHTS,
    cross_entropy_loss,
    dense_truth,
    dice_ce_loss,
    dice_focal_loss,
    dice_loss,
    focal_loss,
    generalized_dice_ce_loss,
    generalized_dice_loss,
    tversky_loss,
)


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
        class_weights: Sequence[float] | None = None,
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
            class_weights=_weights_list(class_weights),
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
        class_weights: Sequence[float] | None = None,
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
            class_weights=_weights_list(class_weights),
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
