"""Segmentation metrics: per-case evaluation from label maps (NumPy, SciPy) and streaming training metrics (Keras).

Evaluation: `compute_case_metrics(pred, truth, labels, spacing)` returns `{label: {metric: value}}` for integer
label maps, with `spacing` in mm in the arrays' axis order. Each number matches a reference implementation:

- `dice`, `iou`: SimpleITK `LabelOverlapMeasuresImageFilter` (`GetDiceCoefficient`, `GetJaccardCoefficient`).
- `hd95`: MONAI `compute_hausdorff_distance(percentile=95, spacing=...)`: the larger of the two directed 95th
  percentiles (linear interpolation) of the distances between the surface voxels of the two masks.
- `assd`: MONAI `compute_average_surface_distance(symmetric=True, spacing=...)`: the mean of the distances from
  every surface voxel of each mask to the other mask's surface.
- `nsd`: MONAI `compute_surface_dice(class_thresholds=[nsd_tolerance], spacing=...)`: the fraction of surface
  voxels of both masks within `nsd_tolerance` mm of the other surface (Nikolov et al. 2021, voxel form).
- `precision` = TP / (TP + FP), `sensitivity` = TP / (TP + FN), counted in voxels.
- `volume_truth_ml`, `volume_pred_ml`: voxel count times the voxel volume, in millilitres.

A surface voxel is a foreground voxel with a background face-neighbour (the mask minus its binary erosion, the
outside of the image counting as background), and distances are exact Euclidean distances in mm. All of this is
computed on the bounding box (plus one voxel) of the union of the two masks, which gives the same numbers as the
whole image and keeps a 512 x 512 x 300 CT with a small tumour fast.

Empty-class rule (truth and/or prediction without a voxel of the class):

- both empty: every metric is NaN except the volumes (0). Such a class is not scored: summaries exclude it
  from means and count it as empty.
- truth empty, prediction not: `dice` 0, `iou` 0, `precision` 0, `nsd` 0, `sensitivity` NaN (undefined),
  `hd95` and `assd` NaN.
- prediction empty, truth not: `dice` 0, `iou` 0, `sensitivity` 0, `nsd` 0, `precision` NaN (undefined),
  `hd95` and `assd` NaN.

Distances to an empty mask are NaN rather than infinite (MONAI returns inf there): a summary then reports the
distances over the cases where both masks exist, and the missed or spurious cases show in `dice` and `nsd`.
`finite_mean` is that rule for averages (a case's mean over classes, a class's mean over cases): the values not
scored are left out, and the mean is NaN when none is left.

Training: `ClassDice`, `MeanForegroundDice`, `MeanForegroundIoU` and `MeanForegroundFScore` are streaming
`keras.metrics.Metric` objects (argmax of the prediction against the label map or the argmax of the one-hot truth,
counts accumulated over the epoch, as nnU-Net's pseudo dice), registered so that a saved model loads without
`custom_objects`; `training_metrics` gives the ones `train.py --metrics` selects. Validation scores whole cases with
`confusion_counts` and `score_from_counts` (the same formulas in NumPy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import keras
import numpy as np
from keras import ops
from scipy import ndimage

from utils.settings import METRIC_NAMES

METRICS = METRIC_NAMES
_SURFACE_METRICS = ("hd95", "assd", "nsd")
_MAX_INDEXED_LABEL = 65535
_COUNT_CHUNK = 1 << 22  # voxels per bincount in confusion_counts (32 MiB of indices)
NAN = float("nan")


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else NAN


def dice_score(pred_mask: np.ndarray, truth_mask: np.ndarray) -> float:
    """Dice `2 |P & T| / (|P| + |T|)` of two binary masks; NaN when both are empty."""
    pred_mask, truth_mask = np.asarray(pred_mask, bool), np.asarray(truth_mask, bool)
    overlap = np.count_nonzero(pred_mask & truth_mask)
    return _ratio(2 * overlap, np.count_nonzero(pred_mask) + np.count_nonzero(truth_mask))


def iou_score(pred_mask: np.ndarray, truth_mask: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two binary masks; NaN when both are empty."""
    pred_mask, truth_mask = np.asarray(pred_mask, bool), np.asarray(truth_mask, bool)
    return _ratio(np.count_nonzero(pred_mask & truth_mask), np.count_nonzero(pred_mask | truth_mask))


