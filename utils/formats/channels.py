"""Channels kept in separate files, and the pairing of image files with labels by pattern (``files`` layout).

A case's channels may lie in one file each:

- nnU-Net's suffixes: ``case1_0000.nii.gz``, ``case1_0001.nii.gz`` are channels 0 and 1 of ``case1``
  (:func:`group_channels`), whose label is named by the case (``case1.nii.gz``, ``case1_label.nii.gz``);
- one pattern per channel (``--channel-patterns '*_ct.nii.gz' '*_pet.nii.gz'``): the text the wildcards match pairs
  a case's channel files and its label (:func:`pair_channel_files`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from utils.formats.base import (
    _SUFFIX_WORDS,
    SITK_SUFFIXES,
    _as_list,
    _files_with_suffix,
    _match_key,
    _pattern_regex,
    safe_id,
    strip_suffix,
)

log = logging.getLogger(__name__)

CHANNEL_SUFFIX = re.compile(r"^(.+)_(\d{4})$")


class PairedCase(NamedTuple):
    """One case that pattern pairing found: its id, channel files (in channel order), label, and why it cannot be
    read (a missing channel file), or ``None``."""

    id: str
    images: list[Path]
    label: Path | None
    error: str | None = None


def group_channels(files: dict[tuple, Path], num_channels: int | None = None) -> dict[tuple, list[Path]]:
    """Group image files into cases: ``{(folder, ..., stem): file}`` → ``{(folder, ..., case): [channel files]}``.

    Stems ending ``_XXXX`` are channels of one case when every stem ends so and every case has a ``_0000``; a missing
    channel gets the path it should have had (the caller refuses it). Otherwise, or when ``num_channels`` is given and
    a case has more files than that, each file is a one-channel case under its own key.
    """
    groups: dict[tuple, dict[int, Path]] = {}
    for key, path in files.items():
        match = CHANNEL_SUFFIX.match(key[-1])
        if match is None:
            return {key: [path] for key, path in files.items()}
        groups.setdefault((*key[:-1], match.group(1)), {})[int(match.group(2))] = path
    too_many = num_channels is not None and any(max(g) >= num_channels for g in groups.values())
    if not groups or any(0 not in g for g in groups.values()) or too_many:
        return {key: [path] for key, path in files.items()}
    count = num_channels or max(max(g) for g in groups.values()) + 1
    out = {}
    for key, found in groups.items():
        suffix = found[0].name[len(strip_suffix(found[0].name)) :]
        stem = CHANNEL_SUFFIX.match(strip_suffix(found[0].name)).group(1)
        out[key] = [found.get(c, found[0].with_name(f"{stem}_{c:04d}{suffix}")) for c in range(count)]
    return out


def channel_names(patterns: Sequence[str]) -> dict[str, str]:
    """Channel names from channel patterns: ``'*_ct.nii.gz'`` → ``ct`` (``channel_<i>`` when nothing is left)."""
    names = {}
    for index, pattern in enumerate(patterns):
        name = re.sub(r"[*?]", "", strip_suffix(pattern)).strip("_-. ")
        names[str(index)] = name or f"channel_{index}"
    return names


def case_id_of(path: Path, root: Path, regexes: Sequence[re.Pattern]) -> str:
    """Case id of an image: its name up to the end of the last wildcard (``brain1_image.nrrd`` with ``*_image.nrrd``
    → ``brain1``), prefixed by its sub-folder."""
    stem = strip_suffix(path.name)
    match = next((m for m in (r.match(path.name) for r in regexes) if m), None)
    if match is not None:
        ends = [match.end(i) for i, g in enumerate(match.groups(), 1) if g and g.lower() not in _SUFFIX_WORDS]
        stem = strip_suffix(path.name[: ends[-1]]) if ends else stem
    folder = str(path.parent.relative_to(root))
    return safe_id(stem if folder in ("", ".") else f"{folder.replace(os.sep, '_')}_{stem}")


def _matches(regexes: Sequence[re.Pattern], files: Sequence[Path], root: Path, flag: str) -> dict[tuple, Path]:
    """``{key: file}`` of the files a pattern matches (:func:`utils.formats.base._match_key`).

    Raises:
        ValueError: two files give the same key.
    """
    found: dict[tuple, Path] = {}
    for path in files:
        key = _match_key(regexes, path, root)
        if key is None:
            continue
        if key in found:
            raise ValueError(f"{path}: pairs with the same key as {found[key]}; make {flag} stricter")
        found[key] = path
    return found


def pair_channel_files(
    root: Path,
    image_pattern,
    label_pattern,
    channel_patterns: Sequence[str] | None = None,
    num_channels: int | None = None,
    suffixes: Sequence[str] = SITK_SUFFIXES,
) -> list[PairedCase]:
    """The cases under ``root``: channel files paired by ``channel_patterns`` (one pattern per channel) or matched by
    ``image_pattern`` and grouped by ``_XXXX`` suffixes, each with the label ``label_pattern`` pairs with it.

    Files matching the label pattern are never taken as images; a label that pairs with no image is reported.

    Raises:
        ValueError: no file matches the (first channel's) image pattern, or two files give the same key.
    """
    label_regexes = [_pattern_regex(p) for p in _as_list(label_pattern)]
    files = _files_with_suffix(root, suffixes)
    labels = _matches(label_regexes, files, root, "--label-pattern") if label_regexes else {}
    candidates = [f for f in files if not any(r.match(f.name) for r in label_regexes)]
    if channel_patterns:
        regexes = [_pattern_regex(p) for p in channel_patterns]
        per_channel = [_matches([r], candidates, root, "--channel-patterns") for r in regexes]
        grouped, images = {key: [found.get(key) for found in per_channel] for key in per_channel[0]}, {}
        first_regexes, shown = regexes[:1], channel_patterns[0]
    else:
        first_regexes, shown = [_pattern_regex(p) for p in _as_list(image_pattern)], image_pattern
        images = _matches(first_regexes, candidates, root, "--image-pattern")
        grouped = group_channels(images, num_channels)
    if not grouped:
        raise ValueError(f"{root}: no file matches the image pattern {shown!r} (a folder of images, or of "
                         "image/label pairs named alike, needs no pattern: --format folders)")  # fmt: skip
    cases = []
    for key, channel_files in sorted(grouped.items(), key=lambda item: str(item[1][0])):
        first = channel_files[0]
        case_id = case_id_of(first, root, first_regexes)
        if not channel_patterns and key not in images:  # grouped by its _XXXX suffix
            case_id = CHANNEL_SUFFIX.sub(r"\1", case_id)
        found = [f for f in channel_files if f is not None]
        cases.append(PairedCase(case_id, found, labels.get(key), _missing(channel_files, channel_patterns)))
    orphans = sorted(str(p) for k, p in labels.items() if k not in grouped)
    for orphan in orphans:
        log.warning("%s: label without an image under %s (pattern %r); passed over", orphan, root, shown)
    return cases


def _missing(channel_files: list[Path | None], patterns: Sequence[str] | None) -> str | None:
    """Why a case's channels are incomplete (naming the first file and the missing one), or ``None``."""
    for index, path in enumerate(channel_files):
        if path is None:
            return f"{channel_files[0]}: no file matching the channel pattern {patterns[index]!r} pairs with it"
        if not path.is_file():
            return f"{path}: channel file missing (its case has {channel_files[0].name})"
    return None
