"""Figures written by the scripts (atomically): training curves, dice box plots, per-case overlays and GIFs.

Overlays and GIFs show a case on its source grid turned to one display orientation (:class:`DisplayVolume`):
axial slices with anterior up and the patient's right on the left, coronal and sagittal slices with superior up,
each with the aspect ratio of its voxel spacing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils import fileio  # noqa: E402


def _save(figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    try:
        return fileio.write_with(path, lambda tmp: figure.savefig(tmp, dpi=dpi, bbox_inches="tight"), suffix=".png")
    finally:
        plt.close(figure)


def plot_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Loss (training and validation, if any) and the scores per epoch, side by side: the dice, and IoU and F-score
    when training logged them (``train.py --metrics``); per-class columns (``val_dice_1``) are left out."""
    epochs = [int(row.get("epoch", i)) + 1 for i, row in enumerate(history)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "val_loss"):
        values = [row.get(key) for row in history]
        if any(v is not None and np.isfinite(v) for v in values):
            left.plot(epochs, values, marker=".", label=key)
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    score_keys = sorted({k for row in history for k in row if _is_score_column(k)})
    for key in score_keys:
        right.plot(epochs, [row.get(key) for row in history], marker=".", label=key)
    shown = "dice" if all("dice" in key for key in score_keys) else "score"
    right.set(xlabel="epoch", ylabel=shown, title=shown, ylim=(0, 1))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    return _save(figure, path)


def _is_score_column(key: str) -> bool:
    """``fg_dice``, ``val_dice``, ``fg_iou``, ``val_fscore``, ...: a mean score, not a per-class column."""
    return any(name in key for name in ("dice", "iou", "fscore")) and not key.rstrip("0123456789").endswith("_")


def plot_dice_boxplot(values: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str = "") -> Path:
    """Box plot of per-case dice for each class (NaN values, i.e. empty classes, are left out)."""
    names = list(values)
    data = [np.asarray([v for v in values[n] if v is not None and np.isfinite(v)], dtype=float) for n in names]
    figure, axis = plt.subplots(figsize=(max(4, 1.4 * len(names) + 2), 4))
    axis.boxplot(data, showmeans=True)
    axis.set_xticks(range(1, len(names) + 1), names)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        axis.scatter(i + rng.uniform(-0.08, 0.08, len(d)), d, s=10, alpha=0.6, color="tab:blue")
    axis.set(ylabel="dice", ylim=(0, 1.02), title=title or "dice per case")
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, path)


CLASS_COLORS = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)
PLANES = ("axial", "coronal", "sagittal")


def class_color(k: int) -> tuple[int, int, int]:
    """RGB colour of class ``k`` (1-based classes cycle through :data:`CLASS_COLORS`)."""
    return CLASS_COLORS[(int(k) - 1) % len(CLASS_COLORS)]


def label_rgb(label_map: np.ndarray) -> np.ndarray:
    """A class map ``(*shape)`` as an RGB ``uint8`` picture ``(*shape, 3)``: background black, class ``k`` in
    :func:`class_color` ``(k)``."""
    palette = np.array([(0, 0, 0), *CLASS_COLORS], dtype=np.uint8)
    labels = np.asarray(label_map, dtype=np.intp)
    return palette[np.where(labels > 0, (labels - 1) % len(CLASS_COLORS) + 1, 0)]