def finite_mean(values: Iterable[float | None]) -> float:
    """Mean of the finite values, leaving out the classes or cases not scored (NaN or None under the empty rule);
    NaN when none is left."""
    finite = [float(value) for value in values if value is not None and math.isfinite(float(value))]
    return float(np.mean(finite)) if finite else NAN


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face-neighbour (outside the array counts as background)."""
    mask = np.asarray(mask, bool)
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances(
    pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest surface voxel of the other.

    Both masks must be non-empty. Works on the bounding box of their union (plus one voxel).

    Returns:
        `(pred_to_truth, truth_to_pred)`, 1D arrays with one distance per surface voxel of the first mask.

    Raises:
        ValueError: when a mask is empty or the shapes differ.
    """
    pred_mask, truth_mask = np.asarray(pred_mask, bool), np.asarray(truth_mask, bool)
    if pred_mask.shape != truth_mask.shape:
        raise ValueError(f"Masks differ in shape: {pred_mask.shape} and {truth_mask.shape}.")
    if not pred_mask.any() or not truth_mask.any():
        raise ValueError("surface_distances needs two non-empty masks.")
    box = _expand(ndimage.find_objects((pred_mask | truth_mask).astype(np.uint8))[0], pred_mask.shape)
    pred_surface, truth_surface = surface_voxels(pred_mask[box]), surface_voxels(truth_mask[box])
    sampling = [float(value) for value in spacing]
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return to_truth[pred_surface], to_pred[truth_surface]


def _expand(box: tuple[slice, ...], shape: Sequence[int], margin: int = 1) -> tuple[slice, ...]:
    """Grows a bounding box by `margin` voxels on each side, within the array."""
    return tuple(
        slice(max(part.start - margin, 0), min(part.stop + margin, size)) for part, size in zip(box, shape, strict=True)
    )


def _union(first: tuple[slice, ...] | None, second: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if first is None or second is None:
        return first or second
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(first, second, strict=True))


class _BoxFinder:
    """Bounding boxes of sets of labels in a label map.

    For a map of non-negative integers (up to `_MAX_INDEXED_LABEL`) every label's box comes from one pass of
    `scipy.ndimage.find_objects`; other maps (negative or float values) fall back to one pass per set.
    """

    def __init__(self, label_map: np.ndarray):
        self.label_map = label_map
        self.boxes = None
        if np.issubdtype(label_map.dtype, np.integer) and label_map.size:
            low, high = int(label_map.min()), int(label_map.max())
            if low >= 0 and high <= _MAX_INDEXED_LABEL:
                objects = ndimage.find_objects(label_map)
                self.boxes = {index + 1: box for index, box in enumerate(objects) if box is not None}

    def box(self, values: Sequence[int]) -> tuple[slice, ...] | None:
        if self.boxes is not None and all(value > 0 for value in values):
            found = None
            for value in values:
                found = _union(found, self.boxes.get(value))
            return found
        objects = ndimage.find_objects(_member_mask(self.label_map, values).astype(np.uint8))
        return objects[0] if objects else None


def _case_values(
    pred_mask: np.ndarray,
    truth_mask: np.ndarray,
    spacing: Sequence[float],
    metrics: Sequence[str],
    nsd_tolerance: float,
) -> dict[str, float]:
    """All requested metrics for one pair of binary masks (already cropped to their union's box)."""
    true_pos = np.count_nonzero(pred_mask & truth_mask)
    pred_count, truth_count = np.count_nonzero(pred_mask), np.count_nonzero(truth_mask)
    voxel_ml = math.prod(spacing) / 1000.0
    values = {
        "dice": _ratio(2 * true_pos, pred_count + truth_count),
        "iou": _ratio(true_pos, pred_count + truth_count - true_pos),
        "precision": _ratio(true_pos, pred_count),
        "sensitivity": _ratio(true_pos, truth_count),
        "volume_truth_ml": truth_count * voxel_ml,
        "volume_pred_ml": pred_count * voxel_ml,
        "hd95": NAN,
        "assd": NAN,
        "nsd": NAN if pred_count + truth_count == 0 else 0.0,
    }
    if pred_count and truth_count and any(name in metrics for name in _SURFACE_METRICS):
        to_truth, to_pred = surface_distances(pred_mask, truth_mask, spacing)
        values["hd95"] = float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))
        values["assd"] = float(np.mean(np.concatenate([to_truth, to_pred])))
        within = np.count_nonzero(to_truth <= nsd_tolerance) + np.count_nonzero(to_pred <= nsd_tolerance)
        values["nsd"] = within / (to_truth.size + to_pred.size)
    return {name: float(values[name]) for name in metrics}


