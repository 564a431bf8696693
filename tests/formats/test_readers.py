"""Readers: every format gives the same CaseData; errors name the file; labels keep their source values on record."""

import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from builders import NRRD_PAIRS, make_brats, make_msd, make_nnunet, make_png, write_nifti
from conftest import SAMPLE, SHARED_DATA
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from utils import formats as readers
from utils import geometry
from utils.formats import CaseError
from utils.formats.base import build_label_lookup
from utils.formats.dicom import read_dicom_series, scan_dicom
from utils.formats.itk import sitk_geometry

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data folder {SHARED_DATA} is not in this checkout"
)
PYRADIOMICS = SHARED_DATA / "pyradiomics"
TOTALSEG = SHARED_DATA / "totalsegmentator"
DCMQI = SHARED_DATA / "dcmqi"


def counts_by_value(label: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(label, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def test_msd_sample_reads_as_stored():
    source = readers.discover(SAMPLE)
    assert source.format == "msd" and len(source.cases) == 40
    assert source.labels == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert source.label_values == [0, 1, 2]
    spec = source.cases[0]
    case = readers.load_case(spec, {0, 1, 2})
    raw = nib.load(spec.label)
    assert case.image.shape == tuple(reversed(raw.shape)) + (1,) and case.image.dtype == np.float32
    assert counts_by_value(case.label) == counts_by_value(np.asarray(raw.dataobj))
    assert np.allclose(case.affine, geometry.nifti_affine_to_zyx(raw.affine))
    assert case.writer == {"kind": "nifti", "reference": spec.label}


@pytest.mark.parametrize("stored", [np.int16, np.uint8, np.float64])
def test_images_read_as_float32_or_as_their_integers(tmp_path, stored):
    root = make_msd(tmp_path / "ds")
    values = np.arange(4 * 5 * 6).reshape(4, 5, 6) - 60
    write_nifti(root / "imagesTr" / "case_0.nii.gz", values, dtype=stored)
    spec = readers.discover(root).cases[0]
    expected = values.astype(stored)[..., None]
    case = readers.load_case(spec)
    assert case.image.dtype == np.float32 and np.array_equal(case.image, expected.astype(np.float32))
    kept = readers.load_case(spec, integers=True)
    assert kept.image.dtype == (np.float32 if stored == np.float64 else stored)
    assert np.array_equal(kept.image, expected)


def test_msd_missing_label_file_is_named(tmp_path):
    root = make_msd(tmp_path / "ds")
    (root / "labelsTr" / "case_1.nii.gz").unlink()
    source = readers.discover(root)  # the missing file is that case's failure; the other case reads
    assert [c.id for c in source.cases] == ["case_0", "case_1"] and readers.load_case(source.cases[0]).label.any()
    with pytest.raises(CaseError, match=r"dataset\.json: lists label .*case_1\.nii\.gz.* does not exist"):
        readers.load_case(source.cases[1])


def test_msd_dataset_json_naming_a_missing_image(tmp_path):
    root = make_msd(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/case_0.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    ghost = readers.discover(root).cases[-1]
    assert ghost.id == "ghost"
    with pytest.raises(CaseError, match=r"dataset\.json: lists \./imagesTr/ghost\.nii\.gz"):
        readers.load_case(ghost)


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_msd_paths_out_of_the_dataset_folder_are_refused_unread(tmp_path, how, monkeypatch):
    root = make_msd(tmp_path / "ds")
    secret = tmp_path / "secret.nii.gz"
    shutil.copy(root / "imagesTr" / "case_0.nii.gz", secret)
    meta = json.loads((root / "dataset.json").read_text())
    if how == "dotdot":
        meta["training"].append({"image": "./imagesTr/../../secret.nii.gz", "label": "./labelsTr/case_0.nii.gz"})
    else:
        (root / "imagesTr" / "secret.nii.gz").symlink_to(secret)
        meta["training"].append({"image": "./imagesTr/secret.nii.gz", "label": "./labelsTr/case_0.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    opened = []
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: opened.append(str(path)))
    source = readers.discover(root)
    assert source.cases[-1].id == "secret" and source.cases[-1].error
    with pytest.raises(CaseError, match=r"secret\.nii\.gz: escapes the dataset folder"):
        readers.load_case(source.cases[-1])
    assert not opened


def test_image_label_shape_mismatch_names_both_files(tmp_path):
    root = make_msd(tmp_path / "ds")
    write_nifti(root / "labelsTr" / "case_0.nii.gz", np.zeros((4, 5, 7), np.uint8))
    spec = readers.discover(root).cases[0]
    with pytest.raises(CaseError, match=r"labelsTr/case_0\.nii\.gz: shape \(4, 5, 7\) differs from .*imagesTr"):
        readers.load_case(spec)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (np.full((4, 5, 6), 0.5, np.float32), "non-integer values"),
        (np.full((4, 5, 6), 3, np.uint8), r"label values \[3\] are not among the dataset's labels \[0, 1, 2\]"),
    ],
)
def test_bad_label_values_are_refused(tmp_path, label, message):
    root = make_msd(tmp_path / "ds")
    write_nifti(root / "labelsTr" / "case_0.nii.gz", label)
    spec = readers.discover(root).cases[0]
    with pytest.raises(CaseError, match=message):
        readers.load_case(spec, {0, 1, 2})


@pytest.mark.parametrize(
    ("values", "label_map", "binarize", "lookup", "label_values"),
    [
        ([1, 2], None, False, {0: 0, 1: 1, 2: 2}, [0, 1, 2]),
        ([1, 7, 8, 9], None, False, {0: 0, 1: 1, 7: 2, 8: 3, 9: 4}, [0, 1, 7, 8, 9]),
        ([1, 2, 4], {4: 3}, False, {0: 0, 1: 1, 2: 2, 4: 3}, [0, 1, 2, 4]),
        ([1, 2, 4], None, True, {0: 0, 1: 1, 2: 1, 4: 1}, [0, 1]),
        ([255], None, False, {0: 0, 255: 1}, [0, 255]),
        ([1, 2, 3], {3: 1}, False, {0: 0, 1: 1, 2: 2, 3: 1}, [0, 1, 2]),
    ],
)
def test_label_lookup_makes_classes_contiguous(values, label_map, binarize, lookup, label_values):
    assert build_label_lookup(values, label_map, binarize) == (lookup, label_values)


def test_non_contiguous_msd_labels_are_remapped(tmp_path):
    root = make_msd(tmp_path / "ds", labels=((0, 4),))
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "4": "enhancing"}
    (root / "dataset.json").write_text(json.dumps(meta))
    source = readers.discover(root)
    assert source.labels == {"0": "background", "1": "enhancing"} and source.label_values == [0, 4]
    case = readers.load_case(source.cases[0], {0, 1})
    assert counts_by_value(case.label) == {0: 115, 1: 5}
    assert case.writer["label_values"] == [0, 4]


@needs_shared
def test_files_pairs_by_pattern_and_remaps_prostate_labels():
    source = readers.discover(PYRADIOMICS, "files", NRRD_PAIRS)
    assert [c.id for c in source.cases] == ["brain1", "breast1", "lung1", "prostate_phantom"]
    assert source.label_values == [0, 1, 7, 8, 9]
    assert source.labels == {"0": "background", "1": "label_1", "2": "label_7", "3": "label_8", "4": "label_9"}
    spec = source.cases[3]
    case = readers.load_case(spec, set(range(5)))
    raw_label = sitk.ReadImage(spec.label)
    raw = counts_by_value(sitk.GetArrayFromImage(raw_label))
    assert {source.label_values[k]: n for k, n in counts_by_value(case.label).items()} == raw
    assert case.image.shape == (13, 67, 82, 1)
    geo = sitk_geometry(raw_label)
    assert np.allclose(case.affine, geometry.affine_from_sitk(geo["spacing"], geo["origin"], geo["direction"]))
    assert geometry.axcodes(case.affine) == ("S", "A", "R")  # LPS direction (-1, -1, 1): RAS axes
    assert case.writer["kind"] == "sitk" and case.writer["extension"] == ".nrrd"
    assert case.writer["spacing"] == list(raw_label.GetSpacing())
    assert case.writer["label_values"] == [0, 1, 7, 8, 9]


@needs_shared
def test_files_default_patterns_are_detected():
    assert readers.detect_format(PYRADIOMICS) == "files"
    source = readers.discover(PYRADIOMICS)
    assert [c.id for c in source.cases] == ["brain1", "breast1", "lung1"]
    case = readers.load_case(source.cases[1])
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(PYRADIOMICS / "breast1_label.nrrd")))
    assert np.array_equal(case.label, expected)


