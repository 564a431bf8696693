"""Quality at a fixed budget: held-out mean foreground dice on MSD Hippocampus after the same minutes of training.

A seeded draw splits the 200 cases into 140 for training and validation and 60 held out. Ours is what a user types:
``data_gen.py`` on the 140 (its default split: 112 train, 28 val), ``train.py --model unet3d --time-limit M`` with
every other setting at its default (the training recipe), then ``evaluation.py --input HELD_OUT`` with its defaults
(the raw held-out cases prepared with the run's settings, predicted with test-time mirroring, written back on their
source grid and scored there); for the record also with ``--no-tta``. MONAI is the user's recipe of
``monai_quality.py`` on the same 112/28 cases and the same held-out 60. The two run one after the other, each with
the whole machine, and each cuts its training at a step so that it ends, validation included, within the same
budget; both training times are printed and stored (``train_seconds``). The figure is the mean over held-out cases
of each case's mean dice over the two hippocampus classes.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections import defaultdict

import numpy as np
from common import BENCH_DIR, HIPPOCAMPUS, hippocampus_ids, loadavg, msd_subset, run_script

HELD_OUT = 60
SEED = 2024


def selection() -> tuple[list[str], list[str]]:
    """``(development, held_out)`` case ids: a seeded draw of 60 held-out cases, the other 140 for development."""
    ids = hippocampus_ids()
    order = np.random.default_rng(SEED).permutation(len(ids))
    held_out = sorted(ids[i] for i in order[:HELD_OUT])
    return sorted(set(ids) - set(held_out)), held_out


def case_mean_dice(metrics_csv) -> tuple[float, dict, int]:
    """Mean over cases of the per-case mean foreground dice in ``metrics.csv``; per-class means; case count."""
    per_case, per_class = defaultdict(list), defaultdict(list)
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row["label"].isdigit() or row["dice"] in ("", "nan"):
                continue
            per_case[row["case"]].append(float(row["dice"]))
            per_class[row["label"]].append(float(row["dice"]))
    means = [float(np.mean(v)) for v in per_case.values()]
    return float(np.mean(means)), {k: float(np.mean(v)) for k, v in per_class.items()}, len(means)


def run_ours(minutes: float, workdir, log_dir, data, held_out_raw) -> dict:
    run_dir, results = workdir / "runs" / "quality_ours", workdir / "results" / "quality_ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(results, ignore_errors=True)
    load_before = loadavg()
    train_seconds = run_script(
        [sys.executable, "train.py", "--data", str(data), "--output", str(run_dir), "--model", "unet3d",
         "--time-limit", str(minutes), "--seed", "0"],
        log_dir / "quality.ours_train.log",
    )  # fmt: skip
    load_after = loadavg()
    eval_seconds = run_script(
        [sys.executable, "evaluation.py", "--run", str(run_dir), "--input", str(held_out_raw), "--output",
         str(results), "--metrics", "dice", "--pictures", "none", "--quiet"],
        log_dir / "quality.ours_evaluation.log",
    )  # fmt: skip
    dice, per_class, cases = case_mean_dice(results / "metrics.csv")
    plain = workdir / "results" / "quality_ours_no_tta"
    shutil.rmtree(plain, ignore_errors=True)
    run_script(
        [sys.executable, "evaluation.py", "--run", str(run_dir), "--input", str(held_out_raw), "--output",
         str(plain), "--metrics", "dice", "--pictures", "none", "--quiet", "--no-tta"],
        log_dir / "quality.ours_evaluation_no_tta.log",
    )  # fmt: skip
    config = json.loads((run_dir / "config.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    return {
        "heldout_dice": round(dice, 4),
        "heldout_per_class": {k: round(v, 4) for k, v in per_class.items()},
        "heldout_cases": cases,
        "heldout_dice_no_tta": round(case_mean_dice(plain / "metrics.csv")[0], 4),
        "summary_foreground_mean": json.loads((results / "summary.json").read_text())["foreground_mean"]["dice"],
        "best_val_dice": round(float(state["best"]), 4),
        "best_epoch": int(state["best_epoch"]) + 1,
        "epochs": int(state["epoch"]),
        "steps": int(state["epoch"]) * int(config["steps_per_epoch"]),
        "patch": config["patch_size"],
        "batch_size": config["batch_size"],
        "model_args": config["model_args"],
        "train_process_seconds": round(train_seconds, 1),
        "train_seconds": round(float(state["elapsed_s"]), 1),
        "evaluation_seconds": round(eval_seconds, 1),
        "loadavg": [load_before[0], load_after[0]],
    }


def run_monai(minutes: float, workdir, log_dir, dev_raw, splits, held_out_raw) -> dict:
    out = workdir / "runs" / "quality_monai"
    shutil.rmtree(out, ignore_errors=True)
    load_before = loadavg()
    seconds = run_script(
        [sys.executable, str(BENCH_DIR / "monai_quality.py"), "--dev", str(dev_raw), "--splits", str(splits),
         "--heldout", str(held_out_raw), "--minutes", str(minutes), "--output", str(out)],
        log_dir / "quality.monai.log",
    )  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    return {
        "heldout_dice": round(result["heldout_dice"], 4),
        "heldout_per_class": {k: round(v, 4) for k, v in result["heldout_per_class"].items()},
        "heldout_cases": result["heldout_cases"],
        "best_val_dice": round(result["best_val_dice"], 4),
        "epochs": result["epochs"],
        "steps": result["steps"],
        "patch": result["patch"],
        "batch_size": 4,
        "parameters": result["parameters"],
        "train_seconds": round(result["train_seconds"], 1),
        "process_seconds": round(seconds, 1),
        "loadavg": [load_before[0], loadavg()[0]],
    }


def run(quick: bool, log_dir, workdir) -> dict:
    minutes = 1.5 if quick else 10.0
    development, held_out = selection()
    dev_raw = msd_subset(HIPPOCAMPUS, development, workdir / "raw" / "hippocampus_dev")
    held_out_raw = msd_subset(HIPPOCAMPUS, held_out, workdir / "raw" / "hippocampus_heldout")
    data = workdir / "prepared" / "hippocampus_dev"
    shutil.rmtree(data, ignore_errors=True)
    run_script(
        [sys.executable, "data_gen.py", "--input", str(dev_raw), "--output", str(data), "--workers", "2"],
        log_dir / "quality.prepare.log",
    )
    ours = run_ours(minutes, workdir, log_dir, data, held_out_raw)
    monai = run_monai(minutes, workdir, log_dir, dev_raw, data / "splits.json", held_out_raw)
    times = {"ours": ours["train_seconds"], "monai": monai["train_seconds"]}
    print(
        f"quality: held-out dice ours {ours['heldout_dice']:.4f} after {times['ours']:.0f} s of training, MONAI "
        f"{monai['heldout_dice']:.4f} after {times['monai']:.0f} s (budget {minutes * 60:.0f} s each)",
        flush=True,
    )
    return {
        "ratio": round(ours["heldout_dice"] / monai["heldout_dice"], 3),
        "margin": round(ours["heldout_dice"] - monai["heldout_dice"], 4),
        "train_seconds": times,
        "minutes": minutes,
        "cases": {"development": len(development), "held_out": len(held_out), "seed": SEED},
        "ours": ours,
        "monai": monai,
    }
