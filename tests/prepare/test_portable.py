"""A prepared dataset records its source files relative to the input root, so that it moves: with its raw files
(found beside it), to where --source-root says, or alone (old manifests with absolute paths still load)."""

import json
import os
import shutil
from pathlib import Path

import builders
import pytest

import data_gen
from utils.prepared import PreparedDataset, input_root, portable_entry

FLAGS = ["--spacing", "original", "--normalize", "none", "--crop", "nonzero", "--split", "0.5", "0.25", "0.25"]


@pytest.fixture
def prepared(tmp_path):
    """A raw MSD folder with a NIfTI label beside it (outside the input root) and the dataset prepared from it."""
    raw = builders.write_msd(tmp_path / "project" / "raw", cases=4)
    dataset = tmp_path / "project" / "data"
    assert data_gen.main(["--input", str(raw), "--output", str(dataset), *FLAGS]) == 0
    return raw, dataset


def test_the_manifest_stores_source_paths_relative_to_the_input_root(prepared):
    raw, dataset = prepared
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["source"]["root"] == str(raw.resolve())
    assert manifest["source"]["root_from_dataset"] == "../raw"
    case = manifest["cases"][0]
    assert case["source"]["image"] == [f"imagesTr/{case['id']}.nii.gz"]
    assert case["source"]["label"] == f"labelsTr/{case['id']}.nii.gz"
    assert case["writer"]["reference"] == case["source"]["label"]
    spec = PreparedDataset(dataset).spec(case["id"])
    assert spec.image == [str(raw.resolve() / "imagesTr" / f"{case['id']}.nii.gz")]
    assert PreparedDataset(dataset).writer(case["id"])["reference"] == spec.label


def test_a_dataset_moved_with_its_raw_files_finds_them_beside_it(prepared, tmp_path):
    raw, dataset = prepared
    moved = tmp_path / "elsewhere"
    shutil.move(str(raw.parent), str(moved))  # the whole project: data/ and raw/ keep their places
    reopened = PreparedDataset(moved / "data")
    assert reopened.source_root == moved / "raw"
    for case_id in reopened.cases:
        assert reopened.missing_sources(case_id) == []
        assert Path(reopened.spec(case_id).label).resolve().parent == (moved / "raw" / "labelsTr").resolve()


def test_source_root_remaps_raw_files_that_moved_alone(prepared, tmp_path):
    raw, dataset = prepared
    shutil.move(str(raw), str(tmp_path / "archive"))
    case_id = next(iter(PreparedDataset(dataset).cases))
    gone = PreparedDataset(dataset)
    assert gone.missing_sources(case_id) == [
        str(raw.resolve() / "imagesTr" / f"{case_id}.nii.gz"),
        str(raw.resolve() / "labelsTr" / f"{case_id}.nii.gz"),
    ]
    found = PreparedDataset(dataset, source_root=tmp_path / "archive")
    assert found.missing_sources(case_id) == []
    assert found.spec(case_id).label == str(tmp_path / "archive" / "labelsTr" / f"{case_id}.nii.gz")


def test_an_old_manifest_with_absolute_paths_loads_and_remaps(prepared, tmp_path):
    raw, dataset = prepared
    manifest = json.loads((dataset / "manifest.json").read_text())
    root = Path(manifest["source"].pop("root"))
    del manifest["source"]["root_from_dataset"]
    for case in manifest["cases"]:  # as data_gen.py wrote it before: absolute paths, no root
        case["source"]["image"] = [str(root / p) for p in case["source"]["image"]]
        case["source"]["label"] = str(root / case["source"]["label"])
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    case_id = manifest["cases"][0]["id"]
    assert PreparedDataset(dataset).spec(case_id).label == str(root / "labelsTr" / f"{case_id}.nii.gz")
    shutil.move(str(raw), str(tmp_path / "archive"))
    assert PreparedDataset(dataset).missing_sources(case_id)
    moved = PreparedDataset(dataset, source_root=tmp_path / "archive")
    assert moved.missing_sources(case_id) == []
    assert moved.spec(case_id).image == [str(tmp_path / "archive" / "imagesTr" / f"{case_id}.nii.gz")]


def test_files_outside_the_input_root_stay_absolute(tmp_path):
    root, outside = tmp_path / "raw", tmp_path / "labels" / "a.nrrd"
    entry = {
        "id": "a",
        "source": {"format": "sitk", "image": [str(root / "sub" / "a.nrrd")], "label": str(outside)},
        "writer": {"kind": "sitk", "reference": str(outside)},
    }
    portable = portable_entry(entry, root)
    assert portable["source"] == {"format": "sitk", "image": ["sub/a.nrrd"], "label": str(outside)}
    assert portable["writer"]["reference"] == str(outside) and entry["source"]["image"][0].startswith(os.sep)


def test_the_input_root_widens_to_hold_a_label_folder_beside_the_input(tmp_path):
    images, labels = tmp_path / "study" / "images", tmp_path / "study" / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    assert input_root(images, [str(images / "a.nii.gz"), str(labels / "a.nii.gz")]) == (tmp_path / "study").resolve()
    assert input_root(images, [str(images / "a.nii.gz")]) == images.resolve()
    (images / "a.nii.gz").write_bytes(b"")
    assert input_root(images / "a.nii.gz") == images.resolve()  # an input file: its folder


def test_source_root_chooses_the_folder_paths_are_relative_to(tmp_path, capsys):
    raw = builders.write_msd(tmp_path / "project" / "raw", cases=2)
    dataset = tmp_path / "project" / "data"
    argv = ["--input", str(raw), "--output", str(dataset), *FLAGS[:-4]]
    assert data_gen.main([*argv, "--source-root", str(tmp_path / "project")]) == 0
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["source"]["root"] == str((tmp_path / "project").resolve())
    assert manifest["source"]["root_from_dataset"] == ".."
    assert manifest["cases"][0]["source"]["label"] == "raw/labelsTr/case_000.nii.gz"
    assert PreparedDataset(dataset).missing_sources("case_000") == []
    capsys.readouterr()
    assert data_gen.main([*argv, "--source-root", str(tmp_path / "gone")]) == 2
    assert capsys.readouterr().err.strip() == f"data_gen.py: error: {tmp_path / 'gone'}: --source-root folder not found"
