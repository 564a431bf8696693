"""Train a segmentation model on a prepared dataset (written by data_gen.py).

Example:
    python train.py --data data/hippocampus --output runs/hippocampus --model unet3d --time-limit 10

Writes config.json, model.keras (best validation dice), last.keras (resumable), history.csv, curves.png and
model_summary.txt into --output. Settings may also come from --config FILE (YAML or JSON); flags win.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared dataset folder (data/NAME)")
    parser.add_argument("--output", help="run folder to write (runs/NAME)")
    parser.add_argument("--config", help="YAML or JSON file with any of these settings (flags win)")
    parser.add_argument("--model", help="architecture name, e.g. unet3d, unet2d (default: unet3d)")
    parser.add_argument("--model-args", type=json.loads, help="architecture options as JSON, e.g. '{\"filters\": 32}'")
    parser.add_argument(
        "--loss", help="dice, gdl, dice_ce, gdl_ce, ce, weighted_ce, tversky, focal, dice_focal (default: dice_ce)"
    )
    parser.add_argument("--loss-args", type=json.loads, help="loss options as JSON, e.g. '{\"batch\": true}'")
    parser.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        help="D H W for 3D, H W for 2D (default: planned from the dataset's median shape)",
    )
    parser.add_argument("--batch-size", type=int, help="samples per step (default: planned from the patch size)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (default: 1000; --time-limit usually ends first)")
    parser.add_argument("--steps-per-epoch", type=int, help="batches per epoch (default: 100)")
    parser.add_argument("--lr", type=float, help="initial learning rate (default: 3e-3)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], help="adam, or sgd with Nesterov momentum 0.99")
    parser.add_argument(
        "--schedule",
        choices=["poly", "cosine", "none"],
        help="learning-rate decay over the epochs or the time limit, whichever ends first (default: poly)",
    )
    parser.add_argument("--augment", choices=["none", "default", "strong"], help="augmentation preset")
    parser.add_argument("--foreground-ratio", type=float, help="share of patches centred on foreground (0.33)")
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="stop after the last whole epoch that fits in this many minutes",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --output where it stopped")
    parser.add_argument("--mixed-precision", action="store_true", default=None, help="train in mixed_float16")
    parser.add_argument("--seed", type=int, help="random seed (default: 0)")
    return parser


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON settings file with a safe loader; keys use underscores or dashes."""
    import yaml

    from utils.fileio import read_json

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: config file not found")
    if file.suffix.lower() == ".json":
        data = read_json(file)
    else:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{file}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        settings = load_config_file(args.config) if args.config else {}
        flags = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
        settings.update(flags)
        for key in ("data", "output"):
            if not settings.get(key):
                raise ValueError(f"--{key} is required (as a flag or in the config file)")
        from utils.training import train

        config = train(settings)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    print(f"Best validation mean foreground dice: {config['best_val_dice']:.4f}")
    print(f"Run written to {config['output']}: model.keras, last.keras, config.json, history.csv, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
