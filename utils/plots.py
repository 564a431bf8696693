"""Figures written by the scripts: training curves and dice box plots (PNG, written atomically)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils import fileio  # noqa: E402


def _save(figure, path: str | os.PathLike) -> Path:
    try:
        return fileio.write_with(path, lambda tmp: figure.savefig(tmp, dpi=110, bbox_inches="tight"), suffix=".png")
    finally:
        plt.close(figure)


def plot_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Loss (training and validation, if any) and dice per epoch, side by side."""
    epochs = [int(row.get("epoch", i)) + 1 for i, row in enumerate(history)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "val_loss"):
        values = [row.get(key) for row in history]
        if any(v is not None and np.isfinite(v) for v in values):
            left.plot(epochs, values, marker=".", label=key)
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    dice_keys = sorted({k for row in history for k in row if "dice" in k and not k.startswith("val_dice_")})
    for key in dice_keys:
        right.plot(epochs, [row.get(key) for row in history], marker=".", label=key)
    right.set(xlabel="epoch", ylabel="dice", title="dice", ylim=(0, 1))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    return _save(figure, path)


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
