"""One sliding-window prediction of one prepared volume, in a fresh process, for ``scale_measure.py``:
``python benchmarks/infer_once.py SIDE IMAGE.npy [--tiny] [--labels]`` with ``SIDE`` ``ours`` or ``monai``.

Builds the side of ``inference.py`` (the same U-Net on both sides, windows of 40x56x40, overlap 0.5, Gaussian
blending, 4 windows a call), warms it up on a corner of the volume, predicts the whole volume once and prints one JSON
line: the wall-clock and CPU seconds (all threads) of that prediction and the process's peak resident memory
(``ru_maxrss``) in MiB. ``--tiny`` swaps the U-Net for a 1x1x1 convolution after the warm-up: what the sliding
window itself holds in memory for a large volume, in a fraction of the time. ``--labels`` makes the product the
arg-max label map, as ``evaluation.py`` does (ours: ``utils.inference.predict_labels``, which arg-maxes each slab of
planes as the windows finish it and never holds the probabilities whole; MONAI: the arg-max of its probabilities)
instead of the probabilities.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings


def tiny_network(side: str):
    """A one-layer network (a 1x1x1 convolution to the classes) for ``side``: the sliding window's own memory and
    overhead, with next to no network cost."""
    from common import NUM_CLASSES, PATCH

    if side == "ours":
        import keras

        layers = [keras.Input((*PATCH, 1)), keras.layers.Conv3D(NUM_CLASSES, 1, activation="softmax")]
        return keras.Sequential(layers)
    import torch

    return torch.nn.Conv3d(1, NUM_CLASSES, 1).eval()


def main() -> None:
    side, path = sys.argv[1], sys.argv[2]
    tiny, labels = "--tiny" in sys.argv[3:], "--labels" in sys.argv[3:]
    warnings.filterwarnings("ignore")
    import inference

    worker = inference.WORKERS[side]([path])
    worker.setup()
    if tiny:
        worker.model = tiny_network(side)
    image = worker.volumes.pop()
    start, cpu_start = time.perf_counter(), os.times()
    out = worker.labels(image) if labels else worker.predict(image)
    seconds, cpu_end = time.perf_counter() - start, os.times()
    cpu = cpu_end.user + cpu_end.system - cpu_start.user - cpu_start.system
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"side": side, "network": "tiny" if tiny else "unet3d", "shape": list(image.shape), "seconds": seconds}
    figures["cpu_seconds"] = cpu
    figures["output"] = "labels" if labels else "probabilities"
    print(json.dumps({**figures, "peak_rss_mib": peak, "output_dtype": str(out.dtype)}))


if __name__ == "__main__":
    main()
