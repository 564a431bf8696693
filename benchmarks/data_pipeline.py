"""Data pipeline: augmented 3D patch batches per second from the prepared Hippocampus volumes, ours vs MONAI.

Both read the volumes ``data_gen.py`` wrote (``volumes/<id>_image.npy``, ``_label.npy``), draw batches of 4 patches
of 40x56x40, each from a random case, one in three centred on foreground, and apply the same transforms with the same
probabilities:

| ours (``utils.train.augment``) | MONAI |
|---|---|
| foreground oversampling, ``foreground_ratio`` 1/3 | ``RandCropByPosNegLabeld(pos=1, neg=2)`` |
| ``rotation`` p 0.1, +-15 deg/axis; ``scale`` p 0.1, 0.85-1.25 | ``RandAffined`` p 0.19 (1-0.9^2), +-15 deg, 1+-0.2 |
| ``noise`` p 0.1, std U(0, 0.1) | ``RandGaussianNoised`` p 0.1, std U(0, 0.1) |
| ``gamma`` p 0.15, 0.7-1.5, statistics kept | ``RandAdjustContrastd`` p 0.15, gamma 0.7-1.5, ``retain_stats`` |
| ``flip`` p 0.5 on each axis | ``RandFlipd`` p 0.5 on each axis |

Ours is these transforms set explicitly through ``augmentation_settings`` (the config file's ``augmentation:``
section), whatever the presets hold: :class:`utils.train.sampling.PatchSampler`, read in order through the toolkit's
loader (:class:`utils.train.workers.BatchLoader`, what ``fit`` reads) with ``workers`` worker threads, the default of
``train.py --workers`` (process workers are an extra side). MONAI: ``CacheDataset`` (load, channel first, pad to the
patch, foreground/background indices: cached once) + the random transforms + ``DataLoader`` with the same number of
worker processes. Both return label maps, ours ``(4, 40, 56, 40)`` uint8 and MONAI's ``(4, 1, 40, 56, 40)`` (the
losses one-hot encode them). The side ``ours_one_hot_before_fix`` is the sampler as it was before this benchmark
showed the cost of float32 one-hot targets ``(4, 40, 56, 40, 3)``. Set-up (caching, worker start) is not timed; each
repetition times ``batches`` batches.
"""

from __future__ import annotations

import time

import numpy as np
from common import NUM_CLASSES, PATCH, interleave, summarize

BATCH = 4
# The transforms of the table above, at MONAI's probabilities (on top of the ``none`` preset).
MATCHED = {
    "rotation": {"p": 0.1, "angle": [-15.0, 15.0]},
    "scale": {"p": 0.1, "range": [0.85, 1.25]},
    "noise": {"p": 0.1, "std": [0.0, 0.1]},
    "gamma": {"p": 0.15, "range": [0.7, 1.5], "retain_stats": True},
    "flip": {"p": 0.5},
}


def _timed(iterator, batches: int, workers: int):
    """Time ``batches`` batches in the steady state; returns the last batch and the seconds.

    Batches that worker processes prefetched while another side was measured are taken untimed first, and after the
    timing the workers get a moment to refill their queue, so that they do not run while the next side is timed.
    """
    for _ in range(2 * workers):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    if workers:
        time.sleep(1.0)
    return batch, seconds


def _no_transport_sampler(base):
    """An upper bound, not a pipeline: each worker builds the batch but hands back only a corner of it, so no
    transport cost remains (what a shared-memory hand-over would approach)."""

    class CornerSampler(base):
        def __getitem__(self, index):
            x, y = super().__getitem__(index)
            return np.ascontiguousarray(x[:, :1, :1, :1]), np.ascontiguousarray(y[:, :1, :1, :1])

    return CornerSampler


class Ours:
    """PatchSampler + Augmenter, iterated through the toolkit's ``BatchLoader`` (what ``model.fit`` reads)."""

    def __init__(self, data: str, workers: int, batches: int, preset="matched", mode="process", targets="labels"):
        self.data, self.workers, self.batches, self.preset, self.mode = data, workers, batches, preset, mode
        self.targets = targets

    def setup(self) -> dict:
        from utils.prepared import PreparedDataset
        from utils.train.augment import Augmenter, augmentation_settings
        from utils.train.sampling import PatchSampler
        from utils.train.workers import BatchLoader

        dataset = PreparedDataset(self.data)
        if self.preset == "matched":
            augment = Augmenter(augmentation_settings("none", 3, MATCHED), 3)
        else:
            augment = Augmenter(augmentation_settings(self.preset, 3), 3)
        sampler_class = _no_transport_sampler(PatchSampler) if self.targets == "none" else PatchSampler
        sampler = sampler_class(
            dataset.image,
            dataset.label,
            dataset.split("train"),
            PATCH,
            NUM_CLASSES,
            batch_size=BATCH,
            steps_per_epoch=10**6,
            foreground_ratio=1 / 3,
            augment=augment,
            seed=0,
            one_hot=self.targets == "onehot",
        )
        self.loader = BatchLoader(sampler, self.workers, self.mode, max_queue_size=2 * self.workers).start()
        self.iterator = iter(self.loader)
        for _ in range(max(3, 2 * self.workers)):
            next(self.iterator)
        return {
            "cases": len(dataset.split("train")),
            "workers": self.workers,
            "preset": self.preset,
            "mode": self.mode,
            "targets": self.targets,
        }

    def run(self) -> dict:
        (x, y), seconds = _timed(self.iterator, self.batches, self.workers)
        if self.targets != "none" and (x.shape != (BATCH, *PATCH, 1) or y.shape[: 1 + len(PATCH)] != (BATCH, *PATCH)):
            raise RuntimeError(f"unexpected batch shapes {x.shape}, {y.shape}")
        return {"batches_per_s": self.batches / seconds, "seconds": seconds}