def side_by_side(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, min_size: int = 128) -> np.ndarray:
    """``image | truth | prediction`` as one RGB ``uint8`` picture (TensorBoard's validation slices).

    Args:
        image: the slice ``(H, W, C)``; its first channel is shown in grey, scaled between its 0.5 and 99.5
            percentiles.
        truth, prediction: class maps ``(H, W)``, shown in the class colours of :func:`label_rgb`.
        min_size: the picture is enlarged by pixel repetition to at least this many rows.

    Returns:
        ``(f * H, f * (3 * W + 4), 3)`` ``uint8``, with a white gap of two pixels between the panels.
    """
    grey = (_scale_intensity(np.asarray(image)[..., 0]) * 255).astype(np.uint8)
    grey = np.repeat(grey[..., None], 3, axis=-1)
    gap = np.full((grey.shape[0], 2, 3), 255, dtype=np.uint8)
    strip = np.concatenate([grey, gap, label_rgb(truth), gap, label_rgb(prediction)], axis=1)
    factor = max(1, -(-min_size // strip.shape[0]))
    return np.repeat(np.repeat(strip, factor, axis=0), factor, axis=1)


@dataclass
class DisplayVolume:
    """A case turned to the display orientation: axis 0 points superior, 1 anterior, 2 right (``S, A, R``).

    Attributes:
        image: ``(Z, Y, X)`` float32, the first channel scaled to [0, 1] between its 0.5 and 99.5 percentiles.
        truth, prediction: ``(Z, Y, X)`` class maps, or ``None``.
        spacing: voxel size in mm along each axis.
    """

    image: np.ndarray
    truth: np.ndarray | None
    prediction: np.ndarray | None
    spacing: tuple[float, float, float]

    @classmethod
    def from_source(cls, image, truth, prediction, affine) -> DisplayVolume:
        """From source-grid arrays (``image`` ``(Z, Y, X[, C])``) and the source affine (see :mod:`utils.geometry`)."""
        from utils import geometry

        first = np.asarray(image)[..., 0] if np.ndim(image) == 4 else np.asarray(image)
        oriented, oriented_affine, _ = geometry.reorient(first, affine)
        masks = [None if m is None else geometry.reorient(np.asarray(m), affine)[0] for m in (truth, prediction)]
        return cls(_scale_intensity(oriented), masks[0], masks[1], geometry.spacing_from_affine(oriented_affine))

    def foreground(self) -> np.ndarray:
        masks = [m > 0 for m in (self.truth, self.prediction) if m is not None]
        return np.logical_or.reduce(masks) if masks else np.zeros(self.image.shape, dtype=bool)

    def plane(self, name: str, index: int) -> tuple[list[np.ndarray | None], float]:
        """``[image, truth, prediction]`` of one plane as displayed (superior / anterior up, patient's right on the
        left, as radiologists read them) and the pixel aspect ratio (height / width in mm)."""
        axis = PLANES.index(name)
        arrays = [np.take(a, index, axis=axis)[::-1, ::-1] if a is not None else None for a in self._arrays()]
        rows, cols = [s for i, s in enumerate(self.spacing) if i != axis]
        return arrays, rows / cols

    def _arrays(self) -> list[np.ndarray | None]:
        return [self.image, self.truth, self.prediction]

    def best_slices(self) -> dict[str, int]:
        """Per plane, the slice with the most foreground (truth or prediction); the middle slice when there is none."""
        foreground = self.foreground()
        best = {}
        for axis, name in enumerate(PLANES):
            counts = foreground.sum(axis=tuple(a for a in range(3) if a != axis))
            best[name] = int(np.argmax(counts)) if counts.any() else self.image.shape[axis] // 2
        return best


def _scale_intensity(image: np.ndarray) -> np.ndarray:
    """``image`` (any number of axes) scaled to [0, 1] between its 0.5 and 99.5 percentiles (over about two million
    evenly spaced voxels; NaN shown as the low end)."""
    image = np.asarray(image, dtype=np.float32)
    step = max(1, int(round((image.size / 2_000_000) ** (1 / max(image.ndim, 1)))))
    sample = image[(slice(None, None, step),) * image.ndim]
    finite = sample[np.isfinite(sample)]
    low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5])) if finite.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    return np.clip((np.nan_to_num(image, nan=low) - low) / (high - low), 0.0, 1.0)