def compute_case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    labels: Iterable[int],
    spacing: Sequence[float],
    metrics: Sequence[str] = METRICS,
    nsd_tolerance: float = 1.0,
    regions: Mapping[str, Sequence[int]] | None = None,
) -> dict[int | str, dict[str, float]]:
    """Per-class (and per-region) metrics of one case; see the module docstring for references and empty rules.

    Args:
        pred: predicted integer label map, shape `(*spatial)` (2D or 3D).
        truth: reference integer label map, same shape.
        labels: the class values to score (the caller leaves out the background), e.g. `[1, 2]`.
        spacing: voxel size in mm, one value per axis, in the arrays' axis order (`(Z, Y, X)` for volumes).
        metrics: names from `METRICS`.
        nsd_tolerance: the tolerance of `nsd` in mm.
        regions: optional BraTS-style regions, name -> class values, e.g. `{"whole_tumour": [1, 2, 4]}`;
            a region's mask is the union of its classes, and its results appear under its name.

    Returns:
        `{label: {metric: value}}` with the labels as given (ints) and the region names, values as floats.

    Raises:
        ValueError: for mismatched shapes, a spacing of the wrong length or not positive, an unknown metric,
            or a tolerance that is not positive.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred has shape {pred.shape} but truth has shape {truth.shape}; they must match.")
    spacing = tuple(float(value) for value in spacing)
    if len(spacing) != pred.ndim or not all(value > 0 for value in spacing):
        raise ValueError(f"spacing must hold {pred.ndim} positive values (mm per axis), got {spacing}.")
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; valid names: {', '.join(METRICS)}.")
    if not nsd_tolerance > 0:
        raise ValueError(f"nsd_tolerance must be > 0 mm, got {nsd_tolerance}.")

    groups: dict[int | str, list[int]] = {int(label): [int(label)] for label in labels}
    for name, members in (regions or {}).items():
        groups[str(name)] = [int(member) for member in members]

    pred_boxes, truth_boxes = _BoxFinder(pred), _BoxFinder(truth)
    results = {}
    for key, members in groups.items():
        box = _union(pred_boxes.box(members), truth_boxes.box(members))
        if box is None:
            empty = np.zeros((1,) * pred.ndim, bool)
            results[key] = _case_values(empty, empty, spacing, metrics, nsd_tolerance)
            continue
        box = _expand(box, pred.shape)
        pred_mask, truth_mask = _member_mask(pred[box], members), _member_mask(truth[box], members)
        results[key] = _case_values(pred_mask, truth_mask, spacing, metrics, nsd_tolerance)
    return results


def _member_mask(label_map: np.ndarray, members: Sequence[int]) -> np.ndarray:
    """``label_map`` in ``members``, as booleans: one comparison per member (``np.isin`` of an integer map builds an
    index array of 8 bytes a voxel, 1 GiB for a 512^3 map)."""
    mask = label_map == members[0]
    for member in members[1:]:
        mask |= label_map == member
    return mask


def mean_foreground_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """Dice of one case per foreground class, and their mean over the classes scored (validation during training).

    Args:
        pred, truth: integer label maps of classes ``0..num_classes-1``, same shape ``(*spatial)``.
        num_classes: ``K``, background included; classes ``1..K-1`` are scored.

    Returns:
        ``(mean, [dice of class 1, ..., dice of class K-1])``; a class empty in both maps has dice NaN and is left out
        of the mean (:func:`finite_mean`), which is NaN when no class is scored.
    """
    scores = compute_case_metrics(pred, truth, range(1, num_classes), (1.0,) * np.ndim(truth), metrics=("dice",))
    per_class = [float(scores[k]["dice"]) for k in range(1, num_classes)]
    return finite_mean(per_class), per_class


def confusion_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """True positives, false positives and false negatives of every class, in voxels.

    Args:
        pred, truth: integer label maps of classes ``0..num_classes-1``, same shape.
        num_classes: ``K``, background included.

    Returns:
        ``(3, K)`` counts: rows TP, FP, FN; column ``k`` for class ``k``.
    """
    pred, truth = np.asarray(pred).reshape(-1), np.asarray(truth).reshape(-1)
    if pred.shape != truth.shape:
        raise ValueError(f"pred has {pred.size} voxels but truth has {truth.size}; they must match.")
    both, pred_count, truth_count = (np.zeros(num_classes, np.int64) for _ in range(3))
    for start in range(0, max(pred.size, 1), _COUNT_CHUNK):  # bincount copies to 8-byte indices: a chunk at a time
        p, t = pred[start : start + _COUNT_CHUNK], truth[start : start + _COUNT_CHUNK]
        both += np.bincount(t[t == p].astype(np.intp), minlength=num_classes)[:num_classes]
        pred_count += np.bincount(p.astype(np.intp), minlength=num_classes)[:num_classes]
        truth_count += np.bincount(t.astype(np.intp), minlength=num_classes)[:num_classes]
    return np.stack([both, pred_count - both, truth_count - both]).astype(np.float64)


def score_from_counts(name: str, counts: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """``dice``, ``iou`` or ``fscore`` (F-beta) per class from :func:`confusion_counts`; NaN where truth and
    prediction are both empty (the empty-class rule), 0 where only one is.

    ``dice = 2 TP / (2 TP + FP + FN)``, ``iou = TP / (TP + FP + FN)``,
    ``fscore = (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP)`` (the dice at ``beta=1``).

    Raises:
        ValueError: an unknown name.
    """
    true_pos, false_pos, false_neg = np.asarray(counts, dtype=np.float64)
    weights = {"dice": (2.0, 1.0, 1.0), "iou": (1.0, 1.0, 1.0), "fscore": (1.0 + beta**2, 1.0, beta**2)}
    if name not in weights:
        raise ValueError(f"Unknown overlap score {name!r}; valid names: {', '.join(weights)}.")
    tp_weight, fp_weight, fn_weight = weights[name]
    denominator = tp_weight * true_pos + fp_weight * false_pos + fn_weight * false_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, tp_weight * true_pos / denominator, NAN)


class _OverlapCounts(keras.metrics.Metric):
    """Accumulates per-class intersection and voxel counts of argmax predictions over an epoch; the dice, IoU and
    F-score of each class follow from them."""

    def __init__(self, num_classes: int, name: str, dtype=None):
        super().__init__(name=name, dtype=dtype)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_classes = int(num_classes)
        channels = max(self.num_classes, 2)
        self.intersection = self.add_variable(shape=(channels,), initializer="zeros", name="intersection")
        self.pred_count = self.add_variable(shape=(channels,), initializer="zeros", name="pred_count")
        self.truth_count = self.add_variable(shape=(channels,), initializer="zeros", name="truth_count")

    def _hard_one_hot(self, y):
        """One-hot of the argmax over channels; a single sigmoid channel is thresholded at 0.5."""
        if y.shape[-1] == 1:
            return ops.concatenate([ops.cast(y < 0.5, self.dtype), ops.cast(y >= 0.5, self.dtype)], axis=-1)
        return ops.one_hot(ops.argmax(y, axis=-1), y.shape[-1], dtype=self.dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch: `y_pred` probabilities `(B, *spatial, C)`; `y_true` one-hot of the same shape or a label map
        `(B, *spatial)`. `sample_weight` is ignored."""
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        if y_pred.shape[-1] is not None and max(y_pred.shape[-1], 2) != max(self.num_classes, 2):
            raise ValueError(f"{self.name} expects {self.num_classes} channels, got y_pred of shape {y_pred.shape}.")
        if len(y_true.shape) == len(y_pred.shape) - 1:
            truth = ops.one_hot(ops.cast(y_true, "int32"), max(self.num_classes, 2), dtype=self.dtype)
        else:
            truth = self._hard_one_hot(y_true)
        pred = self._hard_one_hot(y_pred)
        axes = list(range(len(pred.shape) - 1))
        self.intersection.assign_add(ops.sum(truth * pred, axis=axes))
        self.pred_count.assign_add(ops.sum(pred, axis=axes))
        self.truth_count.assign_add(ops.sum(truth, axis=axes))

    def per_class_dice(self):
        """Dice per class over everything seen since the last reset; NaN for a class never seen nor predicted."""
        total = self.pred_count + self.truth_count
        safe_total = ops.where(total > 0, total, ops.ones_like(total))
        return ops.where(total > 0, 2.0 * self.intersection / safe_total, ops.full_like(total, NAN))

    def per_class_iou(self):
        """IoU ``|P & T| / |P | T|`` per class over everything seen since the last reset; NaN as the dice."""
        union = self.pred_count + self.truth_count - self.intersection
        safe_union = ops.where(union > 0, union, ops.ones_like(union))
        return ops.where(union > 0, self.intersection / safe_union, ops.full_like(union, NAN))

    def per_class_fscore(self, beta: float = 1.0):
        """F-beta ``(1 + b^2) TP / (b^2 |T| + |P|)`` per class (recall weighed ``beta`` times as much as precision;
        the dice at ``beta=1``); NaN as the dice."""
        total = beta**2 * self.truth_count + self.pred_count
        safe_total = ops.where(total > 0, total, ops.ones_like(total))
        return ops.where(total > 0, (1.0 + beta**2) * self.intersection / safe_total, ops.full_like(total, NAN))

    def foreground_mean(self, per_class):
        """Mean over the foreground classes seen (not NaN); NaN if none is."""
        scores = per_class[1:]
        seen = ops.logical_not(ops.isnan(scores))
        count = ops.sum(ops.cast(seen, self.dtype))
        total = ops.sum(ops.where(seen, scores, ops.zeros_like(scores)))
        return ops.where(count > 0, total / ops.maximum(count, 1.0), NAN)

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="medseg")
class ClassDice(_OverlapCounts):
    """Streaming dice of one class over an epoch, e.g. `ClassDice(1, num_classes=3)` logged as `dice_1`.

    NaN when the class appears in neither truth nor prediction in the whole epoch (the evaluation's empty rule).

    Args:
        class_id: the class to score (for a single sigmoid channel, 1 is the foreground).
        num_classes: the number of channels of `y_pred` (1 for a single sigmoid channel).
        name: defaults to `dice_<class_id>`.
    """

    def __init__(self, class_id: int, num_classes: int, name: str | None = None, dtype=None):
        super().__init__(num_classes, name or f"dice_{class_id}", dtype)
        if not 0 <= class_id < max(num_classes, 2):
            raise ValueError(f"class_id must be in [0, {max(num_classes, 2) - 1}], got {class_id}.")
        self.class_id = int(class_id)

    def result(self):
        return self.per_class_dice()[self.class_id]

    def get_config(self) -> dict:
        return {**super().get_config(), "class_id": self.class_id}


