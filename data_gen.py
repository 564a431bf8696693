"""Turn raw medical images into a prepared dataset: normalised ``.npy`` volumes and the JSON files that record them.

Examples (``--format auto`` detects each input format; README.md has one line per format):
    python data_gen.py --input data/hippocampus_sample --output data/hippocampus
    python data_gen.py --input nnUNet_raw/Dataset004_Hippocampus --output data/hippocampus_nnunet
    python data_gen.py --input my_scans --output data/mine      (imagesTr/ + labelsTr/ or images/ + labels/)
    python data_gen.py --input scans/ --image-pattern '*_image.nrrd' --label-pattern '*_label.nrrd' --output data/x
    python data_gen.py --input lab_petct_vox_5.00mm.h5 --binarize --export slices --output data/sts
    python data_gen.py --input ct_series/ --label seg.nii.gz --window-preset soft_tissue --output data/ct
    python data_gen.py --input data/hippocampus_sample --folds 5 --output data/hippocampus_cv
    python data_gen.py --input nnUNet_raw/Dataset004_Hippocampus --splits splits_final.json --output data/h

Writes ``manifest.json``, ``fingerprint.json``, ``splits.json`` and ``volumes/`` into ``--output``
(docs/ARCHITECTURE.md), and with ``--export slices patches`` the ``slices/`` and ``patches/`` arrays of the classic
2D and patch workflows.
"""

from __future__ import annotations

import argparse
import sys

from utils.cli import add_reader_flags, add_setting, label_map_option, reader_options
from utils.console import add_script_flags, start
from utils.device import enable_onednn
from utils.fileio import command_line, folder_lock
from utils.formats import discover
from utils.prepare.dataset import PreparationError, prepare_dataset
from utils.prepare.exports import ExportSettings
from utils.preprocessing import PreprocessSettings
from utils.settings import INTERPOLATIONS, PREPARE, WINDOW_PRESETS

enable_onednn()  # before anything imports TensorFlow (data_gen itself does not; its callers may)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_script_flags(parser)
    parser.add_argument("--input", required=True, help="raw dataset: a folder or file (see --format)")
    parser.add_argument("--output", required=True, help="folder of the prepared dataset, e.g. data/NAME")
    add_reader_flags(parser)
    add_setting(parser, "spacing", PREPARE["spacing"])
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
    for key in ("normalize", "equalize", "interpolation", "downsample", "crop", "crop_margin"):
        add_setting(parser, key, PREPARE[key])
    _add_export_flags(parser)
    add_setting(parser, "split", PREPARE["split"], nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    add_setting(parser, "splits", PREPARE["splits"])
    add_setting(parser, "folds", PREPARE["folds"])
    add_setting(parser, "seed", PREPARE["seed"])
    add_setting(parser, "workers", PREPARE["workers"])
    add_setting(parser, "source_root", PREPARE["source_root"])
    return parser


def _add_export_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("exports (slices/, patches/)")
    add_setting(group, "export", PREPARE["export"])
    add_setting(group, "slice_filter", PREPARE["slice_filter"])
    add_setting(group, "slice_size", PREPARE["slice_size"], nargs=2, metavar=("H", "W"))
    group.add_argument(
        "--patch-size", nargs="+", type=int, metavar="N", help="patch size D H W (3D) or H W (2D) for --export patches"
    )
    add_setting(group, "patch_sampling", PREPARE["patch_sampling"])
    add_setting(group, "patches_per_case", PREPARE["patches_per_case"])
    add_setting(group, "patch_ratio", PREPARE["patch_ratio"], nargs=2, metavar=("FG", "BG"))


def export_settings(args: argparse.Namespace) -> ExportSettings:
    """Resolve the export flags (raises ValueError on bad values)."""
    return ExportSettings(
        kinds=list(dict.fromkeys(args.export)),
        slice_filter=args.slice_filter,
        slice_size=list(args.slice_size) if args.slice_size else None,
        patch_size=list(args.patch_size) if args.patch_size else None,
        patch_sampling=args.patch_sampling,
        patches_per_case=args.patches_per_case,
        patch_ratio=list(args.patch_ratio),
        seed=args.seed,
    )


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
        image_order=INTERPOLATIONS[args.interpolation],
        equalize=args.equalize,
        downsample=args.downsample,
        label_map=label_map_option(args),
        binarize=args.binarize,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start(args.verbose, backend=False)
    try:
        settings = settings_from_args(args)
        exports = export_settings(args)
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        source = discover(args.input, args.format, reader_options(args))
        settings.label_values = list(source.label_values)
    except (ValueError, OSError) as error:
        print(f"data_gen.py: error: {error}", file=sys.stderr)
        return 2
    print(f"{source.name}: {len(source.cases)} cases ({source.format}) from {args.input}")
    try:
        with folder_lock(args.output, command_line("data_gen.py", argv)):
            manifest = prepare_dataset(
                source,
                args.output,
                settings,
                args.split,
                args.seed,
                args.workers,
                exports,
                args.folds,
                args.splits,
                source_root=args.source_root,
            )
    except PreparationError as error:
        print(f"data_gen.py: {error}", file=sys.stderr)
        print(f"The other cases were written to {args.output}.", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"data_gen.py: error: {error}", file=sys.stderr)
        return 2
    written = ", ".join(
        ["manifest.json", "fingerprint.json", "splits.json", "volumes/"]
        + [f"{kind}/" for kind in exports.kinds if kind != "volumes"]
    )
    print(f"Wrote {len(manifest['cases'])} cases to {args.output} ({written})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
