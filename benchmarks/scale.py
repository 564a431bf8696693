"""Full-size CT cases, made deterministically from the real CTs of ``../shared/data``, for the scale benchmarks.

    python benchmarks/scale.py --output /tmp/ct_scale                      # one case of each size, MSD layout
    python benchmarks/scale.py --output /tmp/ct_scale --sizes 256 --cases 3 --format npy
    python benchmarks/scale.py --save-bank /tmp/ct_bank.npz                # the sources, compact, to carry elsewhere
    python benchmarks/scale.py --bank /tmp/ct_bank.npz --output /tmp/ct    # the same cases from the bank

A case is ``512 x 512 x N`` voxels (``N`` in :data:`SIZES`), int16 Hounsfield units with a uint8 label map of
:data:`NUM_CLASSES` classes, built from one of two real CTs:

- ``lung1``: the pyradiomics lung CT (512 x 512 x 48 at 0.57 x 0.57 x 5 mm); class 1 its manual tumour mask, class 2
  the lungs (air below -400 HU inside the body: the components that do not touch the volume's border).
- ``totalsegmentator``: the TotalSegmentator abdominal CT (122 x 101 x 30 at 3 mm); class 1 the liver, class 2
  spleen and kidneys (its labels 5, and 1 to 3; model outputs, not manual masks).

The source is resampled (linear for the image, nearest for the label) onto ``N`` axial slices spanning its whole
axial extent and a 512 x 512 grid spanning its in-plane extent zoomed by a random factor in [0.85, 1.15], shifted by
up to 10 % of that extent and mirrored left-right with probability 1/2; what falls outside the source is air
(-1024 HU, label 0). Every choice comes from ``numpy.random.default_rng([seed, N, case, in_plane])``, so a case is
the same on every machine that holds the same sources. Cases are generated at run time into the folder given on the
command line and never committed.

Layouts: ``--format nifti`` writes an MSD folder (``dataset.json``, ``imagesTr/ct_<N>_<k>.nii.gz``, ``labelsTr/``)
that ``data_gen.py --input`` reads; ``--format npy`` writes ``<id>_image.npy`` (Z, Y, X) int16, ``<id>_label.npy``
uint8 and ``<id>.json`` (spacing). Python: :func:`load_sources` (or :func:`load_bank`), then :func:`make_case`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZES = (64, 128, 256, 512)
IN_PLANE = 512
NUM_CLASSES = 3
AIR_HU = -1024
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABEL_NAMES = {"0": "background", "1": "tumour or liver", "2": "lungs or spleen and kidneys"}
CHUNK_SLICES = 32  # axial slices interpolated at once (bounds the float32 temporaries)


@dataclass
class Source:
    """One real CT: ``image`` (Z, Y, X) int16 HU, ``label`` (Z, Y, X) uint8 in ``0..NUM_CLASSES-1``, ``spacing``
    (z, y, x) mm."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class Case:
    """A generated case: ``image`` (Z, Y, X) int16 HU, ``label`` (Z, Y, X) uint8, ``spacing`` (z, y, x) mm."""

    case_id: str
    source: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def _lungs(image: np.ndarray) -> np.ndarray:
    """Air inside the body: components of ``image < -400`` HU that do not touch the volume's border, above 0.1 % of
    the volume."""
    from scipy import ndimage

    components, count = ndimage.label(image < -400)
    border = np.zeros(image.shape, bool)
    for axis in (1, 2):  # the axial slab's own top and bottom slices cut through the lungs: only in-plane borders
        index = [slice(None)] * 3
        for end in (0, -1):
            index[axis] = end
            border[tuple(index)] = True
    outside = set(np.unique(components[border]).tolist())
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    keep = [k for k in range(1, count + 1) if k not in outside and sizes[k] > 0.001 * image.size]
    return np.isin(components, keep)