@keras.saving.register_keras_serializable(package="medseg")
class MeanForegroundDice(_OverlapCounts):
    """Streaming mean dice of the foreground classes over an epoch, logged as `fg_dice` (`val_fg_dice`).

    Counts are summed over all batches of the epoch before dividing (nnU-Net's pseudo dice). Classes that appear
    in neither truth nor prediction are left out of the mean; NaN if no foreground class appears at all.

    Args:
        num_classes: the number of channels of `y_pred`, background included (1 for a single sigmoid channel).
        name: the name in the training history.
    """

    def __init__(self, num_classes: int, name: str = "fg_dice", dtype=None):
        super().__init__(num_classes, name, dtype)

    def result(self):
        return self.foreground_mean(self.per_class_dice())


@keras.saving.register_keras_serializable(package="medseg")
class MeanForegroundIoU(_OverlapCounts):
    """Streaming mean IoU (Jaccard) of the foreground classes over an epoch, logged as `fg_iou` (`--metrics iou`).

    Counts are summed over the epoch as for `MeanForegroundDice`; the same classes are left out of the mean.

    Args:
        num_classes: the number of channels of `y_pred`, background included (1 for a single sigmoid channel).
        name: the name in the training history.
    """

    def __init__(self, num_classes: int, name: str = "fg_iou", dtype=None):
        super().__init__(num_classes, name, dtype)

    def result(self):
        return self.foreground_mean(self.per_class_iou())


