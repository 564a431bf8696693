"""The dataset fingerprint (``fingerprint.json``): per-case records gathered in the first pass of preparation and
aggregated into spacing and shape statistics, per-channel foreground intensity statistics and class fractions.

The preprocessing of every case (:mod:`utils.preprocessing`) takes its dataset-level numbers from it: the median
spacing and the CT intensity percentiles.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import numpy as np

from utils import geometry
from utils.formats import CaseData
from utils.preprocessing import count_values

log = logging.getLogger(__name__)


_FOREGROUND_SAMPLES = 10_000
_SUM_BLOCK = 2**18  # values squared at once by sum_of_squares (2 MiB of float64)


def case_fingerprint(case: CaseData, num_classes: int) -> dict:
    """Shape, spacing, class voxel counts and a sample of foreground intensities of one (reoriented) case."""
    oriented, affine, _ = geometry.reorient(np.empty(case.image.shape[:3], dtype=np.uint8), case.affine)
    spacing = geometry.spacing_from_affine(affine)
    shape = [int(n) for n in oriented.shape]
    record = {"id": case.case_id, "shape": shape, "spacing": list(spacing), "channels": []}
    if case.label is not None:
        record["class_voxels"] = count_values(case.label, num_classes).tolist()
        foreground = case.label > 0
    else:
        foreground = np.zeros(case.image.shape[:3], dtype=bool)
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    for c in range(case.image.shape[-1]):
        channel = case.image[..., c]
        values = channel[foreground]
        if values.size > _FOREGROUND_SAMPLES:
            values = rng.choice(values, _FOREGROUND_SAMPLES, replace=False)
        values = values.astype(np.float32, copy=False)  # an integer image (load_case(integers=True)) as float32
        record["channels"].append(
            {
                "min": float(channel.min()),
                "max": float(channel.max()),
                "sum": float(channel.sum(dtype=np.float64)),
                "sum_sq": float(sum_of_squares(channel)),
                "count": int(channel.size),
                "foreground_sample": values.tolist(),
            }
        )
    return record


def sum_of_squares(values: np.ndarray, block: int = _SUM_BLOCK) -> np.float64:
    """``np.square(values, dtype=np.float64).sum()`` to the last bit, without its float64 copy of the whole array.

    numpy sums a contiguous array pairwise: above 128 values it splits ``n`` at ``n // 2`` rounded down to a multiple
    of 8 and adds the two halves' sums. Splitting the same way down to pieces of at most ``block`` values (at least
    128), and squaring each piece alone, adds the same numbers in the same order, with a float64 temporary of
    ``block`` values (2 MiB).
    """
    values = values.reshape(-1)  # a view when contiguous (one channel of a (Z, Y, X, 1) image)
    if values.size <= max(block, 128):
        return np.square(values, dtype=np.float64).sum()
    half = values.size // 2
    half -= half % 8
    return sum_of_squares(values[:half], block) + sum_of_squares(values[half:], block)


def aggregate_fingerprint(records: Sequence[dict], channels: dict[str, str], labels: dict[str, str]) -> dict:
    """Dataset fingerprint (written to ``fingerprint.json``) from per-case :func:`case_fingerprint` records."""
    if not records:
        raise ValueError("cannot compute a fingerprint of an empty dataset")
    spacings = np.array([r["spacing"] for r in records], dtype=float)
    shapes = np.array([r["shape"] for r in records], dtype=float)
    fingerprint = {
        "num_cases": len(records),
        "spacing": _stats(spacings),
        "shape": _stats(shapes),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "median_shape": np.median(shapes, axis=0).tolist(),
        "anisotropy": float(np.max(np.median(spacings, axis=0)) / np.min(np.median(spacings, axis=0))),
        "intensity": {},
    }
    for index, name in channels.items():
        samples = np.concatenate(
            [np.asarray(r["channels"][int(index)]["foreground_sample"], dtype=np.float64) for r in records]
        )
        per_case = [r["channels"][int(index)] for r in records]
        entry = {
            "name": name,
            "min": float(min(c["min"] for c in per_case)),
            "max": float(max(c["max"] for c in per_case)),
        }
        if all("count" in c for c in per_case):
            count = sum(c["count"] for c in per_case)
            mean = sum(c["sum"] for c in per_case) / count
            variance = max(sum(c["sum_sq"] for c in per_case) / count - mean**2, 0.0)
            entry.update(dataset_mean=float(mean), dataset_std=float(np.sqrt(variance)))
        if samples.size:
            entry.update(
                mean=float(samples.mean()),
                std=float(samples.std()),
                percentile_00_5=float(np.percentile(samples, 0.5)),
                percentile_99_5=float(np.percentile(samples, 99.5)),
            )
        fingerprint["intensity"][index] = entry
    labelled = [r for r in records if "class_voxels" in r]
    if labelled:
        counts = np.sum(
            [np.pad(r["class_voxels"], (0, max(0, len(labels) - len(r["class_voxels"])))) for r in labelled],
            axis=0,
        )
        fingerprint["class_fraction"] = {
            str(k): float(counts[int(k)] / counts.sum()) for k in labels if int(k) < len(counts)
        }
        fingerprint["cases_with_class"] = {
            str(k): int(sum(1 for r in labelled if int(k) < len(r["class_voxels"]) and r["class_voxels"][int(k)] > 0))
            for k in labels
        }
    return fingerprint


def _stats(values: np.ndarray) -> dict:
    return {
        "min": values.min(axis=0).tolist(),
        "median": np.median(values, axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
        "mean": values.mean(axis=0).tolist(),
    }


def _ct_stats(fingerprint: dict) -> dict:
    return {
        k: {s: v.get(s) for s in ("mean", "std", "percentile_00_5", "percentile_99_5")}
        for k, v in fingerprint.get("intensity", {}).items()
    }
