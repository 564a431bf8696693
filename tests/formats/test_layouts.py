"""Layouts that need no pattern: nnU-Net v2 raw datasets, plain paired folders, pairs side by side, images alone, and
channels in separate files; each recognised by ``--format auto``, a mismatched pair failing alone with both files
named."""

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from builders import entry_and_values, hippocampus_subset, label_reader, make_nnunet, write_nifti
from conftest import SAMPLE, SHARED_DATA
from PIL import Image

import data_gen
import evaluation
from utils import formats as readers
from utils.cli import reader_options
from utils.evaluate.options import Options
from utils.evaluate.predict import READER_OPTIONS, predict_images
from utils.formats import CaseError
from utils.formats.channels import group_channels
from utils.formats.nnunet import nnunet_labels

PROSTATE = SHARED_DATA / "pyradiomics" / "prostate_phantom_subvolume"


def sample_arrays(case: str) -> tuple[np.ndarray, np.ndarray]:
    """The shipped sample's image and label of ``hippocampus_<case>`` as the MSD reader gives them."""
    spec = next(s for s in readers.discover(SAMPLE, "msd").cases if s.id == f"hippocampus_{case}")
    loaded = readers.load_case(spec)
    return loaded.image[..., 0], loaded.label


def copy_sample(folder, cases, labels_to=None):
    """Copy sample images into ``folder`` and their labels into ``labels_to``, under the same names."""
    for case in cases:
        name = f"hippocampus_{case}.nii.gz"
        for source, target in (("imagesTr", folder), ("labelsTr", labels_to)):
            if target is not None:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(SAMPLE / source / name, target / name)


def test_nnunet_v2_raw_dataset_is_detected_and_reads_every_channel(tmp_path):
    root = make_nnunet(tmp_path / "Dataset004_Hippocampus", SAMPLE, channels=2)
    assert readers.detect_format(root) == "nnunet"
    source = readers.discover(root)
    assert source.format == "nnunet" and source.name == "Hippocampus"
    assert [c.id for c in source.cases] == ["hippocampus_001", "hippocampus_011", "hippocampus_020", "hippocampus_034"]
    assert source.channels == {"0": "MRI", "1": "MRI x2"}
    assert source.labels == {"0": "background", "1": "Anterior", "2": "Posterior"} and source.label_values == [0, 1, 2]
    case = readers.load_case(source.cases[1])
    image, label = sample_arrays("011")
    np.testing.assert_array_equal(case.image[..., 0], image)
    np.testing.assert_array_equal(case.image[..., 1], 2 * image)
    np.testing.assert_array_equal(case.label, label)
    assert source.cases[3].label is None and readers.load_case(source.cases[3]).label is None  # imagesTs


def test_nnunet_region_labels_name_the_values_they_are_written_as(tmp_path, caplog):
    regions = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    values, names = nnunet_labels(regions, [1, 2, 3], tmp_path / "dataset.json")
    assert values == [0, 1, 2, 3]
    assert names == {0: "background", 3: "enhancing tumor", 1: "whole tumor", 2: "tumor core"}
    assert nnunet_labels(regions, None, tmp_path)[1] == {0: "background", 3: "enhancing tumor"}
    with pytest.raises(ValueError, match=r"dataset\.json: label 'core' must be a value or a list of values, got 'x'"):
        nnunet_labels({"background": 0, "core": "x"}, None, tmp_path / "dataset.json")
    with pytest.raises(ValueError, match="has no background entry 0"):
        nnunet_labels({"liver": 1}, None, tmp_path / "dataset.json")
    with caplog.at_level(logging.WARNING):
        assert nnunet_labels({"background": 0, "liver": 1, "ignore": 2}, None, tmp_path)[1][2] == "ignore"
    assert "label 'ignore' (2) is learned and scored as a class here" in caplog.text
    root = make_nnunet(tmp_path / "regions", SAMPLE, cases=("001",), test_cases=(), labels=regions)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "regions_class_order": [1, 2, 3]}))
    source = readers.discover(root)
    assert source.labels == {"0": "background", "1": "whole tumor", "2": "tumor core", "3": "enhancing tumor"}


