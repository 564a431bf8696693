"""Cost against size on full-size CT: every stage timed, and its peak memory taken, on the cases of ``scale.py``.

    python benchmarks/scale_measure.py --workdir /tmp/scale                  # sizes 64 128 256 512, then the epoch
    python benchmarks/scale_measure.py --workdir /tmp/scale --sizes 64 128 --no-epoch
    python benchmarks/scale_measure.py --workdir /tmp/scale --replot /tmp/scale/scale.json  # refit, redraw only
    python benchmarks/report.py --scale /tmp/scale/scale.json               # the tables of RESULTS.md

Per size ``N`` (cases of 512 x 512 x N made by ``scale.py`` from the real CTs of ``../shared/data``; two per size, one
to train and one to validate), each command in a fresh process under GNU ``time`` (seconds, and peak resident memory
of the process and the children it waited for):

- ``prepare``: ``data_gen.py`` on the two cases (``--workers 1``) against ``monai_preprocess.py`` (LoadImage,
  Orientation, Spacing to the spacing ``data_gen.py`` chose, normalisation, saving) on the same two; per case.
- ``train``: ``train.py`` for two epochs of 10 steps, the same network at every size (patch 64 x 128 x 128, depth 4:
  the plan of the smallest size; the default plan of a large dataset is the ``epoch`` measurement's); the second
  epoch's steps and the first epoch's end (validation and checkpoints, from ``state.json``) separately.
- ``evaluate``: ``evaluation.py --no-tta`` on the validation case: prediction with the run's model, mask written back
  on the source grid, scored (test-time mirroring, the default, multiplies the prediction's cost by 8 for 3D).
- ``inference``: the same U-Net on both sides (``infer_once.py --labels``: ours ``utils.inference.predict_labels``,
  MONAI ``sliding_window_inference`` and the arg-max, windows 40x56x40, overlap 0.5, 3 classes) on the prepared
  validation volume; ``--tiny`` swaps the U-Net for a 1x1x1 network (the sliding window's own memory).

``--stages`` measures some of the stages (``evaluate`` trains first); ``data_gen.py`` always runs, MONAI's
preprocessing only with ``prepare``. The fit and the plot leave out a stage that some size lacks.

Then ``epoch``: a dataset of four 512 x 512 x 200 cases trained with every default (100 steps per epoch, ``--validation
auto``) for two epochs, the share of an epoch that validation takes, and the validation mode ``auto`` chooses for a
hundred such cases (20 of them validation). The slope of log(cost) against log(voxels) of each stage is fitted and
``scale.png`` draws them. Cases are generated at run time into ``--workdir`` and deleted with it; nothing is
committed but the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scale
from common import REPO, bench_env, loadavg, machine

SIZES = scale.SIZES
STAGES = ("prepare", "train", "evaluate", "inference")
TRAIN_STEPS = 10
# The same network at every size (the plan the planner makes for 512 x 512 x 64), so that the slopes of training and
# evaluation compare like with like; the default plan of a large dataset is measured by the epoch (``measure_epoch``).
FIXED_PLAN = ["--patch-size", "64", "128", "128", "--model-args", '{"depth": 4}']
EPOCH_DEPTH, EPOCH_CASES, HUNDRED = 200, 4, 100


def timed(command: list[str], log_path: Path) -> tuple[float, float, float]:
    """Run ``command`` under GNU time; ``(seconds, CPU seconds, peak RSS in MiB)``. Raises ``RuntimeError`` naming
    the log."""
    measure = log_path.with_suffix(".time")
    with open(log_path, "w") as log:
        code = subprocess.call(
            ["/usr/bin/time", "-o", str(measure), "-f", "%e %U %S %M", *command], cwd=REPO, stdout=log, stderr=log,
            env=bench_env(),
        )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed (exit {code}); see {log_path}")
    seconds, user, system, kib = measure.read_text().split()[-4:]
    return float(seconds), float(user) + float(system), float(kib) / 1024


def per_case(seconds: float, cpu: float, peak: float, cases: int) -> dict:
    return {
        "seconds_per_case": round(seconds / cases, 2),
        "cpu_seconds_per_case": round(cpu / cases, 2),
        "peak_rss_mib": round(peak),
    }


def make_dataset(folder: Path, depth: int, count: int, sources) -> list[dict]:
    """``count`` generated cases of depth ``depth`` in an MSD folder; their ids, shapes and spacings. Only the lung1
    source is used, so that the cases of one size share their axial spacing and the spacing ``data_gen.py`` chooses
    keeps them near 512 x 512 x ``depth`` (TotalSegmentator's 90 mm stretched over the same slices would make the
    median spacing, and so the prepared shapes, a mix of the two)."""
    sources = [s for s in sources if s.name == "lung1"] or sources
    shutil.rmtree(folder, ignore_errors=True)
    cases = []
    for number in range(count):
        case = scale.make_case(depth, sources, seed=0, case=number)
        scale.write_case(folder, case)
        cases.append({"id": case.case_id, "shape": list(case.image.shape), "spacing": list(case.spacing)})
    scale.write_dataset_json(folder, [c["id"] for c in cases])
    return cases


def train_figures(run: Path) -> dict:
    """Steps and epoch end of a two-epoch run: seconds of the second epoch's steps, seconds of the first epoch's end
    (validation, checkpoints, curves), the validation mode and the plan."""
    state = json.loads((run / "state.json").read_text())
    config = json.loads((run / "config.json").read_text())
    with open(run / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    epoch_end = float(state["epoch_end_s"])
    second = float(rows[1]["time_s"]) - float(rows[0]["time_s"]) - epoch_end
    steps = int(rows[1]["steps"])
    return {
        "step_s": round(second / steps, 4),
        "steps": steps,
        "epoch_end_s": round(epoch_end, 2),
        "validation_share": round(epoch_end / (epoch_end + second), 3),
        "patch_size": config["patch_size"],
        "batch_size": config["batch_size"],
        "model": config["model"],
    }


def prepared_voxels(data: Path) -> dict:
    """Shapes of the prepared images of ``data`` by case id."""
    paths = (data / "volumes").glob("*_image.npy")
    return {p.name[: -len("_image.npy")]: list(np.load(p, mmap_mode="r").shape) for p in paths}


def measure_size(depth: int, workdir: Path, sources, logs: Path, stages=STAGES, tiny: bool = False) -> dict:
    """Every stage of ``stages`` at depth ``depth`` (``evaluate`` trains first even without ``train``); ``tiny``: the
    inference stage with ``infer_once.py --tiny``."""
    raw, data, run = workdir / f"raw_{depth}", workdir / f"prepared_{depth}", workdir / f"run_{depth}"
    cases = make_dataset(raw, depth, 2, sources)
    result = {"depth": depth, "cases": cases, "voxels_per_case": 512 * 512 * depth, "loadavg": [loadavg()[0]]}
    result["float32_case_mib"] = round(4 * 512 * 512 * depth / 2**20)
    shutil.rmtree(data, ignore_errors=True)
    seconds, cpu, peak = timed(
        [sys.executable, "data_gen.py", "--input", str(raw), "--output", str(data), "--workers", "1", "--split",
         "0.5", "0.5", "0"],
        logs / f"prepare_ours_{depth}.log",
    )  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    spacing = manifest["resolved"]["median_spacing"]  # (z, y, x) mm
    result["prepare"] = {"ours": per_case(seconds, cpu, peak, 2)}
    result["prepared_shapes"] = prepared_voxels(data)
    val_case = json.loads((data / "splits.json").read_text())["val"][0]
    result["val_voxels"] = int(np.prod(result["prepared_shapes"][val_case][:3]))
    if "prepare" in stages:
        peer_out = workdir / f"monai_{depth}"
        shutil.rmtree(peer_out, ignore_errors=True)
        zyx = [float(s) for s in spacing]
        seconds, cpu, peak = timed(
            [sys.executable, "benchmarks/monai_preprocess.py", "--input", str(raw), "--output", str(peer_out),
             "--workers", "0", "--spacing", *map(str, zyx[::-1])],
            logs / f"prepare_monai_{depth}.log",
        )  # fmt: skip
        shutil.rmtree(peer_out, ignore_errors=True)
        result["prepare"]["monai"] = per_case(seconds, cpu, peak, 2)

    if "train" in stages or "evaluate" in stages:
        shutil.rmtree(run, ignore_errors=True)
        seconds, cpu, peak = timed(
            [sys.executable, "train.py", "--data", str(data), "--output", str(run), "--epochs", "2",
             "--steps-per-epoch", str(TRAIN_STEPS), "--no-tensorboard", "--seed", "0", *FIXED_PLAN],
            logs / f"train_{depth}.log",
        )  # fmt: skip
        figures = {**train_figures(run), "process_seconds": round(seconds, 1), "process_cpu_seconds": round(cpu, 1)}
        result["train"] = {**figures, "peak_rss_mib": round(peak)}

    if "evaluate" in stages:
        results = workdir / f"results_{depth}"
        shutil.rmtree(results, ignore_errors=True)
        seconds, cpu, peak = timed(
            [sys.executable, "evaluation.py", "--run", str(run), "--data", str(data), "--split", "val", "--output",
             str(results), "--metrics", "dice", "--pictures", "none", "--quiet", "--no-tta"],
            logs / f"evaluate_{depth}.log",
        )  # fmt: skip
        result["evaluate"] = per_case(seconds, cpu, peak, 1)

    if "inference" in stages:
        result["inference"] = infer_both(data / "volumes" / f"{val_case}_image.npy", depth, logs, tiny)
    result["loadavg"].append(loadavg()[0])
    shutil.rmtree(raw, ignore_errors=True)
    return result


def infer_both(image: Path, depth: int, logs: Path, tiny: bool) -> dict:
    """``infer_once.py --labels`` (``--tiny``) of ``image`` by each side, in a fresh process each."""
    figures_by_side = {}
    for side in ("ours", "monai"):
        out = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "infer_once.py"), side, str(image), "--labels",
             *(["--tiny"] if tiny else [])], cwd=REPO / "benchmarks", env=bench_env(), capture_output=True, text=True,
        )  # fmt: skip
        (logs / f"inference_{side}_{depth}.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"infer_once.py {side} failed on {image}; see {logs}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        figures_by_side[side] = {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}
    return figures_by_side


def measure_epoch(workdir: Path, sources, logs: Path) -> dict:
    """Every default on four 512 x 512 x 200 cases (two train, two validation), two epochs; what ``auto`` would do
    with a hundred such cases."""
    raw, data, run = workdir / "raw_epoch", workdir / "prepared_epoch", workdir / "run_epoch"
    cases = make_dataset(raw, EPOCH_DEPTH, EPOCH_CASES, sources)
    shutil.rmtree(data, ignore_errors=True)
    timed([sys.executable, "data_gen.py", "--input", str(raw), "--output", str(data), "--workers", "1", "--split",
           "0.5", "0.5", "0"], logs / "prepare_epoch.log")  # fmt: skip
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    seconds, cpu, peak = timed(
        [sys.executable, "train.py", "--data", str(data), "--output", str(run), "--epochs", "2", "--no-tensorboard",
         "--seed", "0"],
        logs / "train_epoch.log",
    )  # fmt: skip
    figures = {**train_figures(run), "process_seconds": round(seconds, 1), "process_cpu_seconds": round(cpu, 1)}
    figures["peak_rss_mib"] = round(peak)
    figures["auto_for_hundred_cases"] = auto_mode(run, data)
    return {"depth": EPOCH_DEPTH, "cases": cases, **figures}


def auto_mode(run: Path, data: Path) -> str:
    """The mode ``--validation auto`` picks for 20 validation cases shaped like this dataset's (100 cases, 80/20)."""
    sys.path.insert(0, str(REPO))
    from utils.prepared import PreparedDataset
    from utils.runs import load_config
    from utils.train.callbacks import validation_mode

    dataset = PreparedDataset(data)
    val = dataset.split("val")
    return validation_mode(load_config(run), dataset, [val[i % len(val)] for i in range(HUNDRED // 5)])


def stage_costs(sizes: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """``{stage: (voxels, cost)}`` per size. Preparation is per raw case (512 x 512 x N voxels); evaluation and
    inference per prepared validation case (its voxels after resampling to the dataset's spacing). Costs are CPU
    seconds (all threads), which a busy machine changes far less than wall-clock seconds; the train step and the
    epoch end are wall-clock seconds, as training reports them."""
    raw = [s["voxels_per_case"] for s in sizes]
    prepared = [s.get("val_voxels") or int(np.prod(s["inference"]["ours"]["shape"][:3])) for s in sizes]
    stages = {
        "prepare (ours)": (raw, "prepare", "ours", "cpu_seconds_per_case"),
        "prepare (MONAI)": (raw, "prepare", "monai", "cpu_seconds_per_case"),
        "evaluate (ours)": (prepared, "evaluate", None, "cpu_seconds_per_case"),
        "inference (ours)": (prepared, "inference", "ours", "cpu_seconds"),
        "inference (MONAI)": (prepared, "inference", "monai", "cpu_seconds"),
        "train step (ours)": (raw, "train", None, "step_s"),
        "epoch end, validation (ours)": (raw, "train", None, "epoch_end_s"),
    }
    costs = {}
    for name, (voxels, stage, side, key) in stages.items():
        if all(side in s.get(stage, {}) if side else stage in s for s in sizes):  # a stage left out is not fitted
            costs[name] = (voxels, [(s[stage][side] if side else s[stage])[key] for s in sizes])
    return costs


def slopes(sizes: list[dict]) -> dict:
    """Least-squares slope of log(cost) against log(voxels) for each stage of :func:`stage_costs`."""
    if len(sizes) < 2:
        return {}
    fits = {name: np.polyfit(np.log(v), np.log(c), 1)[0] for name, (v, c) in stage_costs(sizes).items()}
    return {name: round(float(slope), 3) for name, slope in fits.items()}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, (voxels, costs) in stage_costs(sizes).items():
        axes[0].loglog(voxels, costs, "o-", label=f"{name} (slope {report['slopes'].get(name, '')})")
    voxels, costs = next(iter(stage_costs(sizes).values()))
    axes[0].loglog(voxels, [costs[0] * v / voxels[0] for v in voxels], "k:", label="slope 1")
    axes[0].set(xlabel="voxels per case", ylabel="seconds (CPU; train: wall)", title="cost per case")
    memory = {
        "prepare (ours)": ("prepare", "ours"),
        "prepare (MONAI)": ("prepare", "monai"),
        "inference (ours)": ("inference", "ours"),
        "inference (MONAI)": ("inference", "monai"),
    }
    raw = [s["voxels_per_case"] for s in sizes]
    for name, (stage, side) in memory.items():
        if all(side in s.get(stage, {}) for s in sizes):
            axes[1].loglog(raw, [s[stage][side]["peak_rss_mib"] for s in sizes], "o-", label=name)
    if all("evaluate" in s for s in sizes):
        axes[1].loglog(raw, [s["evaluate"]["peak_rss_mib"] for s in sizes], "o-", label="evaluate (ours)")
    axes[1].loglog(raw, [4 * s["float32_case_mib"] for s in sizes], "k:", label="4x the float32 case")
    axes[1].set(xlabel="voxels per raw case", ylabel="peak RSS (MiB)", title="peak memory")
    for axis in axes:
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"512 x 512 x N CT cases, {report['machine']['cpu']} ({report['machine'].get('cpu_kind', '')})")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="generated cases, runs and logs (deleted cases)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=list(SIZES),
        help="depths N (default: %(default)s; none: the epoch only)",
    )
    parser.add_argument("--no-epoch", action="store_true", help="skip the 512 x 512 x 200 epoch measurement")
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to measure per size (default: all)"
    )
    parser.add_argument("--tiny", action="store_true", help="the inference stage with a 1x1x1 network (its memory)")
    parser.add_argument("--json", type=Path, help="where to write the figures (default: WORKDIR/scale.json)")
    parser.add_argument("--plot", type=Path, help="where to draw the plot (default: WORKDIR/scale.png)")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only refit the slopes and redraw from a results file"
    )
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        report["slopes"] = slopes(report["sizes"])
        args.replot.write_text(json.dumps(report, indent=1))
        plot(report, args.plot or args.replot.with_suffix(".png"))
        print(json.dumps(report["slopes"], indent=1))
        return 0
    workdir = args.workdir.resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = args.json or workdir / "scale.json"
    sources = scale.load_sources()
    report = {"machine": machine(), "sizes": [], "slopes": {}, "started": time.strftime("%Y-%m-%d %H:%M")}
    for depth in args.sizes:
        begin = time.perf_counter()
        try:
            report["sizes"].append(measure_size(depth, workdir, sources, logs, args.stages, args.tiny))
        except (RuntimeError, OSError, ValueError) as error:  # keep the sizes already measured
            print(f"error at 512x512x{depth}: {error}", file=sys.stderr)
            report.setdefault("errors", []).append(f"{depth}: {error}")
        print(f"512x512x{depth}: {time.perf_counter() - begin:.0f} s", flush=True)
        report["slopes"] = slopes(report["sizes"])
        out.write_text(json.dumps(report, indent=1))
    if not args.no_epoch:
        try:
            report["epoch"] = measure_epoch(workdir, sources, logs)
        except (RuntimeError, OSError, ValueError) as error:
            print(f"error in the epoch measurement: {error}", file=sys.stderr)
            report.setdefault("errors", []).append(f"epoch: {error}")
        out.write_text(json.dumps(report, indent=1))
    if len(report["sizes"]) >= 2:
        plot(report, args.plot or workdir / "scale.png")
    print(json.dumps(report["slopes"], indent=1))
    print(f"figures in {out}")
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
