"""Preprocessing: the 200 Hippocampus cases from raw NIfTI to normalised arrays on disk, ``data_gen.py`` vs MONAI.

Ours: ``python data_gen.py --input msd_hippocampus --output NEW --workers 2`` (fingerprint pass, reorientation to RAS,
resampling to the median spacing, z-score, ``.npy`` volumes, manifest, fingerprint and splits). MONAI:
``monai_preprocess.py`` (``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``,
``NormalizeIntensityd``, ``SaveImaged`` as ``.nii``) with a ``DataLoader`` of 2 worker processes. Each repetition is a
fresh command in a fresh output folder, timed from start to exit (interpreter start and imports included, as a user
waits for them); ours and MONAI alternate.
"""

from __future__ import annotations

import shutil
import sys

from common import BENCH_DIR, HIPPOCAMPUS, loadavg, run_script, summarize


def run(quick: bool, log_dir, workdir, workers: int = 2) -> dict:
    reps = 2 if quick else 5
    commands = {
        "ours": lambda out: [sys.executable, "data_gen.py", "--input", str(HIPPOCAMPUS), "--output", str(out),
                             "--workers", str(workers)],
        "monai": lambda out: [sys.executable, str(BENCH_DIR / "monai_preprocess.py"), "--input", str(HIPPOCAMPUS),
                              "--output", str(out), "--workers", str(workers)],
    }  # fmt: skip
    seconds = {label: [] for label in commands}
    loads = {label: [] for label in commands}
    for rep in range(reps):
        order = list(commands) if rep % 2 == 0 else list(commands)[::-1]
        for label in order:
            out = workdir / "preprocessing" / label
            shutil.rmtree(out, ignore_errors=True)
            seconds[label].append(run_script(commands[label](out), log_dir / f"preprocessing.{label}.log"))
            loads[label].append(loadavg()[0])
            shutil.rmtree(out, ignore_errors=True)
    figures = {}
    for label in commands:
        stats = summarize(seconds[label])
        figures[label] = {
            "seconds": round(stats["median"], 2),
            "range": [round(stats["min"], 2), round(stats["max"], 2)],
            "cases_per_s": round(200 / stats["median"], 1),
            "loadavg": loads[label],
            "workers": workers,
        }
    ratio = figures["monai"]["seconds"] / figures["ours"]["seconds"]
    best = figures["monai"]["range"][0] / figures["ours"]["range"][0]
    return {"ratio": round(ratio, 3), "ratio_best": round(best, 3), "cases": 200, **figures}
