"""Train a segmentation model on a prepared dataset (written by data_gen.py).

Example:
    python train.py --data data/hippocampus --output runs/hippocampus --model unet3d --time-limit 10
    python train.py --data data/hippocampus_cv --output runs/hippocampus_cv --fold 0   (data_gen.py --folds 5)

Writes config.json (every resolved setting and the plan), model.keras (best validation dice), last.keras and
state.json (to --resume), history.csv, curves.png, model_summary.txt and tensorboard/ into --output.
Settings may also come from --config FILE (YAML or JSON, the keys below with underscores); flags win.
Without --patch-size / --batch-size, both and the network depth are planned from fingerprint.json and
--memory-budget. Several GPUs: --strategy mirrored; several hosts: --strategy multiworker with TF_CONFIG set on each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.device import enable_onednn  # noqa: E402  (before anything imports TensorFlow)

enable_onednn()


# Flags by group, in --help order; each takes its type, choices, default and help from utils.settings.TRAINING.
FLAG_GROUPS = {
    "model and loss": (
        "model",
        "model_args",
        "backbone",
        "encoder_weights",
        "freeze_encoder_epochs",
        "loss",
        "loss_args",
    ),
    "data and sampling": (
        "source",
        "patch_size",
        "batch_size",
        "memory_budget",
        "foreground_ratio",
        "pad_placement",
        "augment",
        "augmentation",
        "workers",
        "worker_mode",
    ),
    "optimisation": (
        "epochs",
        "steps_per_epoch",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "schedule",
        "poly_exponent",
        "warmup_epochs",
        "plateau_patience",
        "plateau_factor",
        "min_lr",
        "grad_clip",
        "lr_scaling",
        "mixed_precision",
    ),
    "stopping, validation and logs": (
        "time_limit",
        "early_stopping",
        "validation",
        "val_overlap",
        "metrics",
        "tensorboard",
        "tensorboard_images",
    ),
    "several devices": ("strategy",),
}


def build_parser() -> argparse.ArgumentParser:
    from utils.cli import add_setting
    from utils.console import add_script_flags
    from utils.settings import TRAINING

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_script_flags(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--data", help="prepared dataset folder (data/NAME, written by data_gen.py)")
    run.add_argument("--output", help="run folder to write (runs/NAME)")
    run.add_argument("--config", help="YAML or JSON file with any of these settings (flags win)")
    run.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --output from its last complete epoch, with its saved settings (only --epochs, "
        "--time-limit, --early-stopping, --workers, --worker-mode may change)",
    )
    add_setting(run, "seed", TRAINING["seed"], with_default=False)
    add_setting(run, "fold", TRAINING["fold"], with_default=False)
    add_setting(run, "deterministic", TRAINING["deterministic"], with_default=False)
    for title, keys in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        for key in keys:
            add_setting(group, key, TRAINING[key], with_default=False)
    return parser


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON settings file with a safe loader; keys use underscores or dashes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid YAML/JSON, or not a mapping.
    """
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
    from utils.console import start

    args = build_parser().parse_args(argv)
    verbose = vars(args).pop("verbose")
    start(verbose)
    try:
        settings = load_config_file(args.config) if args.config else {}
        if args.config:
            from utils.train.config import check_settings

            try:
                check_settings(settings)
            except ValueError as error:
                raise ValueError(f"{args.config}: {error}") from error
        flags = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
        settings.update(flags)
        for key in ("data", "output"):
            if not settings.get(key):
                raise ValueError(f"--{key} is required (as a flag or in the config file)")
        from utils.fileio import command_line
        from utils.train.loop import train

        config = train(settings, command_line("train.py", argv))
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    print(f"Best validation mean foreground dice: {config.best_val_dice:.4f} ({config.epochs_done} epochs)")
    print(f"Run written to {config.output}: model.keras, last.keras, config.json, history.csv, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
