"""Sliding-window inference: seconds per volume, ``utils.inference.predict_volume`` vs MONAI's
``sliding_window_inference``.

The same network shape on both sides (the U-Net of ``train_step.py``, ``norm="instance"``, untrained weights: the
speed does not depend on them), windows of 40x56x40, overlap 0.5, Gaussian blending with sigma = patch / 8, 4 windows
per model call, class probabilities of the whole volume as the result (MONAI's predictor applies the softmax, ours
ends in it). Volumes: prepared Hippocampus test cases (smaller than a window: one padded window each) and the
pyradiomics lung1 CT (512x512x48 at 0.57x0.57x5 mm) resampled by ``data_gen.py --spacing`` as a user would prepare
it. Both sides read the same prepared ``.npy`` arrays; preparation is not timed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from common import LUNG1, NUM_CLASSES, PATCH, interleave, link_or_copy, prepared_images, run_script, summarize

OVERLAP = 0.5
WINDOWS_PER_CALL = 4


def _volumes(paths: list[str]) -> list[np.ndarray]:
    return [np.load(p) for p in paths]


def _time_volumes(predict, volumes: list[np.ndarray]) -> dict:
    """Seconds of ``predict`` on each volume (checking the output shape); their mean is the figure."""
    seconds = []
    for image in volumes:
        start = time.perf_counter()
        out = predict(image)
        seconds.append(time.perf_counter() - start)
        if out.shape != (*image.shape[:3], NUM_CLASSES):
            raise RuntimeError(f"unexpected output shape {out.shape}")
    return {"seconds_per_volume": float(np.mean(seconds)), "seconds": seconds}


def _warm_up_part(image: np.ndarray) -> np.ndarray:
    """The corner of ``image`` covered by at most two windows per axis: every small volume whole, a large one in
    part (enough to trace the batch sizes a large volume uses)."""
    return image[tuple(slice(0, int(1.5 * p)) for p in PATCH)]


class Ours:
    """The toolkit's U-Net (TensorFlow backend) through ``predict_volume``.

    ``predictor="eager"`` is the toolkit before this benchmark's fix: windows through an eager ``model(batch)``
    instead of ``model.predict_on_batch`` (Keras's compiled predict function, traced once per batch size: at most
    ``WINDOWS_PER_CALL`` traces, all made in the warm-up), which ``utils.inference.model_predictor`` now uses.
    """

    def __init__(self, paths: list[str], predictor: str = "shipped"):
        self.paths, self.predictor = paths, predictor

    def setup(self) -> dict:
        import model as model_zoo
        from utils.inference import predict_volume

        self.predict_volume = predict_volume
        self.model = model_zoo.build_model(
            "unet3d", (*PATCH, 1), NUM_CLASSES, filters=16, depth=4, norm="instance", stem_stride=1
        )
        self.volumes = _volumes(self.paths)
        for image in self.volumes:
            self.predict(_warm_up_part(image))
        return {"volumes": [list(v.shape) for v in self.volumes], "predictor": self.predictor}

    def eager(self, batch: np.ndarray) -> np.ndarray:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(self.model(batch, training=False)))

    def predict(self, image: np.ndarray) -> np.ndarray:
        predict = self.eager if self.predictor == "eager" else None
        return self.predict_volume(
            self.model, image, PATCH, NUM_CLASSES, overlap=OVERLAP, blend="gaussian", batch_size=WINDOWS_PER_CALL,
            predict=predict,
        )  # fmt: skip

    def labels(self, image: np.ndarray) -> np.ndarray:
        """The arg-max label map, as ``evaluation.py`` makes it: finished slabs arg-maxed as they come
        (``utils.inference.predict_labels``), the probabilities never whole."""
        from utils.inference import predict_labels

        return predict_labels(
            self.model, image, PATCH, NUM_CLASSES, image.shape[:3], overlap=OVERLAP, blend="gaussian",
            batch_size=WINDOWS_PER_CALL,
        )  # fmt: skip

    def run(self) -> dict:
        return _time_volumes(self.predict, self.volumes)


class Monai:
    """The same network in PyTorch through ``monai.inferers.sliding_window_inference``."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def setup(self) -> dict:
        import torch
        from monai.inferers import sliding_window_inference
        from torch_unet import UNet3D

        torch.manual_seed(0)
        self.torch, self.sliding_window_inference = torch, sliding_window_inference
        self.model = UNet3D(1, NUM_CLASSES, 16, 4, "instance").eval()
        self.volumes = _volumes(self.paths)
        for image in self.volumes:
            self.predict(_warm_up_part(image))
        return {"volumes": [list(v.shape) for v in self.volumes], "torch_threads": torch.get_num_threads()}

    def predict(self, image: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))[None]
            out = self.sliding_window_inference(
                inputs,
                PATCH,
                WINDOWS_PER_CALL,
                lambda x: torch.softmax(self.model(x), dim=1),
                overlap=OVERLAP,
                mode="gaussian",
                sigma_scale=0.125,
            )
            return np.moveaxis(out[0].numpy(), 0, -1)

    def labels(self, image: np.ndarray) -> np.ndarray:
        """The arg-max label map of :meth:`predict` (MONAI's sliding window returns whole probabilities)."""
        return np.argmax(self.predict(image), axis=-1).astype(np.uint8)

    def run(self) -> dict:
        return _time_volumes(self.predict, self.volumes)


