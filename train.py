"""Train a segmentation model on a prepared dataset (written by data_gen.py).

Example:
    python train.py --data data/hippocampus --output runs/hippocampus --model unet3d --time-limit 10

Writes config.json (every resolved setting and the plan), model.keras (best validation dice), last.keras and
state.json (to --resume), history.csv, curves.png, model_summary.txt and tensorboard/ into --output.
Settings may also come from --config FILE (YAML or JSON, the keys below with underscores); flags win.
Without --patch-size / --batch-size, both and the network depth are planned from fingerprint.json and
--memory-budget. Several GPUs: --strategy mirrored; several hosts: --strategy multiworker with TF_CONFIG set on each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _json(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({error})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    run.add_argument("--seed", type=int, help="seed of weights, batches and augmentation (default: 0)")
    run.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic kernels: the same seed gives the same weights (slower)",
    )

    net = parser.add_argument_group("model and loss")
    net.add_argument(
        "--model",
        help="architecture: unet3d (default), unet2d, resunet2d/3d, attention_unet2d/3d, "
        "dilated2d/3d, fcn2d/3d, twopath2d",
    )
    net.add_argument(
        "--model-args",
        type=_json,
        help='architecture options as JSON, e.g. \'{"filters": 32, "deep_supervision": true}\' '
        "(unet default: filters 16, instance norm, stem_stride 2; depth planned)",
    )
    net.add_argument("--loss", help="dice, gdl, dice_ce (default), gdl_ce, ce, weighted_ce, tversky, focal, dice_focal")
    net.add_argument("--loss-args", type=_json, help="loss options as JSON, e.g. '{\"batch\": true}'")

    data = parser.add_argument_group("data and sampling")
    data.add_argument(
        "--source",
        choices=["volumes", "slices", "patches"],
        help="train from volumes/ (default) or from the slices/ or patches/ stacks of data_gen.py --export",
    )
    data.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        metavar="N",
        help="D H W for 3D, H W for 2D (default: planned from the median shape and --memory-budget)",
    )
    data.add_argument("--batch-size", type=int, help="samples per step per device (default: planned)")
    data.add_argument(
        "--memory-budget",
        type=float,
        metavar="GB",
        help="memory of one device the plan may use, in GiB (default: 8)",
    )
    data.add_argument(
        "--foreground-ratio",
        type=float,
        help="expected share of samples placed on a foreground voxel, a class drawn uniformly among those present "
        "(default: 0.33)",
    )
    data.add_argument(
        "--pad-placement",
        choices=["centre", "random"],
        help="where a case smaller than the patch sits in it: centred (default), or at a random offset (a shift)",
    )
    data.add_argument(
        "--augment",
        choices=["none", "default", "strong"],
        help="augmentation preset: none; default (mirroring on every axis); strong (nnU-Net's rotation, scaling, "
        "elastic, noise, blur, brightness, contrast, low resolution, gamma, 90-degree turns, mirroring). Tune any "
        "transform with --augmentation or 'augmentation' in --config (default: default)",
    )
    data.add_argument(
        "--augmentation",
        type=_json,
        help="per-transform options as JSON, added to the preset, e.g. "
        '\'{"rotation": {"p": 0.3, "angle": [-15, 15]}}\'; transforms: rotation, scale, elastic, noise, blur, '
        "brightness, contrast, lowres, gamma, rot90, flip "
        "(options and defaults: utils/augment.py)",
    )
    data.add_argument(
        "--workers",
        type=int,
        help="parallel batch builders (Keras PyDataset workers; tf.data threads under --strategy) (default: 1, built "
        "in the training loop); batches stay the same for any number of workers",
    )
    data.add_argument("--worker-mode", choices=["thread", "process"], help="workers as threads (default) or processes")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help="maximum epochs (default: 1000; --time-limit usually ends first)")
    opt.add_argument("--steps-per-epoch", type=int, help="steps per epoch (default: 100)")
    opt.add_argument("--optimizer", choices=["adam", "sgd"], help="adam (default), or sgd with Nesterov momentum")
    opt.add_argument("--lr", type=float, help="initial learning rate (default: 3e-3)")
    opt.add_argument("--momentum", type=float, help="SGD momentum (default: 0.99)")
    opt.add_argument("--weight-decay", type=float, help="decoupled weight decay (default: 0)")
    opt.add_argument(
        "--schedule",
        choices=["poly", "cosine", "plateau", "none"],
        help="learning-rate decay over the epochs or the time limit, whichever ends first; plateau: times "
        "--plateau-factor after --plateau-patience epochs without a better validation dice (default: poly)",
    )
    opt.add_argument("--poly-exponent", type=float, help="exponent of the poly schedule (default: 0.9)")
    opt.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0 over this many epochs (default: 0)")
    opt.add_argument("--plateau-patience", type=int, help="epochs without improvement before a cut (default: 10)")
    opt.add_argument("--plateau-factor", type=float, help="learning-rate cut of the plateau schedule (default: 0.5)")
    opt.add_argument("--min-lr", type=float, help="floor of the learning rate (default: 0)")
    opt.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this (default: off; nnU-Net 12)")
    opt.add_argument(
        "--lr-scaling",
        choices=["none", "linear", "sqrt"],
        help="scale the learning rate with the number of replicas (default: none)",
    )
    opt.add_argument(
        "--mixed-precision",
        action="store_true",
        default=None,
        help="mixed_float16 with float32 outputs (on a CPU without float16 kernels: mixed_bfloat16)",
    )

    stop = parser.add_argument_group("stopping, validation and logs")
    stop.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="stop after the last whole epoch that fits in this many minutes (the schedule follows it)",
    )
    stop.add_argument(
        "--early-stopping",
        type=int,
        metavar="EPOCHS",
        help="stop after this many epochs without a better validation dice (default: 0, off)",
    )
    stop.add_argument("--val-overlap", type=float, help="sliding-window overlap of validation (default: 0.5)")
    stop.add_argument(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        default=None,
        help="write no tensorboard/ event files",
    )
    stop.add_argument(
        "--tensorboard-images",
        type=int,
        metavar="N",
        help="validation cases shown as image | truth | prediction in TensorBoard (default: 3)",
    )

    scale = parser.add_argument_group("several devices")
    scale.add_argument(
        "--strategy",
        choices=["default", "mirrored", "multiworker"],
        help="default: one device; mirrored: every local GPU (tf.distribute.MirroredStrategy; JAX: DataParallel); "
        "multiworker: several hosts from TF_CONFIG (MultiWorkerMirroredStrategy); --batch-size is per device",
    )
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
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
        from utils.train.loop import train

        config = train(settings)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    print(f"Best validation mean foreground dice: {config['best_val_dice']:.4f} ({config['epochs_done']} epochs)")
    print(f"Run written to {config['output']}: model.keras, last.keras, config.json, history.csv, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
