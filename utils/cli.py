"""Command-line pieces shared by the scripts: flags made from :mod:`utils.settings`, and how to read an input."""

from __future__ import annotations

import argparse
import json

from utils.settings import PREPARE, Setting, defaults


def json_object(text: str) -> dict:
    """An argparse ``type``: a JSON object (``{...}``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({error})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_setting(group, key: str, setting: Setting, with_default: bool = True, **overrides) -> argparse.Action:
    """Add ``--key`` (underscores become dashes) with the setting's type, choices, help and default.

    Args:
        group: a parser or argument group.
        key: the setting's name.
        setting: what the flag takes (:class:`utils.settings.Setting`).
        with_default: the flag's default is the setting's; ``False`` leaves it ``None`` (train.py, where a config
            file may set the key and the flag only wins when given); the help names the default either way.
        overrides: argparse options that differ (``nargs``, ``metavar``, ...).

    A true/false setting becomes a ``--key`` / ``--no-key`` pair.
    """
    options: dict = {"help": setting.help_text(), "default": defaults({key: setting})[key] if with_default else None}
    if setting.type is list:
        options.update(nargs="+", type=setting.item)
    elif setting.type is dict:
        options["type"] = json_object
    elif setting.type in (int, float):
        options["type"] = setting.type
    elif setting.type is bool:
        options["action"] = argparse.BooleanOptionalAction
    if setting.choices is not None and setting.pattern is not None:
        options["type"] = _allowed_by(setting)  # argparse's choices would refuse the pattern's values
        options.setdefault("metavar", "{" + ",".join(map(str, setting.choices)) + "}|" + setting.pattern_text)
    elif setting.choices is not None:
        options["choices"] = list(setting.choices)
    if setting.metavar is not None:
        options["metavar"] = setting.metavar
    options.update(overrides)
    return group.add_argument(
        "--" + key.replace("_", "-"), **{k: v for k, v in options.items() if v is not None or k == "default"}
    )


def _allowed_by(setting: Setting):
    """An argparse ``type`` that takes the setting's choices and the strings its pattern matches."""

    def check(text: str) -> str:
        if not setting.allows(text):
            raise argparse.ArgumentTypeError(f"must be {setting.describe()}, got {text!r}")
        return text

    return check


def add_reader_flags(parser: argparse.ArgumentParser, label_transforms: bool = True) -> None:
    """Add the flags that say how to read an input (``--format``, patterns, HDF5 keys, spacing, ...).

    Args:
        parser: the script's parser.
        label_transforms: also add ``--binarize``, ``--label-map`` and ``--label-names`` (data_gen.py); prediction
            takes those from the training dataset instead.
    """
    group = parser.add_argument_group("reading the input")
    add_setting(group, "format", PREPARE["format"])
    group.add_argument(
        "--label",
        metavar="PATH",
        help="labels that sit apart from the images: for one DICOM series a NIfTI/NRRD/MHA file in the same physical "
        "space (any axis order), a DICOM-SEG or an RTSTRUCT; for PNG the mask folder; for a folder of NIfTI/NRRD/MHA "
        "images the label folder (paired by case name); for one image file its label",
    )
    group.add_argument(
        "--image-pattern",
        nargs="+",
        metavar="GLOB",
        help="file-name pattern(s) of images (files, png), e.g. '*_image.nrrd'; the text the wildcards match "
        "pairs each image with its label (default files: '*_image.*'; png: same name in both folders)",
    )
    group.add_argument(
        "--label-pattern", nargs="+", metavar="GLOB", help="file-name pattern(s) of labels, e.g. '*_label.nrrd'"
    )
    group.add_argument(
        "--channel-patterns",
        nargs="+",
        metavar="GLOB",
        help="one file-name pattern per channel (files), e.g. '*_ct.nii.gz' '*_pet.nii.gz': the text the wildcards "
        "match pairs a case's channel files and its label; files named <case>_0000, <case>_0001 ... need none",
    )
    group.add_argument(
        "--patient-pattern",
        metavar="REGEX",
        help="regex searched in file names: group 1 is the patient (splits stay per patient); for png a group 2 "
        "(slice number) stacks each patient's slices into one volume, e.g. 'STS_(\\d+)_(\\d+)'",
    )
    group.add_argument(
        "--hdf5-image-keys",
        nargs="+",
        metavar="KEY",
        help="HDF5 image datasets or groups, one channel each (default: ct_data [pet_data], or images)",
    )
    group.add_argument(
        "--hdf5-label-key", metavar="KEY", help="HDF5 label dataset or group (default: label_data/labels)"
    )
    group.add_argument(
        "--hdf5-spacing",
        "--source-spacing",
        dest="source_spacing",
        nargs="+",
        type=float,
        metavar="MM",
        help="voxel spacing Z Y X (or one number) of HDF5 and PNG inputs, which store none "
        "(default: HDF5 attributes, a '5.00mm' in the file name, else 1)",
    )
    if not label_transforms:
        return
    group.add_argument("--binarize", action="store_true", help="merge every label > 0 into class 1")
    group.add_argument(
        "--label-map",
        nargs="+",
        metavar="SRC:DST",
        help="remap label values before use, e.g. 4:3 (BraTS); classes are then made contiguous 0..K-1, with the "
        "source values on record as label_values in manifest.json so that masks are written with them",
    )
    group.add_argument(
        "--label-names", nargs="+", metavar="VALUE=NAME", help="names of source label values, e.g. 1=liver 2=spine"
    )


def reader_options(args: argparse.Namespace) -> dict:
    """Reader options for :func:`utils.formats.discover` from the flags (raises ValueError on bad values)."""
    options = {
        "label": args.label,
        "image_pattern": args.image_pattern,
        "label_pattern": args.label_pattern,
        "channel_patterns": args.channel_patterns,
        "patient_pattern": args.patient_pattern,
        "hdf5_image_keys": args.hdf5_image_keys,
        "hdf5_label_key": args.hdf5_label_key,
        "source_spacing": args.source_spacing,
    }
    if hasattr(args, "binarize"):
        options.update(
            binarize=args.binarize,
            label_map=label_map_option(args),
            label_names=_pairs(args.label_names, "=", str, "--label-names", "VALUE=NAME"),
        )
    return options


def label_map_option(args: argparse.Namespace) -> dict[int, int] | None:
    """``--label-map SRC:DST ...`` as a dict (raises ValueError on bad pairs)."""
    return _pairs(args.label_map, ":", int, "--label-map", "SRC:DST")


def _pairs(items: list[str] | None, separator: str, cast, flag: str, form: str) -> dict | None:
    if not items:
        return None
    pairs = {}
    for item in items:
        key, sep, value = item.partition(separator)
        try:
            if not sep:
                raise ValueError(item)
            pairs[int(key)] = cast(value)
        except ValueError as error:
            raise ValueError(f"{flag} takes {form} pairs of integers, got {item!r}") from error
    return pairs
