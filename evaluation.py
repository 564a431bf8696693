"""Predict with a trained run, write masks in the source images' geometry, score them, draw them, report.

Examples:
    python evaluation.py --run runs/hippocampus --data data/hippocampus --split test --output results/hippocampus
    python evaluation.py --run runs/hippocampus --data data/hippocampus --postprocess auto --output results/h
    python evaluation.py --run runs/ct --input new_scans/ --format dicom --output results/new_scans
    python evaluation.py --run runs/brats --data data/brats --output results/brats \\
        --regions '{"whole_tumour": [1, 2, 4], "tumour_core": [1, 4], "enhancing_tumour": [4]}'

With --data, a split of a prepared dataset (data_gen.py) is predicted and scored against its labels. With --input,
raw images of any supported format (NIfTI/MSD, NRRD/MHA, DICOM, HDF5, BraTS, PNG) are read and prepared exactly as
the run's training data was (settings from the training dataset's manifest.json and fingerprint.json), predicted,
and scored when they have labels.

Writes into --output: masks/<id>.nii.gz on the source grid (same shape, spacing, origin, direction) plus a copy in
the source's own format where it has one (NRRD/MHA, .h5, PNG slices, DICOM-SEG); metrics.csv (one row per case and
class or region); summary.json (per class and region: mean, std, median, quartiles, empty cases; the foreground
mean; the settings); dice_boxplot.png; overlays/<id>.png and overlays/<id>.gif; report.html (one self-contained page).
Per-case results are kept in cases/<id>.json: a rerun with the same settings resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.cli import add_reader_flags, add_setting, reader_options
from utils.console import add_script_flags, start
from utils.device import enable_onednn
from utils.settings import EVALUATE

enable_onednn()  # before anything imports TensorFlow


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_script_flags(parser)
    parser.add_argument("--run", required=True, help="run folder written by train.py (runs/NAME)")
    parser.add_argument(
        "--data",
        help="prepared dataset folder written by data_gen.py (data/NAME) whose --split is evaluated; with --input, "
        "the run's training dataset when it is no longer where the run's config.json says",
    )
    parser.add_argument("--input", help="raw images to predict (a folder or file of any supported format)")
    add_setting(parser, "split", EVALUATE["split"])
    parser.add_argument("--output", required=True, help="results folder to write (results/NAME)")
    _add_inference_flags(parser)
    _add_postprocess_flags(parser)
    _add_scoring_flags(parser)
    add_reader_flags(parser, label_transforms=False)
    return parser


def _add_inference_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference")
    add_setting(group, "overlap", EVALUATE["overlap"])
    add_setting(group, "blend", EVALUATE["blend"])
    add_setting(group, "engine", EVALUATE["engine"])
    group.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="test-time mirroring: average the predictions of all mirrored copies of the image (up to 8 in 3D). "
        "Default: on along the axes the run's training mirrored (the default augmentation mirrors every axis), as "
        "nnU-Net does; --no-tta is 8 times faster. On MSD Hippocampus after 10 minutes of training it raised the "
        "held-out mean dice from 0.864 to 0.871",
    )
    group.add_argument("--batch-size", type=int, help="windows per model call (default: the run's batch size)")
    add_setting(group, "pictures", EVALUATE["pictures"])
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_postprocess_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("post-processing")
    add_setting(group, "postprocess", EVALUATE["postprocess"])
    group.add_argument(
        "--min-size",
        metavar="SIZE",
        help="remove connected components smaller than SIZE: voxels (50), mm3 (30mm3) or ml (0.5ml)",
    )
    add_setting(group, "connectivity", EVALUATE["connectivity"])


def _add_scoring_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scoring")
    add_setting(group, "metrics", EVALUATE["metrics"])
    add_setting(group, "nsd_tolerance", EVALUATE["nsd_tolerance"])
    group.add_argument(
        "--regions",
        metavar="JSON",
        help="regions scored besides the classes, as label values of the written masks (manifest label_values), "
        'e.g. \'{"whole_tumour": [1, 2, 4], "tumour_core": [1, 4]}\'',
    )


def parse_regions(text: str | None) -> dict:
    """``--regions`` JSON into ``{name: [label values]}``.

    Raises:
        ValueError: text that is not a JSON object.
    """
    if not text:
        return {}
    try:
        regions = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--regions must be a JSON object such as '{{\"whole_tumour\": [1, 2, 4]}}': {error}"
        ) from error
    if not isinstance(regions, dict):
        raise ValueError(f"--regions must be a JSON object of name: [label values], got {text!r}")
    return regions


def test_time_mirroring(args: argparse.Namespace) -> bool | list[int]:
    """``--tta`` / ``--no-tta``, or by default the axes the run mirrored in training (its ``config.json``)."""
    from utils.runs import load_config
    from utils.train.augment import mirrored_axes

    if args.tta is not None or not (Path(args.run) / "config.json").is_file():  # a missing run is reported later
        return bool(args.tta)
    try:
        return mirrored_axes(load_config(args.run))
    except (KeyError, TypeError, ValueError):  # a damaged run folder: loading it names the problem
        return False


def options_from_args(args: argparse.Namespace):
    """The :class:`utils.evaluate.pipeline.Options` of the flags (raises ValueError on bad values)."""
    from utils.evaluate.options import Options

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 <= args.overlap < 1:
        raise ValueError(f"--overlap must be within [0, 1), got {args.overlap}")
    return Options(
        overlap=args.overlap,
        blend=args.blend,
        tta=test_time_mirroring(args),
        batch_size=args.batch_size,
        postprocess=args.postprocess,
        min_size=args.min_size,
        connectivity=args.connectivity,
        regions=parse_regions(args.regions),
        metrics=list(dict.fromkeys(args.metrics)),
        nsd_tolerance=args.nsd_tolerance,
        pictures=args.pictures,
        progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data and not args.input:
        parser.error("give --data (a prepared dataset to evaluate) or --input (new images to predict)")
    start(args.verbose)
    try:
        from utils.fileio import command_line, folder_lock

        options = options_from_args(args)
        with folder_lock(args.output, command_line("evaluation.py", argv)):
            if args.input:
                from utils.evaluate.predict import predict_images

                summary = predict_images(
                    args.run, args.input, args.output, args.format, reader_options(args), args.data, options
                )
            else:
                from utils.evaluate.pipeline import evaluate

                summary = evaluate(args.run, args.data, args.output, split=args.split, options=options)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"evaluation.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"cases": summary["num_cases"], "foreground_mean": summary["foreground_mean"]}, indent=2))
    print(f"Masks, metrics.csv, summary.json, overlays and report.html are in {args.output}")
    if summary["failures"]:
        for failure in summary["failures"]:
            print(f"evaluation.py: case {failure['id']} failed: {failure['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
