"""The settings of one evaluation (the flags of ``evaluation.py``), checked when they are made."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from utils.evaluate.postprocess import parse_min_size
from utils.settings import ENGINES, EVALUATE, METRIC_NAMES, PICTURES, POSTPROCESS_CHOICES

log = logging.getLogger(__name__)


@dataclass
class Options:
    """Inference, post-processing, scoring and picture settings of one evaluation (the flags of evaluation.py).

    Attributes:
        overlap, blend, tta: sliding-window settings (:func:`utils.inference.predict_volume`); ``tta`` is ``True``
            (mirror every axis), ``False``, or the spatial axes to mirror (evaluation.py's default: the axes the
            run's training mirrored).
        batch_size: windows per model call; ``None`` takes the run's training batch size.
        postprocess: ``none``, ``lcc`` (largest component of every class) or ``auto`` (per class, decided on the
            validation split and stored in the run folder's ``postprocessing.json``).
        min_size: ``--min-size`` text: components below it are removed (``"50"`` voxels, ``"30mm3"``, ``"0.5ml"``).
        connectivity: 1 (faces) to 3 (corners) for connected components.
        regions: BraTS-style regions scored besides the classes, ``{name: [label values]}``.
        metrics: names from :data:`utils.settings.METRIC_NAMES`.
        nsd_tolerance: the tolerance of ``nsd`` in mm.
        pictures: ``all`` (overlay PNG and GIF per case), ``overlays`` (PNG only) or ``none``.
        progress: progress bars over cases and windows.
        save_probabilities: also write each case's class probabilities on the source grid
            (:mod:`utils.evaluate.probabilities`).
        engine: what runs the network: ``keras`` (the ``.keras`` model) or ``onnx`` (a bundle's ``model.onnx`` with
            onnxruntime; :func:`utils.bundle.open_run`).
    """

    overlap: float = EVALUATE["overlap"].default
    blend: str = EVALUATE["blend"].default
    tta: bool | list[int] = False
    batch_size: int | None = None
    postprocess: str = EVALUATE["postprocess"].default
    min_size: str | None = None
    connectivity: int = EVALUATE["connectivity"].default
    regions: dict[str, list[int]] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: list(EVALUATE["metrics"].default))
    nsd_tolerance: float = EVALUATE["nsd_tolerance"].default
    pictures: str = EVALUATE["pictures"].default
    progress: bool = True
    save_probabilities: bool = EVALUATE["save_probabilities"].default
    engine: str = EVALUATE["engine"].default

    def __post_init__(self) -> None:
        if self.postprocess not in POSTPROCESS_CHOICES:
            raise ValueError(f"postprocess must be one of {POSTPROCESS_CHOICES}, got {self.postprocess!r}")
        if self.pictures not in PICTURES:
            raise ValueError(f"pictures must be one of {PICTURES}, got {self.pictures!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_NAMES)}")
        parse_min_size(self.min_size)
        self.regions = check_regions(self.regions)

    def key(self) -> dict:
        """The settings that change a case's result (for the per-case cache)."""
        return {k: v for k, v in asdict(self).items() if k not in ("progress",)}


def check_regions(regions: Mapping | None) -> dict[str, list[int]]:
    """Validate ``{name: [label values]}``.

    Raises:
        ValueError: a name that is empty or all digits (those are class keys), or members that are not integers.
    """
    checked = {}
    for name, members in (regions or {}).items():
        if not str(name) or str(name).isdigit():
            raise ValueError(f"region names must not be empty or a number, got {name!r}")
        if isinstance(members, int | str) or not members:
            raise ValueError(f"region {name!r} needs a list of label values, got {members!r}")
        try:
            checked[str(name)] = [int(v) for v in members]
        except (TypeError, ValueError) as error:
            raise ValueError(f"region {name!r}: label values must be integers, got {members!r}") from error
    return checked