def load_sources(shared_data: str | Path = SHARED_DATA) -> list[Source]:
    """The two source CTs with their three-class labels, read from ``shared_data`` (needs SimpleITK and nibabel).

    Raises:
        FileNotFoundError: a source file is missing, naming it.
    """
    import nibabel as nib
    import SimpleITK as sitk

    root = Path(shared_data)
    lung_image, lung_label = root / "pyradiomics" / "lung1_image.nrrd", root / "pyradiomics" / "lung1_label.nrrd"
    totalsegmentator = root / "totalsegmentator"
    ts_image, ts_label = totalsegmentator / "example_ct_sm.nii.gz", totalsegmentator / "example_seg.nii.gz"
    for path in (lung_image, lung_label, ts_image, ts_label):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: source CT not found (scale.py needs ../shared/data, or --bank)")
    itk = sitk.ReadImage(str(lung_image))
    image = sitk.GetArrayFromImage(itk).astype(np.int16)  # (Z, Y, X), LPS
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(lung_label))) > 0
    label = np.where(tumour, 1, np.where(_lungs(image), 2, 0)).astype(np.uint8)
    x, y, z = itk.GetSpacing()
    sources = [Source("lung1", image, label, (float(z), float(y), float(x)))]
    ct, seg = nib.load(str(ts_image)), nib.load(str(ts_label))
    # (X, Y, Z) in RAS -> (Z, Y, X) in LPS, as lung1: flip x and y.
    to_zyx = lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0))[:, ::-1, ::-1])  # noqa: E731
    organs = np.asarray(seg.dataobj).astype(np.int16)
    ts_classes = np.where(organs == 5, 1, np.where(np.isin(organs, (1, 2, 3)), 2, 0)).astype(np.uint8)
    zooms = [float(v) for v in ct.header.get_zooms()[:3]]
    sources.append(
        Source(
            "totalsegmentator",
            to_zyx(np.asarray(ct.dataobj).astype(np.int16)),
            to_zyx(ts_classes),
            (zooms[2], zooms[1], zooms[0]),
        )
    )
    return sources


