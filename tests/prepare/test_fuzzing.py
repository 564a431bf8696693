"""Damaged-file fuzzing: seeded damaged copies of the real files in ``../shared/data`` (NIfTI, NRRD, MHA, DICOM, HDF5
and PNG slices made from them) are prepared by data_gen.py beside intact cases. Damage: truncation at a random
offset, random byte flips in the header and in the data, and sizes that lie (a header that declares other dimensions
than the data holds; for PNG with a valid checksum, for HDF5 the superblock's end-of-file address).

Whatever the damage, data_gen.py never shows a traceback; every damaged file is either read (the damage did not
touch anything that matters, or gave values that are still valid), left out of its DICOM series with a warning naming
it (a file that no longer parses as DICOM at all), or its case fails with a line naming the file (for a DICOM slice,
the file or its series' folder); the intact cases are always prepared. The counts per format are in
README.md ("What happens when things go wrong"); ``python tests/prepare/test_fuzzing.py`` prints them.

Each format runs as one data_gen.py pass in this process (``--workers 1``) over a folder of all its damaged copies,
so the whole test takes seconds, not the minutes of one process per file.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

import data_gen
from utils.prepared import PreparedDataset

SEED = 18
COUNTS = {"nifti": 45, "nrrd": 35, "mha": 30, "dicom": 30, "hdf5": 30, "png": 40}
DAMAGES = ("truncate", "header flips", "data flips", "lying size")
HIPPOCAMPUS = SHARED_DATA / "msd_hippocampus"
PYRADIOMICS = SHARED_DATA / "pyradiomics"
DCMQI_SERIES = SHARED_DATA / "dcmqi" / "ct-3slice"
STS = SHARED_DATA / "sts_layout" / "lab_petct_vox_5.00mm.h5"


def flip(data: bytes, rng: np.random.Generator, start: int, end: int) -> bytes:
    """1 to 8 random bytes of ``data[start:end]`` replaced by random values."""
    out = bytearray(data)
    end = max(min(end, len(out)), start + 1)
    for offset in rng.integers(start, end, size=int(rng.integers(1, 9))):
        out[int(offset)] = int(rng.integers(0, 256))
    return bytes(out)


def damage(data: bytes, kind: str, rng: np.random.Generator, header_end: int, lie) -> bytes:
    """``data`` damaged by ``kind``; ``header_end`` splits header and data; ``lie(data, rng)`` makes the size lie."""
    if kind == "truncate":
        return data[: int(rng.integers(0, len(data)))]
    if kind == "header flips":
        return flip(data, rng, 0, header_end)
    if kind == "data flips":
        return flip(data, rng, header_end, len(data))
    return lie(data, rng)


def other_sizes(sizes: list[int], rng: np.random.Generator) -> list[int]:
    """Dimensions that lie: one made larger (up to huge), smaller or zero."""
    sizes = list(sizes)
    axis = int(rng.integers(0, len(sizes)))
    sizes[axis] = int(rng.choice([0, 1, max(sizes[axis] // 2, 1), sizes[axis] + 1, sizes[axis] * 7, 30000]))
    return sizes


def nifti_lie(data: bytes, rng) -> bytes:
    dims = list(struct.unpack_from("<8h", data, 40))
    dims[1:4] = other_sizes(dims[1:4], rng)
    return data[:40] + struct.pack("<8h", *dims) + data[56:]


def text_header_lie(key: str):
    """A lie in the ``sizes:`` (NRRD) or ``DimSize =`` (MHA) line of a text header."""

    def lie(data: bytes, rng) -> bytes:
        match = re.search(rb"(" + key.encode() + rb"\s*[:=]\s*)([0-9][0-9 ]*)", data)
        sizes = other_sizes([int(v) for v in match.group(2).split()], rng)
        return data[: match.start(2)] + " ".join(map(str, sizes)).encode() + data[match.end(2) :]

    return lie


def text_header_end(data: bytes, marker: bytes) -> int:
    position = data.find(marker)
    return position + len(marker) if position >= 0 else min(len(data), 400)


def write_damaged(path: Path, data: bytes, kind: str, rng, header_end: int, lie, gz: bool = False) -> None:
    """Write ``data`` (a file's content, decompressed when ``gz``) damaged by ``kind``; a gzip file is truncated as
    stored and otherwise damaged inside, so that the reader's own parser meets the damage."""
    if gz and kind == "truncate":
        stored = gzip.compress(data, mtime=0)
        path.write_bytes(stored[: int(rng.integers(0, len(stored)))])
    else:
        damaged = damage(data, kind, rng, header_end, lie)
        path.write_bytes(gzip.compress(damaged, mtime=0) if gz else damaged)


def build_nifti(root: Path, count: int, rng) -> tuple[list, list[str]]:
    """An MSD folder of ``count`` damaged cases (image or label; stored .nii.gz or plain .nii) and 3 intact ones."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    sources = meta["training"][:12]
    training, damaged, good = [], [], []
    for i in range(count + 3):
        source = sources[i % len(sources)]
        gz = i >= count or bool(rng.integers(0, 2))
        suffix = ".nii.gz" if gz else ".nii"
        files = {
            key: f"./{folder}/case_{i:03d}{suffix}" for key, folder in (("image", "imagesTr"), ("label", "labelsTr"))
        }
        target = str(rng.choice(["image", "label"]))
        kind = DAMAGES[i % len(DAMAGES)]
        for key, name in files.items():
            content = gzip.decompress((HIPPOCAMPUS / source[key]).read_bytes())
            if i < count and key == target:
                write_damaged(root / name, content, kind, rng, 352, nifti_lie, gz)
                damaged.append((root / name, kind))
            else:
                (root / name).write_bytes(gzip.compress(content, mtime=0) if gz else content)
        training.append(files)
        if i >= count:
            good.append(f"case_{i:03d}")
    meta["training"], meta["test"] = training, []
    (root / "dataset.json").write_text(json.dumps(meta))
    return damaged, good


def build_itk(root: Path, count: int, rng, suffix: str) -> tuple[list, list[str]]:
    """Image/label pairs (pyradiomics breast1 and the prostate phantom) as NRRD or MHA, stored compressed or not:
    ``count`` damaged pairs (image or label) and 2 intact ones."""
    import SimpleITK as sitk

    root.mkdir(parents=True)
    staging = root.parent / f"{root.name}_sources"
    staging.mkdir()
    pairs = [("breast1_image.nrrd", "breast1_label.nrrd"), ("prostate_phantom_subvolume.nrrd", None)]
    pairs[1] = (pairs[1][0], "prostate_phantom_subvolume-label.nrrd")
    contents = []
    for image, label in pairs:
        for compressed in (False, True):
            versions = []
            for name in (image, label):
                target = staging / f"{Path(name).stem}_{int(compressed)}{suffix}"
                sitk.WriteImage(sitk.ReadImage(str(PYRADIOMICS / name)), str(target), compressed)
                versions.append(target.read_bytes())
            contents.append(versions)
    shutil.rmtree(staging)
    marker, key = (b"\n\n", "sizes") if suffix == ".nrrd" else (b"ElementDataFile = LOCAL\n", "DimSize")
    damaged, good = [], []
    for i in range(count + 2):
        image, label = contents[i % len(contents)]
        paths = root / f"c{i:03d}_image{suffix}", root / f"c{i:03d}_label{suffix}"
        target = int(rng.integers(0, 2))
        kind = DAMAGES[i % len(DAMAGES)]
        for index, (path, content) in enumerate(zip(paths, (image, label), strict=True)):
            if i < count and index == target:
                header_end = text_header_end(content, marker)
                write_damaged(path, content, kind, rng, header_end, text_header_lie(key))
                damaged.append((path, kind))
            else:
                path.write_bytes(content)
        if i >= count:
            good.append(f"c{i:03d}")
    return damaged, good


def build_dicom(root: Path, count: int, rng) -> tuple[list, list[str]]:
    """Copies of the dcmqi 3-slice CT series, each its own series, one slice damaged in ``count`` of them; 2 intact."""
    import pydicom
    from pydicom.uid import generate_uid

    slices = [pydicom.dcmread(p) for p in sorted(DCMQI_SERIES.iterdir())]
    damaged, good = [], []
    for i in range(count + 2):
        folder = root / f"s{i:03d}"
        folder.mkdir(parents=True)
        uid = f"1.2.826.0.1.3680043.8.498.18{i:04d}"
        target = int(rng.integers(0, len(slices)))
        kind = DAMAGES[i % len(DAMAGES)]
        for index, dataset in enumerate(slices):
            dataset.SeriesInstanceUID = uid
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=[uid, str(index)]
            )
            path = folder / f"{index + 1:02d}.dcm"
            dataset.save_as(path)
            if i < count and index == target:
                content = path.read_bytes()
                header_end = content.rfind(b"\xe0\x7f\x10\x00")
                path.write_bytes(damage(content, kind, rng, header_end, dicom_lie))
                damaged.append((path, kind))
        if i >= count:
            good.append(f"s{i:03d}")
    return damaged, good


def dicom_lie(data: bytes, rng) -> bytes:
    """Rows or Columns (US, explicit or implicit VR) set to another size than the pixel data holds."""
    for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"):
        position = data.find(tag)
        if position < 0:
            continue
        offset = position + 8  # tag, then VR and a 2-byte length (explicit) or a 4-byte length (implicit)
        value = struct.unpack_from("<H", data, offset)[0]
        size = other_sizes([value], rng)[0] % 65536
        data = data[:offset] + struct.pack("<H", size) + data[offset + 2 :]
        if rng.integers(0, 2):
            break
    return data


def hdf5_lie(data: bytes, rng) -> bytes:
    """The superblock's end-of-file address (version 0: bytes 40..48) made larger or smaller than the file."""
    if data[8] != 0:
        return flip(data, rng, 0, 64)
    size = len(data) * int(rng.integers(2, 5)) if rng.integers(0, 2) else len(data) // int(rng.integers(2, 5))
    return data[:40] + struct.pack("<Q", size) + data[48:]


def build_hdf5(root: Path, count: int, rng) -> tuple[list, list[str]]:
    """Copies of the STS-layout HDF5 file (2 patients each), ``count`` damaged and 2 intact, in one folder."""
    root.mkdir(parents=True)
    content = STS.read_bytes()
    damaged, good = [], []
    for i in range(count + 2):
        path = root / f"p{i:03d}.h5"
        if i < count:
            kind = DAMAGES[i % len(DAMAGES)]
            path.write_bytes(damage(content, kind, rng, 4096, hdf5_lie))
            damaged.append((path, kind))
        else:
            path.write_bytes(content)
            good += [f"p{i:03d}_STS_101", f"p{i:03d}_STS_102"]
    return damaged, good


def png_lie(data: bytes, rng) -> bytes:
    """IHDR width or height changed, with the chunk's CRC recomputed so that only the size lies."""
    width, height = struct.unpack_from(">II", data, 16)
    width, height = other_sizes([width, height], rng)
    ihdr = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + data[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def build_png(root: Path, count: int, rng) -> tuple[list, list[str]]:
    """Axial slices of hippocampus cases as 8-bit PNG images and masks (values 0, 1, 2): ``count`` damaged (image or
    mask) and 3 intact, one slice per case."""
    import nibabel as nib
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    damaged, good = [], []
    for i in range(count + 3):
        source = meta["training"][i % 20]
        image = np.asarray(nib.load(HIPPOCAMPUS / source["image"]).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(HIPPOCAMPUS / source["label"]).dataobj).astype(np.uint8)
        z = int(np.argmax(label.reshape(-1, label.shape[-1]).sum(axis=0)))
        plane = image[..., z]
        plane = np.round(255 * (plane - plane.min()) / max(float(np.ptp(plane)), 1e-6)).astype(np.uint8)
        name = f"slice_{i:03d}.png"
        paths = root / "images" / name, root / "masks" / name
        Image.fromarray(plane).save(paths[0])
        Image.fromarray(label[..., z]).save(paths[1])
        if i < count:
            path = paths[int(rng.integers(0, 2))]
            kind = DAMAGES[i % len(DAMAGES)]
            path.write_bytes(damage(path.read_bytes(), kind, rng, 33, png_lie))
            damaged.append((path, kind))
        else:
            good.append(f"slice_{i:03d}")
    return damaged, good


BUILDERS = {
    "nifti": (build_nifti, []),
    "nrrd": (lambda root, n, rng: build_itk(root, n, rng, ".nrrd"), []),
    "mha": (lambda root, n, rng: build_itk(root, n, rng, ".mha"), []),
    "dicom": (build_dicom, ["--window-preset", "liver"]),
    "hdf5": (build_hdf5, []),
    "png": (build_png, []),
}


def outcome(path: Path, cases: list[dict], failures: list[str], dicom: bool) -> str:
    """``read`` when a prepared case reads the file, ``left out`` when a prepared DICOM series left it out as not
    readable DICOM (with a warning naming it), ``refused`` when a failure line names it (a DICOM slice: or its
    series' folder), else ``lost``."""
    names = {str(path), str(path.resolve())}
    for case in cases:
        if names & set(case["source"].get("unreadable") or []):
            return "left out"
        if names & {*case["source"]["image"], case["source"].get("label"), *(case["source"].get("masks") or [])}:
            return "read"
    shown = [path.name, str(path.parent)] if dicom else [path.name]
    if any(any(name in line for name in shown) for line in failures):
        return "refused"
    return "lost"


def fuzz(fmt: str, root: Path, capsys) -> dict:
    """Build the damaged folder of ``fmt``, prepare it, check every file's outcome; returns the tally."""
    builder, flags = BUILDERS[fmt]
    rng = np.random.default_rng([SEED, list(BUILDERS).index(fmt)])
    damaged, good = builder(root / "raw", COUNTS[fmt], rng)
    output = root / "out"
    args = ["--input", str(root / "raw"), "--output", str(output), "--workers", "1", "--spacing", "original", *flags]
    capsys.readouterr()
    code = data_gen.main(args)
    err = capsys.readouterr().err
    assert code in (0, 1) and "Traceback" not in err, err[-3000:]
    failures = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    for line in failures:  # one line per failed case, naming a file
        assert re.match(r"^[A-Za-z0-9._-]+: /", line), line
    manifest = json.loads((output / "manifest.json").read_text())
    prepared = {case["id"] for case in manifest["cases"]}
    assert set(good) <= prepared, sorted(set(good) - prepared)
    tally = {"tried": len(damaged), "refused": 0, "read": 0, "left out": 0}
    dataset = PreparedDataset(output)  # the manifest's source paths are relative to the input: resolve them
    cases = [{"source": dataset.spec(case_id).to_json()} for case_id in dataset.cases]
    for path, kind in damaged:
        result = outcome(path, cases, failures, fmt == "dicom")
        assert result != "lost", f"{path.name} ({kind}) is neither prepared nor named in a failure:\n{err[-3000:]}"
        tally[result] += 1
    return tally


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real test data folder {SHARED_DATA} is not in this checkout")
@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_damaged_files_never_give_a_traceback_are_named_and_the_intact_cases_finish(fmt, tmp_path, capsys):
    tally = fuzz(fmt, tmp_path, capsys)
    print(f"{fmt}: {tally}")  # the README's counts (pytest -s)
    assert tally["tried"] == COUNTS[fmt] and tally["refused"] + tally["read"] + tally["left out"] == tally["tried"]


def test_at_least_200_damaged_files_across_six_formats():
    assert sum(COUNTS.values()) >= 200 and len(COUNTS) == 6
