"""Every bad case is that case's failure: data_gen.py names the file and the problem in one line, prepares the other
cases and exits with 1. Only dataset-wide problems stop it before it starts (exit 2). A listed path that leads out of
the dataset folder is refused unread."""

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from builders import make_brats, make_png
from conftest import SAMPLE

import data_gen


def held_out_msd(root: Path, cases: int = 12) -> tuple[Path, dict[str, tuple[str, str]]]:
    """``cases`` sample cases, half of them damaged as a new user found them, plus an entry that leads out of the
    folder; returns the folder and ``{case id: (file name, phrase)}`` of the failures expected."""
    meta = json.loads((SAMPLE / "dataset.json").read_text())
    meta["training"] = meta["training"][:cases]
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for entry in meta["training"]:
        for key in ("image", "label"):
            shutil.copy(SAMPLE / entry[key], root / entry[key])
    paths = [(root / e["image"], root / e["label"], Path(e["image"]).name.split(".")[0]) for e in meta["training"]]
    expected = {}

    image, _, case = paths[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    expected[case] = (image.name, "cannot read NIfTI")
    _, label, case = paths[1]
    reference = nib.load(label)
    nib.save(nib.Nifti1Image(np.asanyarray(reference.dataobj)[:-3], reference.affine), label)
    expected[case] = (label.name, "shape")
    image, _, case = paths[2]
    reference = nib.load(image)
    data = np.asanyarray(reference.dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, reference.affine), image)
    expected[case] = (image.name, "NaN or Inf")
    _, label, case = paths[3]
    label.unlink()
    expected[case] = (label.name, "does not exist")
    _, label, case = paths[4]
    reference = nib.load(label)
    data = np.asanyarray(reference.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, reference.affine), label)
    expected[case] = (label.name, "label values [7] are not among the dataset's labels")
    escaped = root.parent / "escaped_case.nii.gz"
    shutil.copy(paths[5][0], escaped)
    meta["training"].append(
        {"image": "./imagesTr/../../../../escaped_case.nii.gz", "label": meta["training"][5]["label"]}
    )
    expected["escaped_case"] = ("escaped_case.nii.gz", "escapes the dataset folder")
    (root / "dataset.json").write_text(json.dumps(meta))
    return root, expected


def failure_lines(err: str) -> dict[str, str]:
    """``{case id: message}`` of the failure lines data_gen.py printed (``  <id>: <message>``)."""
    lines = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    return dict(line.split(": ", 1) for line in lines)


