"""Predict with a trained run, write masks in the source images' geometry, and score them.

Example:
    python evaluation.py --run runs/hippocampus --data data/hippocampus --split test --output results/hippocampus

Writes masks/<id>.nii.gz (same shape, spacing, origin and direction as the source image), metrics.csv (one row per
case and class), summary.json (per-class statistics and the foreground mean) and dice_boxplot.png into --output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METRIC_NAMES = ("dice", "iou", "hd95", "assd", "nsd", "precision", "sensitivity", "volume_truth_ml", "volume_pred_ml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by train.py (runs/NAME)")
    parser.add_argument("--data", required=True, help="prepared dataset folder written by data_gen.py (data/NAME)")
    parser.add_argument("--split", default="test", help="train, val, test or all (default: test)")
    parser.add_argument("--output", required=True, help="results folder to write (results/NAME)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default: 0.5)")
    parser.add_argument(
        "--blend",
        choices=["gaussian", "constant"],
        default="gaussian",
        help="weighting of overlapping windows (default: gaussian)",
    )
    parser.add_argument("--tta", action="store_true", help="average over all mirrored copies of the input")
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=METRIC_NAMES,
        default=["dice", "iou", "hd95", "assd", "precision", "sensitivity", "volume_truth_ml", "volume_pred_ml"],
        help="metrics to compute (default: all but nsd)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        from utils.evaluate import evaluate

        summary = evaluate(
            args.run,
            args.data,
            args.output,
            split=args.split,
            overlap=args.overlap,
            blend=args.blend,
            tta=args.tta,
            metrics=args.metrics,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"evaluation.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"cases": summary["num_cases"], "foreground_mean": summary["foreground_mean"]}, indent=2))
    print(f"Masks, metrics.csv, summary.json and dice_boxplot.png are in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