def _write_sitk(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def test_files_label_on_another_grid_is_refused(tmp_path):
    _write_sitk(tmp_path / "a_image.mha", np.zeros((3, 4, 5), np.int16))
    _write_sitk(tmp_path / "a_label.mha", np.zeros((3, 4, 5), np.uint8), spacing=(2.0, 1.0, 1.0))
    spec = readers.discover(tmp_path, "files").cases[0]
    with pytest.raises(CaseError, match=r"a_label\.mha: geometry .* differs from .*a_image\.mha"):
        readers.load_case(spec)


def test_files_single_image_with_label_and_patient_pattern(tmp_path):
    image = _write_sitk(tmp_path / "pat7_scan.nrrd", np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    label = _write_sitk(tmp_path / "seg.nrrd", (np.arange(60).reshape(3, 4, 5) % 3 == 0).astype(np.uint8) * 2)
    source = readers.discover(image, "auto", {"label": str(label), "patient_pattern": r"pat(\d+)"})
    assert source.format == "files" and len(source.cases) == 1
    assert source.cases[0].patient == "7"
    case = readers.load_case(source.cases[0])
    assert source.label_values == [0, 2] and counts_by_value(case.label) == {0: 40, 1: 20}
    assert np.array_equal(case.image[..., 0], np.arange(60).reshape(3, 4, 5))


@needs_shared
def test_hdf5_sts_layout_reads_ct_channel_at_5mm():
    path = SHARED_DATA / "sts_layout" / "lab_petct_vox_5.00mm.h5"
    assert readers.detect_format(path.parent) == "hdf5"
    source = readers.discover(path, "auto", {"binarize": True})
    assert source.channels == {"0": "CT"} and [c.id for c in source.cases] == ["STS_101", "STS_102"]
    assert source.cases[0].spacing == [5.0, 5.0, 5.0] and source.cases[0].spacing_from == "file name"
    case = readers.load_case(source.cases[1], {0, 1})
    with h5py.File(path) as handle:
        ct, label = handle["ct_data/STS_102"][()], handle["label_data/STS_102"][()]
    assert np.array_equal(case.image[..., 0], ct) and counts_by_value(case.label) == counts_by_value(label > 0)
    assert case.spacing == (5.0, 5.0, 5.0) and geometry.axcodes(case.affine) == ("S", "A", "R")
    assert case.writer["key"] == "label_data/STS_102" and case.writer["shape"] == list(label.shape)


@needs_shared
def test_hdf5_stacked_samples_become_one_slice_cases():
    path = SHARED_DATA / "msd_lung_patches" / "test_patches.h5"
    source = readers.discover(path, "hdf5", {"source_spacing": [2.0]})
    assert len(source.cases) == 130 and source.cases[5].id == "test_patches_0005"
    case = readers.load_case(source.cases[5], {0, 1})
    with h5py.File(path) as handle:
        image, label = handle["images"][5], handle["labels"][5]
    assert case.image.shape == (1, 48, 48, 1) and np.array_equal(case.image[0, ..., 0], image[0])
    assert np.array_equal(case.label[0], label[0].astype(np.uint8)) and case.spacing == (2.0, 2.0, 2.0)
    assert case.writer == {
        "kind": "hdf5",
        "reference": str(path.resolve()),
        "key": "labels",
        "shape": [1, 1, 48, 48],
        "dtype": "float64",
    }


def test_hdf5_named_keys_per_patient_groups_and_attributes(tmp_path):
    path = tmp_path / "study.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["spacing"] = [3.0, 1.0, 1.0]
        for name, offset in (("P1", 0), ("P2", 10)):
            group = handle.create_group(name)
            group["ct"] = np.full((2, 3, 4), offset, np.float32)
            group["pet"] = np.full((2, 3, 4), offset + 1, np.float32)
            group["seg"] = np.eye(3, 4, dtype=np.uint8)[None].repeat(2, 0) * 5
    options = {"hdf5_image_keys": ["ct", "pet"], "hdf5_label_key": "seg"}
    source = readers.discover(path, "hdf5", options)
    assert source.channels == {"0": "CT", "1": "PET"} and source.label_values == [0, 5]
    case = readers.load_case(source.cases[1])
    assert case.image.shape == (2, 3, 4, 2) and case.image[0, 0, 0].tolist() == [10.0, 11.0]
    assert case.spacing == (3.0, 1.0, 1.0) and counts_by_value(case.label) == {0: 18, 1: 6}


def test_hdf5_missing_modality_fails_that_case_only(tmp_path):
    path = tmp_path / "sts.h5"
    with h5py.File(path, "w") as handle:
        for patient in ("STS_1", "STS_2"):
            handle[f"ct_data/{patient}"] = np.zeros((2, 3, 3), np.float32)
            handle[f"label_data/{patient}"] = np.zeros((2, 3, 3), np.uint8)
        handle["pet_data/STS_1"] = np.ones((2, 3, 3), np.float32)
    source = readers.discover(path)
    assert source.channels == {"0": "CT", "1": "PET"}
    assert readers.load_case(source.cases[0]).image.shape == (2, 3, 3, 2)
    with pytest.raises(CaseError, match=r"sts\.h5: dataset 'pet_data/STS_2' not found"):
        readers.load_case(source.cases[1])


def test_hdf5_unknown_layout_lists_the_keys(tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as handle:
        handle["volume_a"] = np.zeros((2, 2, 2))
    with pytest.raises(ValueError, match=r"odd\.h5: cannot tell the HDF5 layout \(top-level keys \['volume_a'\]\)"):
        readers.discover(path)


@pytest.mark.parametrize("label_map", [None, {4: 3}])
def test_brats_folders_give_four_channels_and_classes(tmp_path, label_map):
    root = make_brats(tmp_path / "brats")
    assert readers.detect_format(root) == "brats"
    source = readers.discover(root, "auto", {"label_map": label_map})
    assert source.channels == {"0": "FLAIR", "1": "T1", "2": "T1CE", "3": "T2"}
    assert source.labels["3"] == "enhancing tumour" and source.label_values == [0, 1, 2, 4]
    case = readers.load_case(source.cases[1], {0, 1, 2, 3})
    assert case.image[0, 0, 0].tolist() == [2.0, 12.0, 22.0, 32.0]
    assert counts_by_value(case.label) == {0: 56, 1: 1, 2: 1, 3: 2}


def test_brats_2023_names(tmp_path):
    root = make_brats(tmp_path / "brats", ("BraTS-GLI-00000-000",), ("t1c", "t1n", "t2f", "t2w"), sep="-")
    source = readers.discover(root)
    assert source.channels == {"0": "T2F", "1": "T1N", "2": "T1C", "3": "T2W"}
    assert source.label_values == [0, 1, 2, 3]  # BraTS 2023 labels; this file also holds a 4 (the 2020 value)
    with pytest.raises(CaseError, match=r"-seg\.nii\.gz: label values \[4\] are not among the dataset's labels"):
        readers.load_case(source.cases[0], {0, 1, 2, 3})


def test_brats_missing_modality_names_the_folder(tmp_path):
    root = make_brats(tmp_path / "brats")
    (root / "BraTS20_002" / "BraTS20_002_t1ce.nii.gz").unlink()
    source = readers.discover(root)
    assert readers.load_case(source.cases[0]).image.shape[-1] == 4
    with pytest.raises(CaseError, match=r"BraTS20_002: BraTS case lacks the t1ce image"):
        readers.load_case(source.cases[1])


@pytest.fixture(scope="module")
def totalseg_dicom():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is not in this checkout")
    options = {"label": str(TOTALSEG / "example_seg_dicom.nii.gz")}
    source = readers.discover(TOTALSEG / "example_ct_dicom", "auto", options)
    return source, readers.load_case(source.cases[0], set(range(len(source.labels))))


def test_dicom_series_with_flipped_nifti_label(totalseg_dicom):
    source, case = totalseg_dicom
    assert source.format == "dicom" and source.channels == {"0": "CT"}
    assert case.image.shape == (20, 512, 512, 1) and case.image.min() == -1024  # HU after rescale
    assert geometry.axcodes(case.affine) == ("S", "P", "L")
    seg = nib.load(str(TOTALSEG / "example_seg_dicom.nii.gz"))
    assert nib.aff2axcodes(seg.affine) == ("L", "A", "S")
    values = np.asarray(source.label_values)[case.label]
    assert counts_by_value(values) == counts_by_value(np.asarray(seg.dataobj))
    assert np.array_equal(values, np.transpose(np.asarray(seg.dataobj), (2, 1, 0))[:, ::-1, :])


@needs_shared
def test_dicom_seg_beside_the_series_is_found_and_matches_the_nrrd():
    source = readers.discover(DCMQI)
    assert source.format == "dicom" and source.labels == {"0": "background", "1": "Liver"}
    spec = source.cases[0]
    assert spec.label_kind == "seg" and spec.patient == "99000" and len(spec.image) == 3
    case = readers.load_case(spec, {0, 1})
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(DCMQI / "liver_seg.nrrd")))
    assert np.array_equal(case.label, expected)
    assert case.image.min() == -3024 and case.writer["kind"] == "dicom"


@needs_shared
def test_dicom_label_file_option_and_overlap_check(tmp_path):
    options = {"label": str(DCMQI / "liver_spine_seg.nrrd")}
    source = readers.discover(DCMQI / "ct-3slice", "dicom", options)
    case = readers.load_case(source.cases[0])
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(DCMQI / "liver_spine_seg.nrrd")))
    assert np.array_equal(case.label, expected) and source.label_values == [0, 1, 2]
    far = _write_sitk(tmp_path / "far.nrrd", np.ones((3, 4, 4), np.uint8), origin=(5000.0, 0.0, 0.0))
    spec = readers.discover(DCMQI / "ct-3slice", "dicom", {"label": str(far)}).cases[0]
    with pytest.raises(CaseError, match=r"far\.nrrd: the label does not overlap the image"):
        readers.load_case(spec)


