"""Markdown tables of a ``run_all.py`` results file, for RESULTS.md: ``python benchmarks/report.py results_full.json``.

Every number printed comes from the JSON file; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import verdict


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def loads(values) -> str:
    return "–".join(f"{v:.1f}" for v in (min(values), max(values))) if values else ""


def machine(report: dict) -> str:
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    rows = [
        ["date", m["date"]],
        ["mode", f"{report['mode']} ({report.get('total_seconds', 0) / 60:.0f} min in all)"],
        ["CPU", f"{m['cpu']}, nproc {m['nproc']}"],
        ["CPU kind", kind(m)],
        ["instruction sets", ", ".join(name for name, present in m.get("isa", {}).items() if present)],
        ["memory", f"{m['memory_gib']} GiB"],
        ["system", f"{m['os']}, Python {m['python']}"],
        ["versions", versions],
        ["GPU", report.get("gpu_note", "")],
    ]
    return table(["", ""], rows)


def kind(m: dict) -> str:
    """The CPU kind the figures stand for: the CPU's own, or what ``ONEDNN_MAX_CPU_ISA`` capped oneDNN to."""
    cap = m.get("ONEDNN_MAX_CPU_ISA")
    return f"{cap.lower()} (oneDNN capped on an {m.get('cpu_kind')} CPU)" if cap else str(m.get("cpu_kind", "?"))


def by_kind(reports: list[dict]) -> str:
    """One row per results file (a CPU kind): each benchmark's ratio and whether it meets its target."""
    names = ["train_step", "data_pipeline", "inference", "preprocessing", "quality"]
    rows = []
    for report in reports:
        m, cells = report["machine"], []
        for name in names:
            result = report["benchmarks"].get(name, {})
            if "ratio" not in result:
                cells.append(result.get("error", "–")[:40] if result else "–")
                continue
            met, _ = verdict(name, result)
            figure = f"{result['ratio']:.2f}"
            if name == "inference":
                figure = " / ".join(f"{v['ratio']:.2f}" for v in result["by_volume"].values())
            if name == "quality":
                figure = f"{result['ours']['heldout_dice']:.3f} vs {result['monai']['heldout_dice']:.3f}"
            cells.append(f"{figure} {'met' if met else '**not met**'}")
        load = [v for r in report["benchmarks"].values() for v in (r.get("loadavg_before", [0])[0],)]
        rows.append([kind(m), m["cpu"], report["mode"], *cells, loads(load)])
    header = ["CPU kind", "CPU", "mode", *names, "load avg"]
    return table(header, rows)


def scale(report: dict) -> str:
    """The scale benchmark (``scale_measure.py``): per size, each stage's seconds and peak memory, then the slopes."""
    rows = []
    for s in report["sizes"]:
        prepare, infer, train, evaluate = (s.get(k, {}) for k in ("prepare", "inference", "train", "evaluate"))

        def pair(stage: dict, key: str, form: str) -> str:
            sides = [stage.get(side, {}).get(key) for side in ("ours", "monai")]
            return " / ".join("–" if v is None else format(v, form) for v in sides)

        rows.append(
            [f"512x512x{s['depth']}", f"{s['voxels_per_case'] / 1e6:.0f}M", s["float32_case_mib"],
             pair(prepare, "cpu_seconds_per_case", ".1f"), pair(prepare, "peak_rss_mib", ".0f"),
             f"{train['step_s'] * 1000:.0f}" if train else "–", f"{train['epoch_end_s']:.1f}" if train else "–",
             f"{evaluate['cpu_seconds_per_case']:.1f}" if evaluate else "–", evaluate.get("peak_rss_mib", "–"),
             pair(infer, "cpu_seconds", ".1f"), pair(infer, "peak_rss_mib", ".0f"), loads(s["loadavg"])]
        )  # fmt: skip
    header = ["case", "voxels", "float32 MiB", "prepare CPU s (ours / MONAI)", "prepare peak MiB", "train step ms",
              "epoch end s", "evaluate CPU s", "evaluate peak MiB", "inference CPU s (ours / MONAI)",
              "inference peak MiB", "load avg"]  # fmt: skip
    parts = [table(header, rows)]
    parts.append(
        table(["stage", "slope of log(CPU seconds) on log(voxels)"], [[k, v] for k, v in report["slopes"].items()])
    )
    if "epoch" in report:
        e = report["epoch"]
        plan = f"{e['model']} patch {'x'.join(map(str, e['patch_size']))} batch {e['batch_size']}"
        header = ["dataset", "plan", "step ms", "steps", "epoch end s", "validation share", "auto for 100 cases"]
        row = [f"{len(e['cases'])} x 512x512x{e['depth']}", plan, f"{e['step_s'] * 1000:.0f}", e["steps"],
               e["epoch_end_s"], f"{e['validation_share']:.1%}", e["auto_for_hundred_cases"]]  # fmt: skip
        parts.append(table(header, [row]))
    return "\n\n".join(parts) + "\n"