def test_nnunet_missing_channel_or_label_fails_that_case_naming_both_files(tmp_path, caplog):
    root = make_nnunet(tmp_path / "nn", SAMPLE, channels=2)
    (root / "imagesTr" / "hippocampus_011_0001.nii.gz").unlink()
    (root / "labelsTr" / "hippocampus_020.nii.gz").rename(root / "labelsTr" / "hippocampus_999.nii.gz")
    with caplog.at_level(logging.WARNING):
        cases = {c.id: c for c in readers.discover(root, "nnunet").cases}
    assert "hippocampus_999.nii.gz: label without an image (expected " in caplog.text
    with pytest.raises(CaseError, match=r"hippocampus_011_0001\.nii\.gz: channel file missing \(case hippocampus_011 "
                       r"has hippocampus_011_0000\.nii\.gz; dataset\.json lists 2 channel"):  # fmt: skip
        readers.load_case(cases["hippocampus_011"])
    with pytest.raises(CaseError, match=r"labelsTr/hippocampus_020\.nii\.gz: label missing for .*imagesTr/"
                       r"hippocampus_020_0000\.nii\.gz"):  # fmt: skip
        readers.load_case(cases["hippocampus_020"])
    assert readers.load_case(cases["hippocampus_001"]).image.shape[-1] == 2


def test_nnunet_dataset_entry_lists_files_anywhere_in_the_folder(tmp_path):
    root = make_nnunet(tmp_path / "nn", SAMPLE, cases=("001", "011"), test_cases=())
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {
        "first": {"images": ["imagesTr/hippocampus_011_0000.nii.gz"], "label": "labelsTr/hippocampus_011.nii.gz"},
        "gone": {"images": ["imagesTr/nothing_0000.nii.gz"], "label": "labelsTr/hippocampus_001.nii.gz"},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    cases = readers.discover(root).cases
    assert [c.id for c in cases] == ["first", "gone"]
    np.testing.assert_array_equal(readers.load_case(cases[0]).label, sample_arrays("011")[1])
    with pytest.raises(CaseError, match=r"case gone lists .*nothing_0000\.nii\.gz, which does not exist"):
        readers.load_case(cases[1])


@pytest.mark.parametrize("rgb", [False, True])
def test_nnunet_2d_png_datasets_read_as_one_slice_volumes(tmp_path, rgb):
    image, label = sample_arrays("001")
    grey = np.clip(255 * image[10] / image.max(), 0, 255).astype(np.uint8)  # a real axial slice
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    pixels = np.stack([grey, grey // 2, 255 - grey], -1) if rgb else grey
    Image.fromarray(pixels).save(tmp_path / "imagesTr" / "s1_0000.png")
    Image.fromarray(label[10].astype(np.uint8)).save(tmp_path / "labelsTr" / "s1.png")
    names = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "grey"}
    meta = {"channel_names": names, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".png"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    source = readers.discover(tmp_path)
    case = readers.load_case(source.cases[0])
    assert source.format == "nnunet" and case.image.shape == (1, *grey.shape, 3 if rgb else 1)
    np.testing.assert_array_equal(case.image[0, ..., -1], 255 - grey if rgb else grey)
    np.testing.assert_array_equal(case.label[0], label[10])
    entry, values = entry_and_values(source)
    written = readers.write_mask(values, entry, tmp_path / "out")
    assert [p.name for p in written] == ["s1.nii.gz", "s1.nrrd"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written[1]))), label[10])