def monai_transforms():
    """The cached (deterministic) and random MONAI transforms of the table above."""
    import numpy as np
    from monai import transforms as T

    keys = ("image", "label")
    cached = T.Compose(
        [
            T.LoadImaged(keys, reader="NumpyReader", image_only=True),
            T.EnsureChannelFirstd("image", channel_dim=-1),
            T.EnsureChannelFirstd("label", channel_dim="no_channel"),
            T.SpatialPadd(keys, PATCH),
            T.FgBgToIndicesd("label", image_key=None),
        ]
    )
    rotation = np.deg2rad(15.0)
    random = T.Compose(
        [
            T.RandCropByPosNegLabeld(
                keys, "label", PATCH, pos=1, neg=2, num_samples=1,
                fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices",
            ),
            T.RandAffined(
                keys, prob=0.19, rotate_range=(rotation,) * 3, scale_range=(0.2,) * 3,
                mode=("bilinear", "nearest"), padding_mode="zeros",
            ),
            T.RandGaussianNoised("image", prob=0.1, std=0.1),
            T.RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5), retain_stats=True),
            T.RandFlipd(keys, prob=0.5, spatial_axis=0),
            T.RandFlipd(keys, prob=0.5, spatial_axis=1),
            T.RandFlipd(keys, prob=0.5, spatial_axis=2),
            T.SelectItemsd(keys),
        ]
    )  # fmt: skip
    return cached, random


class Monai:
    """CacheDataset + RandCropByPosNegLabeld + RandAffined + noise + contrast + flips + DataLoader."""

    def __init__(self, data: str, workers: int, batches: int):
        self.data, self.workers, self.batches = data, workers, batches

    def setup(self) -> dict:
        import torch
        from monai.data import CacheDataset, DataLoader
        from monai.transforms import Compose
        from monai.utils import set_determinism

        from utils.prepared import PreparedDataset

        set_determinism(0)
        dataset = PreparedDataset(self.data)
        cases = [dataset.cases[c] for c in dataset.split("train")]
        items = [{key: str(dataset.path / case[key]) for key in ("image", "label")} for case in cases]
        cached, random = monai_transforms()
        data = CacheDataset(items, Compose([*cached.transforms, *random.transforms]), num_workers=0, progress=False)
        sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=10**6)
        loader = DataLoader(data, batch_size=BATCH, sampler=sampler, num_workers=self.workers)
        self.iterator = iter(loader)
        for _ in range(max(3, 2 * self.workers)):
            next(self.iterator)
        return {"cases": len(items), "workers": self.workers}

    def run(self) -> dict:
        batch, seconds = _timed(self.iterator, self.batches, self.workers)
        if tuple(batch["image"].shape) != (BATCH, 1, *PATCH):
            raise RuntimeError(f"unexpected batch shape {tuple(batch['image'].shape)}")
        return {"batches_per_s": self.batches / seconds, "seconds": seconds}


WORKERS = {"ours": Ours, "monai": Monai}


def run(quick: bool, log_dir, data: str) -> dict:
    """Batches per second with 2 workers each (and, in a full run, in the main process); the ratio is ours vs MONAI
    with 2 workers, each in its own default kind: threads for ``train.py --workers 2`` (its ``--worker-mode``
    default), processes for MONAI's ``DataLoader(num_workers=2)``. Extra sides: ours with process workers, ours
    before the fix (float32 one-hot targets, process workers) and, in a full run, ours with the ``default`` preset
    (mirroring only) and an upper bound of process workers without any transport of the batches."""
    reps, batches = (3, 60) if quick else (7, 120)  # enough batches that the prefetched few do not count
    results = {}
    for count in (2,) if quick else (2, 0):
        common = {"data": data, "workers": count, "batches": batches}
        sides = {
            "ours": ("ours", {**common, "mode": "thread"}, None),
            "monai": ("monai", common, None),
            "ours_one_hot_before_fix": ("ours", {**common, "targets": "onehot"}, None),
        }
        if count > 0:
            sides["ours_process_workers"] = ("ours", {**common, "mode": "process"}, None)
        if not quick:
            sides["ours_default_preset"] = ("ours", {**common, "preset": "default", "mode": "thread"}, None)
        if not quick and count > 0:
            sides["ours_upper_bound_no_transport"] = ("ours", {**common, "targets": "none"}, None)
        raw = interleave("data_pipeline", sides, reps, log_dir)
        figures = {}
        for label, values in raw.items():
            rate = summarize([r["batches_per_s"] for r in values["reps"]])
            figures[label] = {
                "batches_per_s": round(rate["median"], 2),
                "range": [round(rate["min"], 2), round(rate["max"], 2)],
                "loadavg": [r["loadavg"][0] for r in values["reps"]],
                **values["info"],
            }
        figures["ratio"] = round(figures["ours"]["batches_per_s"] / figures["monai"]["batches_per_s"], 3)
        figures["ratio_best"] = round(figures["ours"]["range"][1] / figures["monai"]["range"][1], 3)
        results[f"workers_{count}"] = figures
    main = results["workers_2"]
    return {"ratio": main["ratio"], "ratio_best": main["ratio_best"], "ratio_from": "workers_2", "by_workers": results}
