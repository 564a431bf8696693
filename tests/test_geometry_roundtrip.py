"""A mask goes back onto its source grid, for every input format: prepare_case (reorient, crop, resample) → a
prediction on the prepared grid → probabilities_to_labels + restore_label (as evaluation does) → write_mask.

Two preparations per case: ``exact`` (original spacing, crop to the foreground) must give back the source label
voxel for voxel; ``resampled`` (another spacing, no crop) must land on the same grid with a dice above a floor.
The real data lives in ../shared/data; those cases are skipped when it is absent.
"""

import itertools
import shutil

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from builders import AFFINE, NRRD_PAIRS, make_png, write_msd
from conftest import SAMPLE, SHARED_DATA
from PIL import Image

from utils import formats as readers
from utils import geometry
from utils.formats import source_values, write_mask
from utils.formats.dicom import read_dicom_series
from utils.geometry import GeometryRecord
from utils.inference import probabilities_to_labels
from utils.preprocessing import PreprocessSettings, prepare_case, restore_label

PYRADIOMICS = SHARED_DATA / "pyradiomics"
TOTALSEG = SHARED_DATA / "totalsegmentator"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data folder {SHARED_DATA} is not in this checkout"
)


def oblique_msd(tmp_path):
    return write_msd(tmp_path / "oblique", cases=1, islands=()), "msd", {}, "case_000"


def dcmqi_series(tmp_path):
    series = tmp_path / "ct"
    shutil.copytree(SHARED_DATA / "dcmqi" / "ct-3slice", series)
    return series, "dicom", {"label": str(SHARED_DATA / "dcmqi" / "liver_spine_seg.nrrd")}, "ct"


def png_slices(tmp_path):
    root = make_png(tmp_path / "png", patients=(("001", (3, 5, 9, 12)),))
    return root, "png", {"patient_pattern": r"STS_(\d+)_(\d+)", "source_spacing": [4, 1.5, 1.5]}, "STS_001"


SOURCES = {
    "nifti-hippocampus": (lambda tmp: (SAMPLE, "msd", {}, "hippocampus_001"), False),
    "nifti-oblique": (oblique_msd, False),
    "nrrd-brain": (lambda tmp: (PYRADIOMICS, "files", NRRD_PAIRS, "brain1"), True),
    "nrrd-prostate-1-7-8-9": (lambda tmp: (PYRADIOMICS, "files", NRRD_PAIRS, "prostate_phantom"), True),
    "dicom-3-slices": (dcmqi_series, True),
    "dicom-flipped-label": (
        lambda tmp: (
            TOTALSEG / "example_ct_dicom",
            "dicom",
            {"label": str(TOTALSEG / "example_seg_dicom.nii.gz"), "binarize": True},
            "example_ct_dicom",
        ),
        True,
    ),
    "hdf5-sts": (lambda tmp: (SHARED_DATA / "sts_layout" / "lab_petct_vox_5.00mm.h5", "hdf5", {}, "STS_102"), True),
    "hdf5-stacked": (
        lambda tmp: (SHARED_DATA / "msd_lung_patches" / "test_patches.h5", "hdf5", {}, "test_patches_0007"),
        True,
    ),
    "png": (png_slices, False),
}
SETTINGS = {
    "exact": lambda spacing: PreprocessSettings(spacing="original", crop="foreground", crop_margin=1, normalize="none"),
    "resampled": lambda spacing: PreprocessSettings(
        spacing=[s * f for s, f in zip(spacing, (0.8, 1.6, 1.3), strict=True)]
    ),
}


def predicted_on_prepared_grid(label: np.ndarray, record: GeometryRecord, num_classes: int) -> np.ndarray:
    """A perfect prediction on the prepared grid taken back to the source grid as evaluation does."""
    probabilities = np.eye(num_classes, dtype=np.float32)[label]
    return restore_label(probabilities_to_labels(probabilities, record.cropped_shape), record)


