"""One sliding-window prediction of one prepared volume, in a fresh process, for ``scale_measure.py``:
``python benchmarks/infer_once.py SIDE IMAGE.npy`` with ``SIDE`` ``ours`` or ``monai``.

Builds the side of ``inference.py`` (the same U-Net on both sides, windows of 40x56x40, overlap 0.5, Gaussian
blending, 4 windows a call), warms it up on a corner of the volume, predicts the whole volume once and prints one JSON
line: the seconds of that prediction and the process's peak resident memory (``ru_maxrss``) in MiB.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings


def main() -> None:
    side, path = sys.argv[1], sys.argv[2]
    warnings.filterwarnings("ignore")
    import inference

    worker = inference.WORKERS[side]([path])
    worker.setup()
    image = worker.volumes.pop()
    start = time.perf_counter()
    out = worker.predict(image)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, "shape": list(image.shape), "seconds": seconds, "peak_rss_mib": peak,
                      "output_dtype": str(out.dtype)}))  # fmt: skip


if __name__ == "__main__":
    main()
