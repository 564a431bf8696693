"""Turn raw medical images into a prepared dataset: normalised ``.npy`` volumes and the JSON files that record them.

Example:
    python data_gen.py --input data/hippocampus_sample --output data/hippocampus

Writes ``manifest.json``, ``fingerprint.json``, ``splits.json`` and ``volumes/`` into ``--output`` (DESIGN.md).
"""

from __future__ import annotations

import argparse
import logging
import sys

from utils.dataset import PreparationError, prepare_dataset
from utils.preprocessing import CROPS, NORMALIZATIONS, WINDOW_PRESETS, PreprocessSettings
from utils.readers import DISCOVERERS, discover


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="raw dataset: a folder or file (see --format)")
    parser.add_argument("--output", required=True, help="folder of the prepared dataset, e.g. data/NAME")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", *sorted(DISCOVERERS)],
        help="input layout; auto detects it (default: auto)",
    )
    parser.add_argument(
        "--spacing",
        nargs="+",
        default=["median"],
        metavar="MM",
        help="target voxel spacing: 'median' (dataset median, default), 'original' (no resampling) "
        "or three numbers Z Y X in mm",
    )
    parser.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="clip intensities (e.g. HU) to LOW..HIGH before normalising",
    )
    parser.add_argument(
        "--window-preset",
        choices=sorted(WINDOW_PRESETS),
        help="a named HU window: " + ", ".join(f"{k} {v[0]:g}..{v[1]:g}" for k, v in WINDOW_PRESETS.items()),
    )
    parser.add_argument(
        "--clip-percentiles",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="clip each case to its own LOW/HIGH intensity percentiles",
    )
    parser.add_argument(
        "--normalize",
        default="auto",
        choices=NORMALIZATIONS,
        help="auto: z-score per case for MR, dataset-percentile clip + z-score for CT (default)",
    )
    parser.add_argument("--crop", default="none", choices=CROPS, help="crop to a bounding box (default: none)")
    parser.add_argument("--crop-margin", type=int, default=0, help="voxels kept around the crop box")
    parser.add_argument(
        "--split",
        nargs=3,
        type=float,
        default=[0.8, 0.2, 0.0],
        metavar=("TRAIN", "VAL", "TEST"),
        help="patient-level split fractions (default: 0.8 0.2 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="processes over cases (default: 1)")
    return parser


def settings_from_args(args: argparse.Namespace) -> PreprocessSettings:
    """Resolve command-line flags into :class:`PreprocessSettings` (raises ValueError on bad values)."""
    if args.spacing in (["median"], ["original"]):
        spacing = args.spacing[0]
    else:
        try:
            spacing = [float(v) for v in args.spacing]
        except ValueError:
            spacing = None
        if spacing is None or len(spacing) != 3:
            raise ValueError(f"--spacing takes 'median', 'original' or three numbers, got {' '.join(args.spacing)}")
    if args.window and args.window_preset:
        raise ValueError("give either --window or --window-preset, not both")
    window = (
        list(args.window) if args.window else (list(WINDOW_PRESETS[args.window_preset]) if args.window_preset else None)
    )
    return PreprocessSettings(
        spacing=spacing,
        window=window,
        clip_percentiles=list(args.clip_percentiles) if args.clip_percentiles else None,
        normalize=args.normalize,
        crop=args.crop,
        crop_margin=args.crop_margin,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        source = discover(args.input, args.format)
    except (ValueError, FileNotFoundError) as error:
        print(f"data_gen.py: error: {error}", file=sys.stderr)
        return 2
    print(f"{source.name}: {len(source.cases)} cases ({source.format}) from {args.input}")
    try:
        manifest = prepare_dataset(source, args.output, settings, args.split, args.seed, args.workers)
    except PreparationError as error:
        print(f"data_gen.py: {error}", file=sys.stderr)
        print(f"The other cases were written to {args.output}.", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"data_gen.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"Wrote {len(manifest['cases'])} cases to {args.output} "
        "(manifest.json, fingerprint.json, splits.json, volumes/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