def summary(report: dict) -> str:
    rows = []
    for name, result in report["benchmarks"].items():
        if "ratio" not in result:
            rows.append([name, "error", result.get("error", ""), "", "", "", ""])
            continue
        met, words = verdict(name, result)
        met = "met" if met else "**not met**"
        load = loads([result["loadavg_before"][0], result["loadavg_after"][0]])
        best = f"{result['ratio_best']:.2f}" if "ratio_best" in result else "–"
        rows.append(
            [f"`{name}`", f"{result['ratio']:.2f}", best, words, met, load,
             f"{result['seconds'] / 60:.1f}"]
        )  # fmt: skip
    header = ["benchmark", "ratio (medians)", "ratio (best reps)", "target", "", "load avg (1 min)", "minutes"]
    return table(header, rows)


def train_step(result: dict) -> str:
    rows = []
    for norm, figures in result["by_norm"].items():
        for side, f in figures.items():
            if isinstance(f, dict):
                rows.append(
                    [norm, side, f["step_ms"], f["best_step_ms"], f"{f['samples_per_s']:.2f}",
                     f"{f['trainable_parameters']:,}", loads(f["loadavg"])]
                )  # fmt: skip
        ratio = f"**{figures['ratio']:.2f}** (best steps {figures['ratio_best']:.2f})"
        rows.append([norm, "**ratio** Keras-TF / faster PyTorch", "", "", ratio, "", ""])
    header = ["norm", "side", "step ms (median)", "step ms (best)", "samples/s", "parameters", "load avg"]
    return table(header, rows)


def data_pipeline(result: dict) -> str:
    rows = []
    for workers, figures in result["by_workers"].items():
        for side, f in figures.items():
            if isinstance(f, dict):
                rows.append(
                    [workers.split("_")[1], side, f"{f['batches_per_s']:.1f}",
                     f"{f['range'][0]:.1f}–{f['range'][1]:.1f}", loads(f["loadavg"])]
                )  # fmt: skip
        ratio = f"**{figures['ratio']:.2f}** (best reps {figures['ratio_best']:.2f})"
        rows.append([workers.split("_")[1], "**ratio** ours / MONAI", ratio, "", ""])
    return table(["workers", "side", "batches/s (median)", "range", "load avg"], rows)


def inference(result: dict) -> str:
    rows = []
    for volumes, figures in result["by_volume"].items():
        for side, f in figures.items():
            if isinstance(f, dict):
                shapes = {tuple(v[:3]) for v in f["volumes"]}
                shape = "x".join(map(str, next(iter(shapes)))) if len(shapes) == 1 else f"{len(f['volumes'])} volumes"
                rows.append(
                    [volumes, side, f"{f['seconds_per_volume']:.3f}", f"{f['range'][0]:.3f}–{f['range'][1]:.3f}",
                     shape, loads(f["loadavg"])]
                )  # fmt: skip
        ratio = f"**{figures['ratio']:.2f}** (best reps {figures['ratio_best']:.2f})"
        rows.append([volumes, "**ratio** MONAI s / ours s", ratio, "", "", ""])
    return table(["volumes", "side", "s/volume (median)", "range", "shape", "load avg"], rows)


def preprocessing(result: dict) -> str:
    rows = []
    for side in ("ours", "monai"):
        f = result[side]
        rows.append(
            [side, f"{f['seconds']:.2f}", f"{f['range'][0]:.2f}–{f['range'][1]:.2f}", f["cases_per_s"],
             loads(f["loadavg"])]
        )  # fmt: skip
    rows.append(["**ratio** MONAI s / ours s", f"**{result['ratio']:.2f}**", "", "", ""])
    return table(["side", "seconds for 200 cases (median)", "range", "cases/s", "load avg"], rows)


def quality(result: dict) -> str:
    rows = []
    for side in ("ours", "monai"):
        f = result[side]
        per_class = ", ".join(f"{v:.3f}" for v in f["heldout_per_class"].values())
        rows.append(
            [side, f"{f['heldout_dice']:.4f}", per_class, f"{f['best_val_dice']:.4f}", f["epochs"], f["steps"],
             f["train_seconds"], "x".join(map(str, f["patch"])), loads(f["loadavg"])]
        )  # fmt: skip
    if "heldout_dice_no_tta" in result["ours"]:
        no_tta = result["ours"]["heldout_dice_no_tta"]
        rows.append(["ours, `--no-tta`", f"{no_tta:.4f}", "", "", "", "", "", "", ""])
    rows.append(["**ratio** ours / MONAI", f"**{result['ratio']:.3f}**", "", "", "", "", "", "", ""])
    header = ["side", "held-out dice", "per class (1, 2)", "best val dice", "epochs", "steps", "train s", "patch",
              "load avg"]  # fmt: skip
    return table(header, rows)


def render(report: dict) -> str:
    parts = ["### Machine", machine(report), "### Ratios", summary(report)]
    for name, function in (
        ("train_step", train_step),
        ("data_pipeline", data_pipeline),
        ("inference", inference),
        ("preprocessing", preprocessing),
        ("quality", quality),
    ):
        result = report["benchmarks"].get(name)
        if result and "ratio" in result:
            parts += [f"### `{name}`", function(result)]
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> None:
    """``report.py RESULTS.json`` (one run, every table), ``report.py --kinds A.json B.json ...`` (one row per CPU
    kind) or ``report.py --scale scale.json``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "--kinds":
        print(by_kind([json.loads(Path(path).read_text()) for path in argv[1:]]))
    elif argv[0] == "--scale":
        print(scale(json.loads(Path(argv[1]).read_text())))
    else:
        print(render(json.loads(Path(argv[0]).read_text())))


if __name__ == "__main__":
    main()