@keras.saving.register_keras_serializable(package="medseg")
class MeanForegroundFScore(_OverlapCounts):
    """Streaming mean F-beta score of the foreground classes over an epoch, logged as `fg_fscore` (`--metrics
    fscore`); at `beta=1` (F1) it equals `MeanForegroundDice`, the score the PNG workflow logged as F-score.

    Args:
        num_classes: the number of channels of `y_pred`, background included (1 for a single sigmoid channel).
        beta: weight of recall against precision (2: the F2 score).
        name: the name in the training history.
    """

    def __init__(self, num_classes: int, beta: float = 1.0, name: str = "fg_fscore", dtype=None):
        super().__init__(num_classes, name, dtype)
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}.")
        self.beta = float(beta)

    def result(self):
        return self.foreground_mean(self.per_class_fscore(self.beta))

    def get_config(self) -> dict:
        return {**super().get_config(), "beta": self.beta}


# The --metrics of train.py (utils.settings.TRAINING_METRIC_NAMES); the dice is always logged.
TRAINING_METRICS = {"iou": MeanForegroundIoU, "fscore": MeanForegroundFScore}


def training_metrics(num_classes: int, names: Sequence[str] = ()) -> list[keras.metrics.Metric]:
    """The metrics training compiles: `MeanForegroundDice` (it picks the best model), then one per name.

    Raises:
        ValueError: an unknown name.
    """
    unknown = [name for name in names if name not in TRAINING_METRICS]
    if unknown:
        raise ValueError(f"Unknown training metric(s) {unknown}; valid names: {', '.join(TRAINING_METRICS)}.")
    return [MeanForegroundDice(num_classes), *(TRAINING_METRICS[name](num_classes) for name in dict.fromkeys(names))]