def sitk_grid(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def assert_same_grid(written: sitk.Image, reference: sitk.Image, atol: float) -> None:
    assert written.GetSize() == reference.GetSize()
    for a, b in zip(sitk_grid(written)[1:], sitk_grid(reference)[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("preparation", list(SETTINGS))
@pytest.mark.parametrize("name", list(SOURCES))
def test_mask_is_written_back_on_the_source_grid(name, preparation, tmp_path):
    make, shared = SOURCES[name]
    if shared and not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is not in this checkout")
    path, fmt, options, case_id = make(tmp_path)
    source = readers.discover(path, fmt, options)
    spec = next(s for s in source.cases if s.id == case_id)
    case = readers.load_case(spec)
    settings = SETTINGS[preparation](case.spacing)
    image, label, record = prepare_case(case, settings, None, ["image"])
    assert image.shape[:3] == label.shape
    if preparation == "resampled":
        assert label.shape != case.label.shape
    classes = predicted_on_prepared_grid(label, record, len(source.label_values))
    assert classes.shape == case.label.shape
    if preparation == "exact":
        np.testing.assert_array_equal(classes, case.label)
    else:
        overlap = np.logical_and(classes > 0, case.label > 0).sum()
        assert 2 * overlap / ((classes > 0).sum() + (case.label > 0).sum()) > 0.75
    mask = source_values(classes, source.label_values)
    paths = write_mask(mask, {"id": case_id, "geometry": record, "writer": case.writer}, tmp_path / "out")
    assert paths[0] == tmp_path / "out" / "masks" / f"{case_id}.nii.gz"
    check_nifti(paths[0], case, spec, fmt, mask)
    check_format_copy(paths[1:], case, spec, fmt, mask, source, preparation, path)


def check_nifti(path, case, spec, fmt, mask):
    """``masks/<id>.nii.gz`` holds ``mask`` on the source grid: the label file's own affine for NIfTI sources, the
    series' or file's geometry (within NIfTI's float32 storage) for the others."""
    written = nib.load(path)
    np.testing.assert_array_equal(np.transpose(np.asarray(written.dataobj), (2, 1, 0)), mask)
    if fmt == "msd":
        np.testing.assert_array_equal(written.affine, nib.load(spec.label).affine)
        return
    np.testing.assert_allclose(written.affine, geometry.zyx_affine_to_nifti(case.affine), rtol=0, atol=1e-4)
    if fmt in ("files", "dicom"):
        reference = read_dicom_series(spec.image, "series") if fmt == "dicom" else sitk.ReadImage(spec.label)
        assert_same_grid(sitk.ReadImage(str(path)), reference, atol=1e-4)


def check_format_copy(paths, case, spec, fmt, mask, source, preparation, input_path):
    """The copy in the source's own format: same grid (exactly for NRRD), same layout (HDF5, PNG), a DICOM-SEG that
    reads back onto the series."""
    if fmt == "files":
        (path,) = paths
        written, reference = sitk.ReadImage(str(path)), sitk.ReadImage(spec.label)
        assert sitk_grid(written) == sitk_grid(reference)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), mask)
        if preparation == "exact":
            np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(reference))
    elif fmt == "hdf5":
        (path,) = paths
        writer = case.writer
        with h5py.File(path) as written, h5py.File(spec.image[0]) as original:
            assert written[writer["key"]].shape == tuple(writer["shape"])
            assert written[writer["key"]].dtype == np.dtype(writer["dtype"])
            if preparation == "exact":
                index = spec.hdf5.index
                stored = original[spec.hdf5.label]
                expected = stored[index] if index is not None else stored[()]
                np.testing.assert_array_equal(written[writer["key"]][()].reshape(expected.shape), expected)
    elif fmt == "png":
        assert [p.name for p in paths] == case.writer["files"]
        for path, plane in zip(paths, mask, strict=True):
            np.testing.assert_array_equal(np.asarray(Image.open(path)), plane)
            if preparation == "exact":
                original = np.asarray(Image.open(input_path / "masks" / path.name))
                np.testing.assert_array_equal(np.asarray(Image.open(path)), original)
    elif fmt == "dicom":
        if not pydicom.dcmread(spec.image[0], stop_before_pixels=True).get("SOPClassUID"):
            assert paths == []  # a SEG must reference the series' SOP classes; writers warn and skip it
            return
        (path,) = paths
        assert path.name == f"{case.case_id}_seg.dcm"
        if preparation == "exact":
            series = str(input_path)
            reread = readers.discover(series, "dicom", {"label": str(path)})
            assert reread.cases[0].label_kind == "seg"
            np.testing.assert_array_equal(readers.load_case(reread.cases[0]).label, case.label)
    else:
        assert paths == []


def test_the_oblique_case_is_really_reoriented(tmp_path):
    """The synthetic NIfTI's axes are permuted and flipped, so the prepared grid differs from the source array."""
    path, fmt, options, case_id = oblique_msd(tmp_path)
    case = readers.load_case(readers.discover(path, fmt, options).cases[0])
    _, label, record = prepare_case(case, PreprocessSettings(spacing="original"), None, ["image"])
    assert geometry.axcodes(case.affine) != ("S", "A", "R") and record.source_axcodes != ["S", "A", "R"]
    assert label.shape != case.label.shape
    assert nib.aff2axcodes(AFFINE) == ("P", "R", "S")  # of the (i, j, k) file axes


def all_orientations():
    """The 48 axis-aligned orientations of a (Z, Y, X) array: each axis to some world axis, either way."""
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = 0
            for axis, (world, sign) in enumerate(zip(permutation, signs, strict=True)):
                affine[world, axis] = sign * (axis + 1.5)
            yield affine


@pytest.mark.parametrize("shape", [(4, 5, 6), (3, 5, 4, 2)])
def test_reorienting_in_place_equals_the_copy(shape):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for affine in all_orientations():
        expected, expected_affine, codes = geometry.reorient(image, affine)
        given = image.copy()
        out, out_affine, out_codes = geometry.reorient(given, affine, overwrite=True)
        assert np.array_equal(out, expected) and np.array_equal(out_affine, expected_affine) and out_codes == codes
        flips_only = np.abs(affine[:3, :3]).argmax(axis=0).tolist() == [2, 1, 0]  # each axis already on S, A, R
        assert np.shares_memory(out, given) == flips_only


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize(("shape", "new_shape"), [((7, 9, 11), (5, 13, 8)), ((6, 8, 5, 2), (9, 4, 5))])
def test_resizing_integers_equals_resizing_their_float32_copy(order, shape, new_shape):
    image = np.random.default_rng(order).integers(-1024, 3000, size=shape).astype(np.int16)
    expected = geometry.resize_volume(image.astype(np.float32), new_shape, order)
    out = geometry.resize_volume(image, new_shape, order)
    assert out.dtype == np.float32 and out.tobytes() == expected.tobytes()