def save_bank(sources: list[Source], path: str | Path) -> Path:
    """Write the sources into one compressed ``.npz`` (a few MB) that :func:`load_bank` reads without SimpleITK,
    nibabel or ``../shared/data``."""
    arrays = {}
    for source in sources:
        arrays[f"{source.name}__image"] = source.image
        arrays[f"{source.name}__label"] = source.label
        arrays[f"{source.name}__spacing"] = np.asarray(source.spacing, np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_bank(path: str | Path) -> list[Source]:
    """The sources saved by :func:`save_bank`, in the order they were saved.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CT source bank not found (write it with scale.py --save-bank)")
    with np.load(path) as bank:
        names = list(dict.fromkeys(key.split("__")[0] for key in bank.files))
        return [
            Source(name, bank[f"{name}__image"], bank[f"{name}__label"], tuple(bank[f"{name}__spacing"].tolist()))
            for name in names
        ]


def _axis_positions(count: int, source_size: int, zoom: float, shift: float) -> np.ndarray:
    """Source coordinates (in voxels) of ``count`` output samples spanning the source extent divided by ``zoom``,
    centred on the source centre moved by ``shift`` voxels."""
    step = source_size / count / zoom
    return (source_size - 1) / 2 + shift + (np.arange(count) - (count - 1) / 2) * step


def _resample_axis(array: np.ndarray, axis: int, positions: np.ndarray, fill: float, linear: bool) -> np.ndarray:
    """``array`` sampled at ``positions`` along ``axis`` (linear or nearest); outside the source: ``fill``."""
    size = array.shape[axis]
    inside = (positions >= -0.5) & (positions <= size - 0.5)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    if not linear:
        index = np.clip(np.rint(positions), 0, size - 1).astype(np.intp)
        out = np.take(array, index, axis=axis)
        return np.where(inside.reshape(shape), out, np.asarray(fill, array.dtype))
    clamped = np.clip(positions, 0, size - 1)
    low = np.floor(clamped).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    weight = (clamped - low).astype(np.float32).reshape(shape)
    low_values = np.take(array, low, axis=axis).astype(np.float32)
    out = low_values + (np.take(array, high, axis=axis).astype(np.float32) - low_values) * weight
    return np.where(inside.reshape(shape), out, np.float32(fill))


def make_case(depth: int, sources: list[Source], seed: int = 0, case: int = 0, in_plane: int = IN_PLANE) -> Case:
    """One ``in_plane x in_plane x depth`` case (see the module docstring); deterministic in its arguments.

    Args:
        depth: axial slices ``N``.
        sources: from :func:`load_sources` or :func:`load_bank`.
        seed: the generator's seed.
        case: the case's number among cases of this size.
        in_plane: rows and columns (512 for the benchmarks; smaller for rehearsals).

    Raises:
        ValueError: a size below 8 or no sources.
    """
    if depth < 8 or in_plane < 8:
        raise ValueError(f"a case needs at least 8 voxels per axis, got depth {depth}, in-plane {in_plane}")
    if not sources:
        raise ValueError("no source CTs to build cases from")
    rng = np.random.default_rng([int(seed), int(depth), int(case), int(in_plane)])
    source = sources[int(rng.integers(len(sources)))]
    zoom = float(rng.uniform(0.85, 1.15))
    nz, ny, nx = source.image.shape
    shift_y, shift_x = (float(rng.uniform(-0.1, 0.1)) * n for n in (ny, nx))
    mirror = bool(rng.random() < 0.5)
    y = _axis_positions(in_plane, ny, zoom, shift_y)
    x = _axis_positions(in_plane, nx, zoom, shift_x)
    if mirror:
        x = x[::-1]
    z = _axis_positions(depth, nz, 1.0, 0.0)
    # In-plane first on the few source slices, then along z in chunks of output slices.
    plane = _resample_axis(_resample_axis(source.image, 1, y, AIR_HU, True), 2, x, AIR_HU, True)
    plane_label = _resample_axis(_resample_axis(source.label, 1, y, 0, False), 2, x, 0, False)
    image = np.empty((depth, in_plane, in_plane), np.int16)
    for begin in range(0, depth, CHUNK_SLICES):
        chunk = z[begin : begin + CHUNK_SLICES]
        image[begin : begin + len(chunk)] = np.rint(_resample_axis(plane, 0, chunk, AIR_HU, True))
    label = _resample_axis(plane_label, 0, z, 0, False).astype(np.uint8)
    spacing = (
        nz * source.spacing[0] / depth,
        ny * source.spacing[1] / in_plane / zoom,
        nx * source.spacing[2] / in_plane / zoom,
    )
    return Case(f"ct_{depth}_{case:03d}", source.name, image, label, tuple(float(s) for s in spacing))


def normalised(image: np.ndarray) -> np.ndarray:
    """A prepared-looking network input ``(Z, Y, X, 1)`` float32: HU clipped to [-1000, 1000], divided by 1000."""
    return (np.clip(image, -1000, 1000).astype(np.float32) / np.float32(1000.0))[..., None]


def write_case(folder: str | Path, case: Case, fmt: str = "nifti") -> list[Path]:
    """Write ``case`` into ``folder`` (``nifti``: ``imagesTr/`` and ``labelsTr/`` of an MSD folder; ``npy``: arrays
    and a JSON of its spacing). Returns the files written.

    Raises:
        ValueError: an unknown format.
    """
    folder = Path(folder)
    if fmt == "npy":
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{case.case_id}_image.npy", folder / f"{case.case_id}_label.npy"]
        np.save(paths[0], case.image)
        np.save(paths[1], case.label)
        paths.append(folder / f"{case.case_id}.json")
        paths[2].write_text(json.dumps({"spacing_zyx_mm": list(case.spacing), "source": case.source}) + "\n")
        return paths
    if fmt != "nifti":
        raise ValueError(f"format must be 'nifti' or 'npy', got {fmt!r}")
    import nibabel as nib

    dz, dy, dx = case.spacing
    affine = np.diag([-dx, -dy, dz, 1.0])  # arrays are LPS-indexed; NIfTI's affine maps to RAS
    paths = []
    for kind, array in (("imagesTr", case.image), ("labelsTr", case.label)):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        path = folder / kind / f"{case.case_id}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(array, (2, 1, 0))), affine), str(path))
        paths.append(path)
    return paths


def write_dataset_json(folder: str | Path, case_ids: list[str]) -> Path:
    """The MSD ``dataset.json`` naming ``case_ids``."""
    meta = {
        "name": "ct_scale",
        "description": "full-size CT cases made by benchmarks/scale.py from pyradiomics lung1 and TotalSegmentator",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABEL_NAMES,
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids],
        "test": [],
    }
    path = Path(folder) / "dataset.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="folder to write the cases into (created)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="axial slices N of the cases")
    parser.add_argument("--cases", type=int, default=1, help="cases per size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator (default: %(default)s)")
    parser.add_argument("--in-plane", type=int, default=IN_PLANE, help="rows and columns (default: %(default)s)")
    parser.add_argument("--format", choices=("nifti", "npy"), default="nifti", help="layout (default: %(default)s)")
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA, help="the real CTs (default: %(default)s)")
    parser.add_argument("--bank", type=Path, help="read the sources from this .npz instead of --shared-data")
    parser.add_argument("--save-bank", type=Path, help="write the sources into this .npz and stop")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sources = load_bank(args.bank) if args.bank else load_sources(args.shared_data)
        if args.save_bank:
            path = save_bank(sources, args.save_bank)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, sources: {[s.name for s in sources]})")
            return 0
        if args.output is None:
            raise ValueError("--output is required (or --save-bank)")
        ids = []
        for depth in args.sizes:
            for number in range(args.cases):
                case = make_case(depth, sources, args.seed, number, args.in_plane)
                write_case(args.output, case, args.format)
                ids.append(case.case_id)
                print(f"{case.case_id}: {case.image.shape} from {case.source}, spacing {case.spacing}", flush=True)
        if args.format == "nifti":
            write_dataset_json(args.output, ids)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"scale.py: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(ids)} cases in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
