"""Run every benchmark against the peers and print one ``ratio <name> <value>`` line each (ours / MONAI, higher means
we are better).

    python benchmarks/run_all.py            # the full run behind RESULTS.md (about an hour on 2 cores)
    python benchmarks/run_all.py --quick    # fewer repetitions, smaller inputs, 1.5-minute training budgets
    python benchmarks/run_all.py --only train_step inference

Needs the optional dependencies of ``benchmarks/requirements.txt`` (PyTorch CPU and MONAI) and the shared data
(``../shared/data/msd_hippocampus``, ``../shared/data/pyradiomics/lung1_image.nrrd``). Each measurement runs its sides
in separate processes, alternating repetitions so that background load falls on both alike, and records the 1-minute
load average beside every figure. Besides ``ratio`` (from medians) each speed benchmark prints ``ratio_best`` (from
the best repetition of each side), which is less sensitive to other processes on a shared machine. Everything
measured goes to a JSON file (``--json``), from which RESULTS.md is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common

BENCHMARKS = ("train_step", "data_pipeline", "inference", "preprocessing", "quality")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (under 15 minutes on 2 cores)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=common.default_workdir(),
        help="prepared data, runs and logs (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="where to write every figure (default: WORKDIR/results_MODE.json)")
    return parser


def run_one(name: str, quick: bool, workdir: Path, log_dir: Path) -> dict:
    import data_pipeline
    import inference
    import preprocessing
    import quality
    import train_step

    if name == "train_step":
        return train_step.run(quick, log_dir)
    if name == "preprocessing":
        return preprocessing.run(quick, log_dir, workdir)
    if name == "quality":
        return quality.run(quick, log_dir, workdir)
    data = str(common.prepared_hippocampus(workdir, log_dir))
    if name == "data_pipeline":
        return data_pipeline.run(quick, log_dir, data)
    return inference.run(quick, log_dir, data, workdir)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    mode = "quick" if args.quick else "full"
    workdir = args.workdir.resolve()
    log_dir = workdir / "logs"
    out_path = args.json or workdir / f"results_{mode}.json"
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    started = time.perf_counter()
    report = {"mode": mode, "machine": common.machine(), "gpu": None, "benchmarks": {}}
    report["gpu_note"] = "no GPU was lent to this task; GPU figures are left empty"
    cpu, cores = report["machine"]["cpu"], report["machine"]["nproc"]
    print(f"benchmarks ({mode}) on {cpu}, {cores} cores; load average {common.loadavg()}", flush=True)
    failed = []
    for name in names:
        begin, load_before = time.perf_counter(), common.loadavg()
        try:
            result = run_one(name, args.quick, workdir, log_dir)
        except Exception as error:  # one failing benchmark must not lose the others' figures
            failed.append(name)
            result = {"error": f"{type(error).__name__}: {error}"}
            print(f"error {name} {result['error']}", file=sys.stderr)
        result.update(seconds=round(time.perf_counter() - begin, 1), loadavg_before=load_before)
        result["loadavg_after"] = common.loadavg()
        report["benchmarks"][name] = result
        report["total_seconds"] = round(time.perf_counter() - started, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1))
        if "ratio" in result:
            print(f"ratio {name} {result['ratio']:.3f}", flush=True)
            if "ratio_best" in result:
                print(f"ratio_best {name} {result['ratio_best']:.3f}", flush=True)
    print(f"total {report['total_seconds'] / 60:.1f} min; figures in {out_path}; logs in {log_dir}")
    for name in names:
        result = report["benchmarks"][name]
        if "ratio" in result:
            met, words = common.verdict(name, result)
            print(f"target {name} {words}: {'met' if met else 'NOT met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
