"""Post-processing of predicted label maps: keep the largest connected component, drop small components, and decide
per class on the validation split whether keeping the largest component helps (as nnU-Net does).

Label maps are integer ``(Z, Y, X)`` (or 2D) arrays of classes ``0..K-1``; voxels removed from a class become
background (0). Components are face-connected by default (6-connectivity in 3D, 4 in 2D; ``connectivity=ndim`` gives
26 / 8).

A *plan* is plain JSON, stored in ``summary.json`` and, when decided on the validation split, in the run folder's
``postprocessing.json``::

    {"lcc_classes": [1, 2], "min_size": 0.0, "min_size_unit": "voxels", "connectivity": 1}
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage

SIZE_UNITS = ("voxels", "mm3")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(voxels?|vx|mm3|mm\^3|mm³|ml)?\s*$", re.IGNORECASE)


def parse_min_size(text: str | float | int | None) -> tuple[float, str]:
    """Parse ``--min-size``: ``"50"`` or ``"50voxels"`` -> ``(50, "voxels")``, ``"30mm3"`` -> ``(30, "mm3")``,
    ``"0.5ml"`` -> ``(500, "mm3")``.

    Raises:
        ValueError: anything else, quoting the value.
    """
    if text is None:
        return 0.0, "voxels"
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"--min-size takes a size such as 50 (voxels), 50voxels, 30mm3 or 0.5ml, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "voxels").lower()
    if unit == "ml":
        return value * 1000.0, "mm3"
    return value, "mm3" if unit.startswith("mm") else "voxels"


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not 1 <= connectivity <= ndim:
        raise ValueError(f"connectivity must be between 1 and {ndim}, got {connectivity}")
    return ndimage.generate_binary_structure(ndim, connectivity)


def keep_largest_component(
    labels: np.ndarray, classes: Iterable[int] | None = None, connectivity: int = 1
) -> np.ndarray:
    """Keep, for each of ``classes`` (default: every foreground class present), only its largest connected component.

    Ties keep the component found first in array order. Returns a new array; ``labels`` is not changed.
    """
    out = np.array(labels, copy=True)
    for mask, components, count in _class_components(out, classes, connectivity):
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[mask & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


def remove_small_components(
    labels: np.ndarray,
    min_size: float,
    unit: str = "voxels",
    spacing: Sequence[float] | None = None,
    classes: Iterable[int] | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Set to background every component smaller than ``min_size`` voxels, or mm³ with ``unit="mm3"``.

    Raises:
        ValueError: an unknown unit, or ``mm3`` without ``spacing``.
    """
    if unit not in SIZE_UNITS:
        raise ValueError(f"min-size unit must be one of {SIZE_UNITS}, got {unit!r}")
    out = np.array(labels, copy=True)
    if min_size <= 0:
        return out
    if unit == "mm3":
        if spacing is None:
            raise ValueError("a minimum size in mm3 needs the voxel spacing")
        voxel_volume = float(np.prod(spacing))
    else:
        voxel_volume = 1.0
    for _, components, count in _class_components(out, classes, connectivity):
        if count:
            small = np.flatnonzero(np.bincount(components.ravel())[1:] * voxel_volume < min_size) + 1
            out[np.isin(components, small)] = 0
    return out


def _class_components(
    labels: np.ndarray, classes: Iterable[int] | None, connectivity: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Per class of ``classes`` present in ``labels`` (default: every foreground class), as ``labels`` is when the
    class comes: its mask, its components numbered ``1..count`` and ``count`` (:func:`scipy.ndimage.label`)."""
    structure = _structure(labels.ndim, connectivity)
    for value in _classes(labels, classes):
        mask = labels == value
        components, count = ndimage.label(mask, structure)
        yield mask, components, count


def _classes(labels: np.ndarray, classes: Iterable[int] | None) -> list[int]:
    present = [int(v) for v in np.unique(labels) if v != 0]
    return present if classes is None else [int(c) for c in classes if int(c) in present]


def make_plan(
    mode: str = "none",
    num_classes: int = 2,
    min_size: tuple[float, str] = (0.0, "voxels"),
    connectivity: int = 1,
    lcc_classes: Sequence[int] | None = None,
) -> dict:
    """A post-processing plan: ``none`` (no lcc), ``lcc`` (every foreground class) or explicit ``lcc_classes``.

    Raises:
        ValueError: an unknown mode (``auto`` plans come from :func:`decide_lcc`).
    """
    if mode not in ("none", "lcc"):
        raise ValueError(f"post-processing must be 'none' or 'lcc' here, got {mode!r}")
    if lcc_classes is None:
        lcc_classes = list(range(1, num_classes)) if mode == "lcc" else []
    return {
        "lcc_classes": [int(c) for c in lcc_classes],
        "min_size": float(min_size[0]),
        "min_size_unit": min_size[1],
        "connectivity": int(connectivity),
    }


def apply_plan(labels: np.ndarray, plan: Mapping | None, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Apply a plan from :func:`make_plan` or :func:`decide_lcc`: largest component first, then small components."""
    if not plan:
        return labels
    connectivity = int(plan.get("connectivity", 1))
    out = labels
    if plan.get("lcc_classes"):
        out = keep_largest_component(out, plan["lcc_classes"], connectivity)
    if plan.get("min_size", 0) > 0:
        out = remove_small_components(
            out, plan["min_size"], plan.get("min_size_unit", "voxels"), spacing, connectivity=connectivity
        )
    return out


def decide_lcc(
    cases: Iterable[tuple[np.ndarray, np.ndarray, Sequence[float]]],
    num_classes: int,
    min_size: tuple[float, str] = (0.0, "voxels"),
    connectivity: int = 1,
) -> dict:
    """Per class, keep the largest component only where it raises the mean validation dice (nnU-Net's rule).

    Args:
        cases: ``(prediction, truth, spacing)`` per validation case, class maps on the same grid; the prediction
            before any post-processing.
        num_classes: ``K``; classes ``1..K-1`` are decided.
        min_size, connectivity: applied after the decision, as in :func:`apply_plan`, in both arms of the comparison.

    Returns:
        A plan with the decision and, per class, the mean dice without and with lcc (``"dice"``) and the case count.
    """
    from utils.metrics import dice_score  # brings Keras: imported here so that checking the flags stays quick

    scores = {k: ([], []) for k in range(1, num_classes)}
    count = 0
    for prediction, truth, spacing in cases:
        count += 1
        base = apply_plan(prediction, make_plan("none", num_classes, min_size, connectivity), spacing)
        largest = apply_plan(prediction, make_plan("lcc", num_classes, min_size, connectivity), spacing)
        for k, (before, after) in scores.items():
            before.append(dice_score(base == k, truth == k))
            after.append(dice_score(largest == k, truth == k))
    plan = make_plan("none", num_classes, min_size, connectivity)
    dice = {}
    for k, (before, after) in scores.items():
        mean_before, mean_after = _mean_or_none(before), _mean_or_none(after)
        dice[str(k)] = {"without_lcc": mean_before, "with_lcc": mean_after}
        if mean_before is not None and mean_after is not None and mean_after > mean_before:
            plan["lcc_classes"].append(k)
    plan.update(decided_on="validation", num_cases=count, dice=dice)
    return plan


def _mean_or_none(values: Sequence[float]) -> float | None:
    """The mean dice over the cases that score the class (:func:`utils.metrics.finite_mean`), rounded for the plan;
    ``None`` (JSON ``null``) when no case does, so that a class never seen keeps its components."""
    from utils.metrics import finite_mean

    mean = finite_mean(values)
    return round(mean, 6) if math.isfinite(mean) else None