def test_data_gen_prepares_an_nnunet_folder_with_no_pattern_flags(tmp_path):
    root = make_nnunet(tmp_path / "nn", SAMPLE, channels=2)
    out = tmp_path / "prepared"
    assert data_gen.main(["--input", str(root), "--output", str(out), "--spacing", "original", "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["format"] == "nnunet" and len(manifest["cases"]) == 4
    assert manifest["channels"] == {"0": "MRI", "1": "MRI x2"}
    volume = np.load(out / manifest["cases"][0]["image"])
    assert volume.shape[-1] == 2
    np.testing.assert_allclose(volume[..., 1], volume[..., 0], atol=1e-4)  # per-channel z-score undoes the x2
    assert "hippocampus_034" in json.loads((out / "splits.json").read_text())["test"]  # imagesTs: unlabelled


def test_the_same_cases_as_msd_nnunet_and_plain_folders_prepare_to_the_same_volumes(tmp_path):
    cases = ("001", "011", "020")
    plain = tmp_path / "plain"
    copy_sample(plain / "imagesTr", cases, plain / "labelsTr")
    inputs = {
        "msd": hippocampus_subset(tmp_path / "msd", SAMPLE, cases),
        "nnunet": make_nnunet(tmp_path / "nnunet", SAMPLE, cases, test_cases=()),
        "folders": plain,
    }
    prepared = {}
    for name, root in inputs.items():
        out = tmp_path / f"prepared_{name}"
        assert data_gen.main(["--input", str(root), "--output", str(out), "--workers", "1", "--seed", "3"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["source"]["format"] == name
        prepared[name] = {c["id"]: (out / c["image"], out / c["label"], c["geometry"]) for c in manifest["cases"]}
    for name in ("nnunet", "folders"):
        assert sorted(prepared[name]) == sorted(prepared["msd"])
        for case_id, (image, label, geometry) in prepared["msd"].items():
            other = prepared[name][case_id]
            np.testing.assert_array_equal(np.load(other[0]), np.load(image))
            np.testing.assert_array_equal(np.load(other[1]), np.load(label))
            assert other[2] == geometry


@pytest.mark.parametrize(
    ("images", "labels", "flag"),
    [("imagesTr", "labelsTr", False), ("images", "labels", False), ("scans", "segs", True), ("x", "y", True)],
)
def test_paired_folders_match_by_case_name(tmp_path, images, labels, flag):
    root = tmp_path / "plain"
    copy_sample(root / images, ("001", "020"), root / labels)
    if images == "x":  # names the files layout's default pattern would take: --label still pairs by case name
        for folder in (root / images, root / labels):
            for file in folder.iterdir():
                file.rename(file.with_name(file.name.replace(".nii.gz", "_image.nii.gz")))
    assert readers.detect_format(root) == ("files" if images == "x" else "folders")
    options = {"label": str(root / labels)} if flag else {}
    source = readers.discover(root / images if flag else root, "auto", options)
    assert source.format == "folders" and [c.id for c in source.cases] == ["hippocampus_001", "hippocampus_020"]
    assert source.label_values == [0, 1, 2] and source.channels == {"0": "image"}
    image, label = sample_arrays("020")
    case = readers.load_case(source.cases[1])
    np.testing.assert_array_equal(case.image[..., 0], image)
    np.testing.assert_array_equal(case.label, label)


def test_paired_folders_with_channel_files_labels_named_seg_and_unlabelled_test_images(tmp_path):
    root = tmp_path / "plain"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for case, folder in (("001", "imagesTr"), ("011", "imagesTr"), ("034", "imagesTs")):
        image = nib.load(SAMPLE / "imagesTr" / f"hippocampus_{case}.nii.gz")
        for c in range(2):
            data = np.asarray(image.dataobj, np.float32) * (c + 1)
            nib.save(nib.Nifti1Image(data, image.affine), str(root / folder / f"hippocampus_{case}_{c:04d}.nii.gz"))
        if folder == "imagesTr":
            label = SAMPLE / "labelsTr" / f"hippocampus_{case}.nii.gz"
            shutil.copy(label, root / "labelsTr" / f"hippocampus_{case}_seg.nii.gz")
    source = readers.discover(root)
    assert [c.id for c in source.cases] == ["hippocampus_001", "hippocampus_011", "hippocampus_034"]
    assert source.channels == {"0": "channel_0000", "1": "channel_0001"}
    case = readers.load_case(source.cases[1])
    np.testing.assert_array_equal(case.image[..., 1], 2 * sample_arrays("011")[0])
    np.testing.assert_array_equal(case.label, sample_arrays("011")[1])
    assert source.cases[2].label is None and len(source.cases[2].image) == 2


def test_group_channels_needs_every_case_to_start_at_0000():
    files = {(".", f"scan_{n:04d}"): Path(f"scan_{n:04d}.nii.gz") for n in range(3)}
    assert group_channels(files) == {(".", "scan"): [files[(".", f"scan_{n:04d}")] for n in range(3)]}
    assert group_channels(files, num_channels=1) == {key: [path] for key, path in files.items()}  # three scans
    assert group_channels(files, num_channels=4)[(".", "scan")][3] == Path("scan_0003.nii.gz")  # missing: refused
    assert group_channels({(".", "a_0001"): Path("a")}) == {(".", "a_0001"): [Path("a")]}
    mixed = {(".", "a_0000"): Path("a"), (".", "b"): Path("b")}
    assert group_channels(mixed) == {key: [path] for key, path in mixed.items()}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real test data folder {SHARED_DATA} is not in this checkout")
def test_pairs_side_by_side_are_matched_by_name_and_keep_their_label_values(tmp_path):
    shutil.copy(f"{PROSTATE}.nrrd", tmp_path / "prostate.nrrd")
    shutil.copy(f"{PROSTATE}-label.nrrd", tmp_path / "prostate-label.nrrd")
    assert readers.detect_format(tmp_path) == "folders"
    source = readers.discover(tmp_path)
    assert [c.id for c in source.cases] == ["prostate"] and source.label_values == [0, 1, 7, 8, 9]
    case = readers.load_case(source.cases[0])
    expected = sitk.GetArrayFromImage(sitk.ReadImage(f"{PROSTATE}-label.nrrd"))
    np.testing.assert_array_equal(np.asarray(source.label_values)[case.label], expected)


def test_mismatched_pairs_fail_alone_naming_both_files(tmp_path, caplog):
    root = tmp_path / "plain"
    copy_sample(root / "images", ("001", "011", "020"), root / "labels")
    (root / "labels" / "hippocampus_011.nii.gz").rename(root / "labels" / "hippocampus_999.nii.gz")
    label = nib.load(root / "labels" / "hippocampus_020.nii.gz")
    cropped = nib.Nifti1Image(np.asarray(label.dataobj)[1:], label.affine)
    nib.save(cropped, str(root / "labels" / "hippocampus_020.nii.gz"))
    with caplog.at_level(logging.WARNING):
        cases = {c.id: c for c in readers.discover(root).cases}
    assert "hippocampus_999.nii.gz: label without an image" in caplog.text
    with pytest.raises(CaseError, match=r"images/hippocampus_011\.nii\.gz: no label for this image in .*labels "
                       r"\(expected .*labels/hippocampus_011\.nii\.gz\)"):  # fmt: skip
        readers.load_case(cases["hippocampus_011"])
    with pytest.raises(CaseError, match=r"labels/hippocampus_020\.nii\.gz: shape .* differs from .*images/hippocampus"):
        readers.load_case(cases["hippocampus_020"])
    assert readers.load_case(cases["hippocampus_001"]).label is not None


def test_channel_patterns_pair_separate_channel_files_with_their_label(tmp_path):
    for case, value in (("p1", 1.0), ("p2", 2.0)):
        write_nifti(tmp_path / f"{case}_ct.nii.gz", np.full((3, 4, 5), value, np.float32))
        write_nifti(tmp_path / f"{case}_label.nii.gz", np.eye(4, 5, dtype=np.uint8)[None].repeat(3, 0))
    write_nifti(tmp_path / "p1_pet.nii.gz", np.full((3, 4, 5), 10.0, np.float32))
    args = data_gen.build_parser().parse_args(
        ["--input", str(tmp_path), "--output", "x", "--channel-patterns", "*_ct.nii.gz", "*_pet.nii.gz"]
    )
    source = readers.discover(tmp_path, "auto", reader_options(args))
    assert source.format == "files" and source.channels == {"0": "ct", "1": "pet"}
    p1 = readers.load_case(source.cases[0])
    assert p1.image.shape == (3, 4, 5, 2) and p1.image[0, 0, 0].tolist() == [1.0, 10.0] and p1.label.sum() == 12
    with pytest.raises(CaseError, match=r"p2_ct\.nii\.gz: no file matching the channel pattern '\*_pet\.nii\.gz'"):
        readers.load_case(source.cases[1])


def test_an_image_pattern_groups_0000_channel_files_of_the_files_reader(tmp_path):
    for c in range(2):
        write_nifti(tmp_path / f"a_{c:04d}.nii.gz", np.full((3, 4, 5), c + 1.0, np.float32))
    write_nifti(tmp_path / "a_seg.nii.gz", np.ones((3, 4, 5), np.uint8))
    source = readers.discover(tmp_path, "auto", {"image_pattern": "*.nii.gz", "label_pattern": "*_seg.nii.gz"})
    assert source.format == "files" and [c.id for c in source.cases] == ["a"]
    assert source.channels == {"0": "channel_0000", "1": "channel_0001"}
    case = readers.load_case(source.cases[0])
    assert case.image[0, 0, 0].tolist() == [1.0, 2.0] and case.label.sum() == 60


def test_data_gen_prepares_a_plain_folder_of_pairs_with_no_pattern_flags(tmp_path):
    root = tmp_path / "plain"
    copy_sample(root / "images", ("001", "011", "020"), root / "labels")
    out = tmp_path / "prepared"
    assert data_gen.main(["--input", str(root), "--output", str(out), "--spacing", "original", "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["format"] == "folders" and len(manifest["cases"]) == 3
    case = manifest["cases"][0]
    assert case["id"] == "hippocampus_001" and np.load(out / case["label"]).max() == 2


def test_every_reader_flag_of_evaluation_is_a_prediction_reader_option():
    args = evaluation.build_parser().parse_args(
        ["--run", "r", "--input", "x", "--output", "o", "--channel-patterns", "*_ct.nii.gz", "*_pet.nii.gz"]
    )
    options = reader_options(args)
    assert set(options) <= set(READER_OPTIONS) and options["channel_patterns"] == ["*_ct.nii.gz", "*_pet.nii.gz"]


def test_a_folder_of_new_scans_predicts_with_no_flags(synthetic, tmp_path):
    raw, _, run = synthetic
    folder = tmp_path / "new_scans"
    folder.mkdir()
    for number, index in enumerate((0, 3)):
        shutil.copy(raw / "imagesTr" / f"case_{index:03d}.nii.gz", folder / f"scan_{number:04d}.nii.gz")
    assert readers.detect_format(folder) == "folders"
    options = Options(pictures="none", progress=False)
    summary = predict_images(run, folder, tmp_path / "out", options=options, predict=label_reader)
    assert summary["num_cases"] == 2 and summary["num_scored"] == 0 and not summary["failures"]
    for number, index in enumerate((0, 3)):  # a one-channel run keeps numbered scans apart (not channels of one case)
        mask = nib.load(tmp_path / "out" / "masks" / f"scan_{number:04d}.nii.gz")
        truth = nib.load(raw / "labelsTr" / f"case_{index:03d}.nii.gz")
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(truth.dataobj))