def plot_overlay(
    volume: DisplayVolume,
    path: str | os.PathLike,
    names: Mapping[int, str] | None = None,
    title: str = "",
) -> Path:
    """``overlays/<id>.png``: the image with truth (solid) and prediction (dashed) contours per class, on the slices
    with the most foreground, in the axial, coronal and sagittal planes (axial only for a single slice), each shown
    with the aspect ratio of its voxel spacing."""
    from matplotlib.lines import Line2D

    best = volume.best_slices()
    planes = [p for p in PLANES if p == "axial" or volume.image.shape[0] > 1]
    figure, axes = plt.subplots(1, len(planes), figsize=(4.2 * len(planes), 4.6), squeeze=False)
    classes = set()
    for axis, plane in zip(axes[0], planes, strict=True):
        (image, truth, prediction), aspect = volume.plane(plane, best[plane])
        axis.imshow(image, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        for mask, style in ((truth, "solid"), (prediction, "dashed")):
            for k in np.unique(mask) if mask is not None else []:
                if k == 0:
                    continue
                classes.add(int(k))
                color = np.array(class_color(k)) / 255
                axis.contour(
                    (mask == k).astype(np.float32), levels=[0.5], colors=[color], linewidths=1.3, linestyles=style
                )
        axis.set_title(f"{plane} {best[plane] + 1}/{volume.image.shape[PLANES.index(plane)]}", fontsize=10)
        axis.set_axis_off()
    names = names or {}
    handles = [
        Line2D([], [], color=np.array(class_color(k)) / 255, label=names.get(k, f"class {k}")) for k in sorted(classes)
    ]
    handles += [
        Line2D([], [], color="k", ls="solid", label="truth"),
        Line2D([], [], color="k", ls="dashed", label="prediction"),
    ]
    columns = min(len(handles), 8)
    rows = -(-len(handles) // columns)
    figure.set_figheight(4.6 + 0.25 * rows)
    figure.legend(handles=handles, loc="lower center", ncol=columns, frameon=False, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.25 * rows / figure.get_figheight() + 0.02, 1, 0.95))
    return _save(figure, path, dpi=80)


def write_overlay_gif(
    volume: DisplayVolume,
    path: str | os.PathLike,
    max_frames: int = 48,
    size: int = 256,
    frame_ms: int = 120,
) -> Path:
    """An animated GIF scrolling through the axial slices: prediction filled (translucent), truth outlined, each
    class in its colour, the slice number in the corner. Slices through the foreground (plus a margin) are shown,
    at most ``max_frames`` of them evenly spaced; the longer side is ``size`` pixels, the aspect from the spacing."""
    from PIL import Image, ImageDraw

    from utils.geometry import resize_nearest

    depth = volume.image.shape[0]
    foreground = volume.foreground().any(axis=(1, 2))
    if foreground.any():
        present = np.flatnonzero(foreground)
        margin = max(1, (present[-1] - present[0]) // 10)
        low, high = max(0, present[0] - margin), min(depth - 1, present[-1] + margin)
    else:
        low, high = 0, depth - 1
    indices = np.unique(np.linspace(low, high, min(max_frames, high - low + 1)).round().astype(int))
    (first, _, _), aspect = volume.plane("axial", 0)
    height_mm, width_mm = first.shape[0] * aspect, first.shape[1]
    scale = size / max(height_mm, width_mm)
    shape = (max(1, int(round(height_mm * scale))), max(1, int(round(width_mm * scale))))
    frames = []
    for index in indices:
        (image, truth, prediction), _ = volume.plane("axial", int(index))
        rgb = _overlay_rgb(*(None if a is None else resize_nearest(a, shape) for a in (image, truth, prediction)))
        frame = Image.fromarray(rgb)
        ImageDraw.Draw(frame).text((4, 2), f"{index + 1}/{depth}", fill=(255, 255, 0))
        frames.append(frame.convert("P", palette=Image.Palette.ADAPTIVE, colors=255))

    def save(tmp: Path) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)

    return fileio.write_with(path, save, suffix=".gif")


def _overlay_rgb(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray | None) -> np.ndarray:
    from scipy import ndimage

    rgb = np.repeat((image * 255)[..., None], 3, axis=-1).astype(np.float32)
    for k in np.unique(prediction) if prediction is not None else []:
        if k:
            mask = prediction == k
            rgb[mask] = 0.6 * rgb[mask] + 0.4 * np.array(class_color(k), dtype=np.float32)
    for k in np.unique(truth) if truth is not None else []:
        if k:
            mask = truth == k
            rgb[mask & ~ndimage.binary_erosion(mask)] = class_color(k)
    return rgb.round().astype(np.uint8)