WORKERS = {"ours": Ours, "monai": Monai}


def prepared_lung1(workdir, log_dir, spacing) -> str:
    """lung1 prepared by ``data_gen.py`` at ``spacing`` (Z Y X mm); returns the image ``.npy`` path."""
    name = "lung1_" + "x".join(f"{s:g}" for s in spacing)
    source, out = workdir / "raw" / "lung1", workdir / "prepared" / name
    source.mkdir(parents=True, exist_ok=True)
    for suffix in ("image", "label"):
        link = source / f"lung1_{suffix}.nrrd"
        if link.is_symlink():  # made by an older benchmark; data_gen.py refuses links out of the dataset folder
            link.unlink()
        if not link.exists():
            link_or_copy(LUNG1.with_name(f"lung1_{suffix}.nrrd"), link)
    if not (out / "manifest.json").is_file():
        run_script(
            [sys.executable, "data_gen.py", "--input", str(source), "--output", str(out), "--image-pattern",
             "*_image.nrrd", "--label-pattern", "*_label.nrrd", "--spacing", *map(str, spacing)],
            log_dir / f"prepare_{name}.log",
        )  # fmt: skip
    return str(next((out / "volumes").glob("*_image.npy")))


def run(quick: bool, log_dir, data, workdir) -> dict:
    """Hippocampus cases and lung1; the ratio is the geometric mean of the two seconds-per-volume ratios."""
    hippocampus = prepared_images(data, "val")[: 4 if quick else 20]
    lung_spacing = (3.0, 2.0, 2.0) if quick else (1.5, 1.0, 1.0)
    lung = [prepared_lung1(workdir, log_dir, lung_spacing)]
    results = {}
    for name, paths, count in (("hippocampus", hippocampus, 3 if quick else 5), ("lung1", lung, 2 if quick else 3)):
        sides = {
            "ours": ("ours", {"paths": paths}, None),
            "monai": ("monai", {"paths": paths}, None),
            "ours_eager_before_fix": ("ours", {"paths": paths, "predictor": "eager"}, None),
        }
        raw = interleave("inference", sides, count, log_dir)
        figures = {}
        for label, values in raw.items():
            per_volume = summarize([r["seconds_per_volume"] for r in values["reps"]])
            figures[label] = {
                "seconds_per_volume": round(per_volume["median"], 3),
                "range": [round(per_volume["min"], 3), round(per_volume["max"], 3)],
                "loadavg": [r["loadavg"][0] for r in values["reps"]],
                **values["info"],
            }
        figures["ratio"] = round(figures["monai"]["seconds_per_volume"] / figures["ours"]["seconds_per_volume"], 3)
        figures["ratio_best"] = round(figures["monai"]["range"][0] / figures["ours"]["range"][0], 3)
        if name == "lung1":
            figures["spacing_zyx_mm"] = list(lung_spacing)
        results[name] = figures
    ratio = float(np.sqrt(results["hippocampus"]["ratio"] * results["lung1"]["ratio"]))
    best = float(np.sqrt(results["hippocampus"]["ratio_best"] * results["lung1"]["ratio_best"]))
    return {
        "ratio": round(ratio, 3),
        "ratio_best": round(best, 3),
        "ratio_from": "geometric mean of hippocampus and lung1",
        "by_volume": results,
    }