def test_a_damaged_held_out_folder_gives_one_line_per_bad_case_and_prepares_every_good_one(tmp_path, capsys):
    root, expected = held_out_msd(tmp_path / "a" / "b" / "c" / "held_out")
    output = tmp_path / "out"
    assert data_gen.main(["--input", str(root), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    failures = failure_lines(err)
    assert sorted(failures) == sorted(expected), err
    for case, (file_name, phrase) in expected.items():
        assert file_name in failures[case] and phrase in failures[case], failures[case]
    prepared = [c["id"] for c in json.loads((output / "manifest.json").read_text())["cases"]]
    assert len(prepared) == 7 and not set(prepared) & set(expected)


def test_an_escaping_path_is_refused_unread(tmp_path, capsys, monkeypatch):
    root, _ = held_out_msd(tmp_path / "a" / "b" / "c" / "held_out", cases=6)
    secret = tmp_path / "a" / "escaped_case.nii.gz"
    (root / "imagesTr" / "linked.nii.gz").symlink_to(secret)  # the same file, behind a symbolic link
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/linked.nii.gz", "label": meta["training"][0]["label"]})
    (root / "dataset.json").write_text(json.dumps(meta))
    read = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: read.append(str(path)) or real_load(path, *a, **k))
    assert data_gen.main(["--input", str(root), "--output", str(tmp_path / "out")]) == 1
    failures = failure_lines(capsys.readouterr().err)
    assert "escapes the dataset folder" in failures["escaped_case"]
    assert "linked.nii.gz: escapes the dataset folder" in failures["linked"]
    assert read and not [path for path in read if "escaped_case" in path or "linked" in path]


def test_a_brats_folder_without_a_modality_fails_alone(tmp_path, capsys):
    root = make_brats(tmp_path / "brats", cases=("BraTS20_001", "BraTS20_002", "BraTS20_003"))
    (root / "BraTS20_002" / "BraTS20_002_t1ce.nii.gz").unlink()
    output = tmp_path / "out"
    flags = ["--spacing", "original", "--normalize", "none"]
    assert data_gen.main(["--input", str(root), "--output", str(output), *flags]) == 1
    failures = failure_lines(capsys.readouterr().err)
    assert list(failures) == ["BraTS20_002"] and "BraTS case lacks the t1ce image(s)" in failures["BraTS20_002"]
    assert [c["id"] for c in json.loads((output / "manifest.json").read_text())["cases"]] == [
        "BraTS20_001",
        "BraTS20_003",
    ]


def test_an_hdf5_patient_without_its_label_fails_alone(tmp_path, capsys):
    path = tmp_path / "sts.h5"
    with h5py.File(path, "w") as handle:
        for i, patient in enumerate(("STS_1", "STS_2", "STS_3")):
            label = np.zeros((4, 6, 6), np.uint8)
            label[1:3, 2:4, 2:4] = 1
            handle[f"ct_data/{patient}"] = (label * 100 + i + 1).astype(np.float32)
            if patient != "STS_2":
                handle[f"label_data/{patient}"] = label
    output = tmp_path / "out"
    assert data_gen.main(["--input", str(path), "--output", str(output), "--spacing", "original"]) == 1
    failures = failure_lines(capsys.readouterr().err)
    assert list(failures) == ["STS_2"]
    assert "sts.h5: patient 'STS_2' has no label dataset 'label_data/STS_2'" in failures["STS_2"]
    assert [c["id"] for c in json.loads((output / "manifest.json").read_text())["cases"]] == ["STS_1", "STS_3"]


@pytest.mark.parametrize("damage", ["mask size", "colour mask", "missing mask"])
def test_a_png_case_whose_masks_do_not_fit_fails_alone(tmp_path, capsys, damage):
    from PIL import Image

    root = make_png(tmp_path / "png", patients=(("001", (1, 2, 3)), ("002", (1, 2)), ("003", (4,))))
    bad = root / "masks" / "STS_002_2_.png"
    if damage == "mask size":
        Image.fromarray(np.zeros((5, 8), np.uint8)).save(bad)
    elif damage == "colour mask":
        Image.fromarray(np.full((6, 8, 3), [0, 0, 255], np.uint8)).save(bad)
    else:
        bad.unlink()
    output = tmp_path / "out"
    flags = ["--patient-pattern", r"STS_(\d+)_(\d+)", "--binarize", "--spacing", "original"]
    assert data_gen.main(["--input", str(root), "--output", str(output), *flags]) == 1
    failures = failure_lines(capsys.readouterr().err)
    assert list(failures) == ["STS_002"] and "STS_002_2_.png" in failures["STS_002"], failures
    assert [c["id"] for c in json.loads((output / "manifest.json").read_text())["cases"]] == ["STS_001", "STS_003"]


@pytest.mark.parametrize(
    ("content", "phrase"), [(None, "dataset.json: file not found"), ("{not json", "dataset.json: not valid JSON")]
)
def test_dataset_wide_problems_still_stop_before_work(tmp_path, capsys, content, phrase):
    root = tmp_path / "raw"
    (root / "imagesTr").mkdir(parents=True)
    if content is not None:
        (root / "dataset.json").write_text(content)
    assert data_gen.main(["--input", str(root), "--output", str(tmp_path / "out"), "--format", "msd"]) == 2
    assert phrase in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
