"""Train step: samples per second of one optimisation step of the same 3D U-Net, Keras vs plain PyTorch.

The network: ``model.build_model("unet3d", (40, 56, 40, 1), 3, filters=16, depth=4, norm=NORM, stem_stride=1)``
(two 3x3x3 conv + norm + LeakyReLU per level, max-pooling, transposed convolutions, 16-128 filters) and its
layer-for-layer PyTorch copy (``torch_unet.py``); batch 4, float32, Adam, dice + cross-entropy (the toolkit's
``dice_ce``; MONAI's ``DiceCELoss`` on the PyTorch side). Keras runs ``train_on_batch`` (the compiled train function
``fit`` uses; no XLA on a CPU, as Keras decides by default), on the TensorFlow backend and, as a third side, on the
PyTorch backend. Each repetition times ``steps`` steps after a warm-up; the figure is the median step.
"""

from __future__ import annotations

import time

import numpy as np
from common import NUM_CLASSES, PATCH, interleave, summarize

BATCH = 4


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, *PATCH, 1)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (BATCH, *PATCH))
    return x, labels


class KerasStep:
    """The toolkit's U-Net trained with ``train_on_batch`` on the backend set by ``KERAS_BACKEND``."""

    def __init__(self, norm: str, steps: int, warmup: int = 3, jit_compile: str | bool = "auto"):
        self.norm, self.steps, self.warmup, self.jit_compile = norm, steps, warmup, jit_compile

    def setup(self) -> dict:
        import keras

        import model as model_zoo
        from utils.losses import get_loss

        self.model = model_zoo.build_model(
            "unet3d", (*PATCH, 1), NUM_CLASSES, filters=16, depth=4, norm=self.norm, stem_stride=1, convs_per_level=2
        )
        self.model.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss=get_loss("dice_ce"), jit_compile=self.jit_compile
        )
        x, labels = _data()
        self.x, self.y = x, np.eye(NUM_CLASSES, dtype=np.float32)[labels]
        for _ in range(self.warmup):
            self.model.train_on_batch(self.x, self.y)
        trainable = sum(int(np.prod(w.shape)) for w in self.model.trainable_weights)
        return {"backend": keras.backend.backend(), "trainable_parameters": trainable, "threads": _threads()}

    def run(self) -> dict:
        times = []
        for _ in range(self.steps):
            start = time.perf_counter()
            self.model.train_on_batch(self.x, self.y)
            times.append(time.perf_counter() - start)
        return {"step_s": float(np.median(times)), "steps": times}


class TorchStep:
    """The same network in plain PyTorch, MONAI's ``DiceCELoss``, Adam."""

    def __init__(self, norm: str, steps: int, warmup: int = 3):
        self.norm, self.steps, self.warmup = norm, steps, warmup

    def setup(self) -> dict:
        import torch
        from monai.losses import DiceCELoss
        from torch_unet import UNet3D, count_parameters

        torch.manual_seed(0)
        self.torch = torch
        self.model = UNet3D(1, NUM_CLASSES, 16, 4, self.norm).train()
        self.loss = DiceCELoss(softmax=True, to_onehot_y=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), 1e-3)
        x, labels = _data()
        self.x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
        self.y = torch.from_numpy(labels[:, None].astype(np.int64))
        for _ in range(self.warmup):
            self.step()
        return {"backend": "pytorch", "trainable_parameters": count_parameters(self.model), "threads": _threads()}

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()

    def run(self) -> dict:
        times = []
        for _ in range(self.steps):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return {"step_s": float(np.median(times)), "steps": times}


def _threads() -> dict:
    import sys

    out = {}
    if "torch" in sys.modules:
        out["torch_intra_op"] = sys.modules["torch"].get_num_threads()
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        out["tf_intra_op"] = tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)"
    return out


WORKERS = {"keras": KerasStep, "torch": TorchStep}


def ratios(figures: dict) -> dict:
    """Keras-TF against the faster PyTorch side: ``ratio`` by median samples/s, ``ratio_best`` by best step."""
    ours = figures["keras_tensorflow"]
    peers = [figures[side] for side in ("pytorch", "pytorch_omp_default_wait") if side in figures]
    return {
        "ratio": round(ours["samples_per_s"] / max(p["samples_per_s"] for p in peers), 3),
        "ratio_best": round(min(p["best_step_ms"] for p in peers) / ours["best_step_ms"], 3),
    }


def run(quick: bool, log_dir) -> dict:
    """Instance norm (and batch norm in a full run); the ratio is that of ``norm="instance"`` (the recipe's norm).

    PyTorch runs twice, with passive OpenMP waiting (``pytorch``, as every PyTorch side of the benchmarks) and with
    its default (``pytorch_omp_default_wait``): which is faster depends on the background load, so each ratio is
    taken against the faster of the two (by median for ``ratio``, by best step for ``ratio_best``).
    """
    reps, steps = (3, 3) if quick else (7, 5)
    norms = ("instance",) if quick else ("instance", "batch")
    results = {}
    for norm in norms:
        sides = {
            "keras_tensorflow": ("keras", {"norm": norm, "steps": steps}, {"KERAS_BACKEND": "tensorflow"}),
            "pytorch": ("torch", {"norm": norm, "steps": steps}, None),
            "keras_torch": ("keras", {"norm": norm, "steps": steps}, {"KERAS_BACKEND": "torch"}),
            "pytorch_omp_default_wait": ("torch", {"norm": norm, "steps": steps}, {"OMP_WAIT_POLICY": None}),
        }
        raw = interleave("train_step", sides, reps, log_dir)
        figures = {}
        for label, data in raw.items():
            step = summarize([r["step_s"] for r in data["reps"]])
            best = min(min(r["steps"]) for r in data["reps"])
            figures[label] = {
                "best_step_ms": round(1000 * best, 1),
                "step_ms": round(1000 * step["median"], 1),
                "step_ms_range": [round(1000 * step["min"], 1), round(1000 * step["max"], 1)],
                "samples_per_s": round(BATCH / step["median"], 3),
                "loadavg": [r["loadavg"][0] for r in data["reps"]],
                **data["info"],
            }
        results[norm] = {**figures, **ratios(figures)}
    primary = "instance" if "instance" in results else norms[0]
    main = results[primary]
    return {"ratio": main["ratio"], "ratio_best": main["ratio_best"], "ratio_from": primary, "by_norm": results}