def write_rtstruct(path, series_dir, contours):
    """An RTSTRUCT on a series: ``contours`` = ``{roi name: [(slice, [(row, col), ...]), ...]}`` in voxel units."""
    files = sorted(series_dir.iterdir())
    reference = pydicom.dcmread(files[0], stop_before_pixels=True)
    image = read_dicom_series(scan_dicom(series_dir)[0][0]["files"], str(series_dir))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "RTSTRUCT", reference.PatientID, generate_uid()
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = reference.StudyInstanceUID, reference.FrameOfReferenceUID
    series = Dataset()
    series.SeriesInstanceUID = reference.SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = reference.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for number, (name, items) in enumerate(contours.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        ds.StructureSetROISequence.append(roi)
        contour_roi = Dataset()
        contour_roi.ReferencedROINumber = number
        contour_roi.ContourSequence = []
        for z, points in items:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            physical = [image.TransformContinuousIndexToPhysicalPoint((col, row, z)) for row, col in points]
            contour.NumberOfContourPoints = len(physical)
            contour.ContourData = [round(v, 4) for point in physical for v in point]
            contour_roi.ContourSequence.append(contour)
        ds.ROIContourSequence.append(contour_roi)
    ds.save_as(path, enforce_file_format=True)
    return path


def _square(r0, c0, r1, c1):
    return [(r0 - 0.5, c0 - 0.5), (r0 - 0.5, c1 - 0.5), (r1 - 0.5, c1 - 0.5), (r1 - 0.5, c0 - 0.5)]


@needs_shared
def test_rtstruct_contours_are_rasterised_with_holes(tmp_path):
    series_dir = tmp_path / "ct"
    shutil.copytree(DCMQI / "ct-3slice", series_dir)
    rois = {
        "tumour": [(1, _square(100, 150, 200, 250)), (1, _square(120, 170, 140, 190))],
        "node": [(2, _square(10, 10, 20, 30))],
    }
    write_rtstruct(series_dir / "rtstruct.dcm", series_dir, rois)
    source = readers.discover(series_dir)
    assert source.labels == {"0": "background", "1": "tumour", "2": "node"}
    case = readers.load_case(source.cases[0], {0, 1, 2})
    assert source.cases[0].label_kind == "rtstruct" and source.cases[0].rtstruct_rois == {"tumour": 1, "node": 2}
    assert_specs_round_trip(source)
    assert counts_by_value(case.label[1]) == {0: 512 * 512 - 10000 + 400, 1: 10000 - 400}
    assert counts_by_value(case.label[2]) == {0: 512 * 512 - 200, 2: 200}
    assert case.label[1, 100, 150] == 1 and case.label[1, 130, 180] == 0 and not case.label[0].any()


@needs_shared
def test_dicom_label_option_needs_a_single_series(tmp_path):
    for name in ("a", "b"):
        shutil.copytree(DCMQI / "ct-3slice", tmp_path / "study" / name)
        for file in (tmp_path / "study" / name).iterdir():
            ds = pydicom.dcmread(file)
            ds.SeriesInstanceUID = f"1.2.3.{ord(name)}"
            ds.save_as(file)
    assert len(readers.discover(tmp_path / "study").cases) == 2
    with pytest.raises(ValueError, match=r"study: holds 2 series; --label fits one series only"):
        readers.discover(tmp_path / "study", "dicom", {"label": str(DCMQI / "liver_seg.nrrd")})


def test_png_slices_are_stacked_per_patient_in_slice_order(tmp_path):
    root = make_png(tmp_path / "png", rgb=True)
    assert readers.detect_format(root) == "png"
    source = readers.discover(root, "auto", {"patient_pattern": r"STS_(\d+)_(\d+)", "source_spacing": [5, 1, 1]})
    assert [(c.id, c.patient) for c in source.cases] == [("STS_001", "001"), ("STS_002", "002")]
    assert source.label_values == [0, 255] and source.channels == {"0": "image"}
    case = readers.load_case(source.cases[0], {0, 1})
    assert case.image.shape == (3, 6, 8, 1) and case.image[:, 0, 0, 0].tolist() == [10, 20, 100]
    assert case.label.reshape(3, -1).sum(axis=1).tolist() == [1, 2, 10] and case.spacing == (5.0, 1.0, 1.0)
    assert case.writer["files"] == ["STS_001_1_.png", "STS_001_2_.png", "STS_001_10_.png"]


def test_png_without_slice_group_gives_one_slice_cases_grouped_by_patient(tmp_path):
    root = make_png(tmp_path / "png")
    source = readers.discover(root / "images", "png", {"label": str(root / "masks"), "patient_pattern": r"STS_(\d+)"})
    assert [c.patient for c in source.cases] == ["001", "001", "001", "002"]
    assert all(readers.load_case(c).image.shape == (1, 6, 8, 1) for c in source.cases)


def test_png_bad_masks_are_named(tmp_path):
    root = make_png(tmp_path / "png")
    (root / "masks" / "STS_001_2_.png").unlink()
    source = readers.discover(root, "png", {"patient_pattern": r"STS_(\d+)_(\d+)"})
    assert readers.load_case(source.cases[1]).label.sum() == 3
    with pytest.raises(CaseError, match=r"STS_001_2_\.png: has no mask while other slices of 'STS_001' have one"):
        readers.load_case(source.cases[0])
    Image.fromarray(np.full((6, 8, 3), [0, 0, 255], np.uint8)).save(root / "masks" / "STS_001_2_.png")
    Image.fromarray(np.zeros((5, 8), np.uint8)).save(root / "masks" / "STS_001_1_.png")
    cases = {c.id: c for c in readers.discover(root, "png").cases}
    with pytest.raises(CaseError, match=r"STS_001_2_\.png: a mask must be greyscale"):
        readers.load_case(cases["STS_001_2"])
    with pytest.raises(CaseError, match=r"STS_001_1_\.png: size \(5, 8\) differs from its image .*\(6, 8\)"):
        readers.load_case(cases["STS_001_1"])
    assert readers.load_case(cases["STS_001_10"]).label.sum() == 10


def test_detect_format_refuses_unknown_input(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot tell the input format; pass --format"):
        readers.detect_format(tmp_path)
    with pytest.raises(FileNotFoundError, match="input not found"):
        readers.discover(tmp_path / "missing")


def assert_specs_round_trip(source):
    """Every case spec of ``source`` writes plain JSON that reads back to the same spec."""
    for spec in source.cases:
        data = json.loads(json.dumps(spec.to_json()))
        assert data == spec.to_json() and readers.CaseSpec.from_json(data) == spec


def unreadable_hdf5_folder(tmp_path):
    folder = tmp_path / "h5"
    folder.mkdir()
    with h5py.File(folder / "a.h5", "w") as handle:
        handle["ct_data/STS_1"] = np.zeros((2, 3, 3), np.float32)
    (folder / "b.h5").write_bytes(b"not an HDF5 file")
    return folder, "hdf5", {}


SPEC_SOURCES = {
    "msd": (lambda tmp: (SAMPLE, "msd", {}), False, ["id", "patient", "format", "image", "label"]),
    "files": (lambda tmp: (PYRADIOMICS, "files", NRRD_PAIRS), True, ["label_lookup", "label_values"]),
    "hdf5": (lambda tmp: (SHARED_DATA / "sts_layout" / "lab_petct_vox_5.00mm.h5", "hdf5", {}), True, ["hdf5"]),
    "hdf5-stacked": (
        lambda tmp: (SHARED_DATA / "msd_lung_patches" / "test_patches.h5", "hdf5", {}),
        True,
        ["hdf5", "spacing", "spacing_from"],
    ),
    "hdf5-unreadable": (unreadable_hdf5_folder, False, ["error"]),
    "dicom-seg": (lambda tmp: (DCMQI, "dicom", {}), True, ["label_kind", "series_uid", "label_names"]),
    "dicom-unlabelled": (lambda tmp: (TOTALSEG / "example_ct_dicom", "dicom", {}), True, ["label_kind"]),
    "png": (
        lambda tmp: (make_png(tmp / "png"), "png", {"patient_pattern": r"STS_(\d+)_(\d+)"}),
        False,
        ["masks", "channels", "label_lookup"],
    ),
    "brats": (lambda tmp: (make_brats(tmp / "brats"), "brats", {}), False, ["label_lookup", "label_values"]),
    "nnunet": (lambda tmp: (make_nnunet(tmp / "nn", SAMPLE, channels=2), "nnunet", {}), False, ["image", "label"]),
    "folders": (lambda tmp: (PYRADIOMICS, "folders", {}), True, ["label_lookup", "label_values"]),
}


@pytest.mark.parametrize("name", list(SPEC_SOURCES))
def test_case_specs_of_every_format_round_trip_through_json(name, tmp_path):
    make, shared, keys = SPEC_SOURCES[name]
    if shared and not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is not in this checkout")
    source = readers.discover(*make(tmp_path))
    assert_specs_round_trip(source)
    assert all(key in source.cases[-1].to_json() for key in keys)
    if name == "dicom-unlabelled":  # as discovery always wrote it for DICOM
        assert source.cases[0].to_json()["label_kind"] is None


def test_a_case_spec_refuses_unknown_missing_and_mistyped_keys():
    data = readers.discover(SAMPLE).cases[0].to_json()
    with pytest.raises(ValueError, match=r"^case 'hippocampus_001': unknown key 'lable' \(known keys: id, patient"):
        readers.CaseSpec.from_json({**data, "lable": data["label"]})
    with pytest.raises(ValueError, match=r"^case 'hippocampus_001': missing key 'format'$"):
        readers.CaseSpec.from_json({k: v for k, v in data.items() if k != "format"})
    with pytest.raises(ValueError, match=r"key 'channels' must be int \| None, got '3'"):
        readers.CaseSpec.from_json({**data, "channels": "3"})
    with pytest.raises(ValueError, match=r"case 'x': hdf5: unknown key 'indices'"):
        readers.CaseSpec.from_json({**data, "id": "x", "hdf5": {"image": ["ct"], "label": None, "indices": 3}})
    assert readers.CaseSpec.from_json({k: v for k, v in data.items() if k != "patient"}).patient == "hippocampus_001"


def test_load_case_takes_a_spec_or_its_json():
    spec = readers.discover(SAMPLE).cases[1]
    typed, plain = readers.load_case(spec, {0, 1, 2}), readers.load_case(spec.to_json(), {0, 1, 2})
    assert np.array_equal(typed.image, plain.image) and np.array_equal(typed.label, plain.label)
    assert typed.writer == plain.writer
