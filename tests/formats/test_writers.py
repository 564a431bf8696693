"""Writers: a mask goes back in the source's geometry, file format and label values."""

import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from builders import NRRD_PAIRS, entry_and_values, make_png
from conftest import SAMPLE, SHARED_DATA
from PIL import Image

from utils import formats as readers
from utils.formats import class_indices, source_values, write_mask

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data folder {SHARED_DATA} is not in this checkout"
)


def test_label_values_map_both_ways():
    classes = np.array([[[0, 1, 2, 3, 4]]])
    values = source_values(classes, [0, 1, 7, 8, 9])
    assert (
        values.tolist() == [[[0, 1, 7, 8, 9]]] and class_indices(values, [0, 1, 7, 8, 9]).tolist() == classes.tolist()
    )
    assert source_values(classes, [0, 1, 2, 3, 4]) is classes
    with pytest.raises(ValueError, match="mask holds class 4, but the dataset has 3 classes"):
        source_values(classes, [0, 1, 255])
    with pytest.raises(ValueError, match=r"mask holds values \[3\] that are not among"):
        class_indices(np.array([0, 3]), [0, 1, 255])


def test_nifti_mask_reuses_the_source_header(tmp_path):
    entry, values = entry_and_values(readers.discover(SAMPLE))
    (path,) = write_mask(values, entry, tmp_path)
    written, source = nib.load(str(path)), nib.load(entry["source"].label)
    assert path == tmp_path / "masks" / "hippocampus_001.nii.gz"
    assert np.array_equal(written.affine, source.affine)
    assert written.header.get_sform(coded=True)[1] == source.header.get_sform(coded=True)[1]
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj))
    with pytest.raises(ValueError, match="mask shape .* differs from the source shape"):
        write_mask(values[:-1], entry, tmp_path)


@needs_shared
def test_nrrd_mask_keeps_geometry_and_prostate_values(tmp_path):
    source = readers.discover(SHARED_DATA / "pyradiomics", "files", NRRD_PAIRS)
    entry, values = entry_and_values(source, 3)
    paths = write_mask(values, entry, tmp_path)
    assert [p.name for p in paths] == ["prostate_phantom.nii.gz", "prostate_phantom.nrrd"]
    written, original = sitk.ReadImage(str(paths[1])), sitk.ReadImage(entry["source"].label)
    assert written.GetSpacing() == original.GetSpacing() and written.GetOrigin() == original.GetOrigin()
    assert written.GetDirection() == original.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(original))
    nifti = nib.load(str(paths[0]))
    assert sorted(np.unique(np.asarray(nifti.dataobj)).tolist()) == [0, 1, 7, 8, 9]
    assert np.allclose(nifti.affine[:3, :3], np.diag([0.5, 0.5, 3.0]))  # LPS (-1, -1, 1) is RAS (1, 1, 1)


@needs_shared
def test_hdf5_mask_in_the_stacked_layout(tmp_path):
    path = SHARED_DATA / "msd_lung_patches" / "test_patches.h5"
    entry, values = entry_and_values(readers.discover(path, "hdf5"), 7)
    paths = write_mask(values, entry, tmp_path)
    assert paths[1].name == "test_patches_0007.h5"
    with h5py.File(paths[1]) as written, h5py.File(path) as original:
        assert written["labels"].shape == (1, 1, 48, 48) and written["labels"].dtype == np.float64
        assert np.array_equal(written["labels"][0], original["labels"][7])


def test_png_masks_named_like_the_source_with_source_values(tmp_path):
    root = make_png(tmp_path / "png")
    source = readers.discover(root, "png", {"patient_pattern": r"STS_(\d+)_(\d+)"})
    entry, values = entry_and_values(source)
    paths = write_mask(values, entry, tmp_path / "out")
    assert [p.name for p in paths[1:]] == ["STS_001_1_.png", "STS_001_2_.png", "STS_001_10_.png"]
    for path in paths[1:]:
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(root / "masks" / path.name)))


@needs_shared
def test_dicom_seg_round_trip(tmp_path):
    series = tmp_path / "ct"
    shutil.copytree(SHARED_DATA / "dcmqi" / "ct-3slice", series)
    options = {"label": str(SHARED_DATA / "dcmqi" / "liver_spine_seg.nrrd")}
    source = readers.discover(series, "dicom", options)
    entry, values = entry_and_values(source)
    paths = write_mask(values, entry, tmp_path / "out")
    assert [p.name for p in paths] == ["ct.nii.gz", "ct_seg.dcm"]
    reread = readers.discover(series, "dicom", {"label": str(paths[1])})
    assert reread.cases[0].label_kind == "seg" and reread.label_values == [0, 1, 2]
    assert np.array_equal(readers.load_case(reread.cases[0]).label, values)
