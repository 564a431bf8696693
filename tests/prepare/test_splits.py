"""Splits: seeded patient-level folds, the user's split files (ours and nnU-Net's splits_final.json), the refusals of
bad ones in one line, and data_gen.py --folds / --splits on a small generated MSD folder."""

import json

import builders
import pytest
from conftest import SHARED_DATA

import data_gen
from utils.formats import CaseSpec
from utils.prepare.splits import make_folds, make_splits, read_splits_file
from utils.prepared import PreparedDataset


def cases(patients, per_patient=2, unlabelled=0):
    """``per_patient`` labelled cases ``p<i>_<k>`` of each patient ``p<i>``, then unlabelled ``new_<j>``."""
    specs = [
        CaseSpec(id=f"p{p}_{k}", patient=f"p{p}", format="nifti", image=[f"p{p}_{k}.nii.gz"], label=f"l{p}_{k}.nii.gz")
        for p in range(patients)
        for k in range(per_patient)
    ]
    return specs + [CaseSpec(id=f"new_{j}", format="nifti", image=[f"new_{j}.nii.gz"]) for j in range(unlabelled)]


def patient(case_id):
    return case_id.split("_")[0]


def test_folds_keep_each_patient_in_one_fold_and_validate_every_case_once():
    specs = cases(7)
    splits = make_folds(specs, 3, 0.0, seed=4)
    every = sorted(s.id for s in specs)
    folds = splits["folds"]
    assert sorted(c for fold in folds for c in fold["val"]) == every  # each case validated exactly once
    for fold in folds:
        assert sorted(fold["train"] + fold["val"]) == every
        assert not {patient(c) for c in fold["train"]} & {patient(c) for c in fold["val"]}
    assert sorted(len(fold["val"]) for fold in folds) == [4, 4, 6]  # 7 patients dealt into 3, 2 and 2
    assert (splits["train"], splits["val"], splits["test"]) == (folds[0]["train"], folds[0]["val"], [])
    assert make_folds(specs, 3, 0.0, seed=4) == splits
    assert [f["val"] for f in make_folds(specs, 3, 0.0, seed=5)["folds"]] != [f["val"] for f in folds]


def test_folds_hold_out_the_test_fraction_and_the_unlabelled_cases():
    specs = cases(10, per_patient=1, unlabelled=2)
    splits = make_folds(specs, 2, 0.2, seed=0)
    held_out = make_splits(specs, (0.8, 0.0, 0.2), 0)["test"]  # the patients --split 0.8 0 0.2 holds out
    assert splits["test"] == held_out and len(held_out) == 4 and {"new_0", "new_1"} <= set(held_out)
    pool = {s.id for s in specs} - set(held_out)
    assert all(set(fold["train"]) | set(fold["val"]) == pool for fold in splits["folds"])
    assert sorted(len(fold["val"]) for fold in splits["folds"]) == [4, 4]


def test_fold_counts_that_cannot_be_drawn_are_refused():
    with pytest.raises(ValueError, match="at least 2 folds, got 1"):
        make_folds(cases(3), 1, 0.0, 0)
    with pytest.raises(ValueError, match="only 3 labelled patient"):
        make_folds(cases(3), 4, 0.0, 0)


def test_nnunet_splits_final_becomes_the_folds(tmp_path):
    path = tmp_path / "splits_final.json"
    folds = [{"train": ["p0_0", "p1_0"], "val": ["p2_0"]}, {"train": ["p2_0"], "val": ["p0_0", "p1_0"]}]
    path.write_text(json.dumps(folds))
    splits = read_splits_file(path, cases(3, per_patient=1, unlabelled=1))
    assert splits == {"train": ["p0_0", "p1_0"], "val": ["p2_0"], "test": ["new_0"], "folds": folds}


def test_our_splits_json_is_read_and_labelled_cases_it_does_not_name_are_left_out(tmp_path, caplog):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ["p0_0"], "val": ["p1_0"], "test": []}))
    splits = read_splits_file(path, cases(3, per_patient=1, unlabelled=1))
    assert splits == {"train": ["p0_0"], "val": ["p1_0"], "test": ["new_0"]}
    assert "1 labelled case(s) are in no split and are left out, e.g. p2_0" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([{"train": ["p0_0", "nobody"], "val": ["p1_0"]}], r"names 1 case\(s\) the dataset does not have: nobody "),
        ({"train": ["p0_0", "p1_0"], "val": ["p1_0"]}, "the split has 1 case.* in both train and val, e.g. p1_0"),
        ({"train": ["new_0"], "val": []}, "trains or validates on new_0, which has no label"),
        ({"training": ["p0_0"]}, "expected a splits.json object with 'train' and 'val'"),
        ([{"train": "p0_0", "val": []}], "fold 0 train must be a list of case ids"),
        ([], "'folds' must be a non-empty list"),
    ],
)
def test_bad_split_files_are_refused_in_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        read_splits_file(path, cases(3, per_patient=1, unlabelled=1))
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_data_gen_writes_folds_and_takes_a_split_file(tmp_path, capsys):
    raw = builders.write_msd(tmp_path / "raw", cases=6, unlabelled=1)
    flags = ["--input", str(raw), "--spacing", "original", "--normalize", "none"]
    assert data_gen.main([*flags, "--output", str(tmp_path / "cv"), "--folds", "3", "--seed", "2"]) == 0
    splits = json.loads((tmp_path / "cv" / "splits.json").read_text())
    labelled = [f"case_{i:03d}" for i in range(6)]
    assert sorted(c for fold in splits["folds"] for c in fold["val"]) == labelled and splits["test"] == ["case_006"]
    dataset = PreparedDataset(tmp_path / "cv")
    assert dataset.split("val") == splits["folds"][0]["val"] and len(dataset.folds) == 3
    assert dataset.with_fold(2).split("train") == splits["folds"][2]["train"]
    assert dataset.manifest["folds"] == 3

    own = tmp_path / "splits_final.json"
    own.write_text(json.dumps(splits["folds"][:2]))
    assert data_gen.main([*flags, "--output", str(tmp_path / "own"), "--splits", str(own)]) == 0
    assert json.loads((tmp_path / "own" / "splits.json").read_text())["folds"] == splits["folds"][:2]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"train": ["case_000", "case_999"], "val": ["case_001"]}]))
    capsys.readouterr()
    assert data_gen.main([*flags, "--output", str(tmp_path / "bad"), "--splits", str(bad)]) == 2
    assert f"{bad}: names 1 case(s) the dataset does not have: case_999" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "manifest.json").exists()  # refused before any case was prepared
    assert data_gen.main([*flags, "--output", str(tmp_path / "both"), "--folds", "2", "--splits", str(own)]) == 2
    assert "give either --folds" in capsys.readouterr().err


def test_an_nnunet_raw_folder_prepares_with_nnunet_s_own_folds(tmp_path):
    raw = builders.make_nnunet(tmp_path / "Dataset004_Hippocampus", SHARED_DATA / "msd_hippocampus")
    folds = [
        {"train": ["hippocampus_001", "hippocampus_011"], "val": ["hippocampus_020"]},
        {"train": ["hippocampus_020"], "val": ["hippocampus_001", "hippocampus_011"]},
    ]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    args = ["--input", str(raw), "--output", str(tmp_path / "data"), "--splits", str(tmp_path / "splits_final.json")]
    assert data_gen.main(args) == 0
    splits = json.loads((tmp_path / "data" / "splits.json").read_text())
    assert splits == {"train": folds[0]["train"], "val": folds[0]["val"], "test": ["hippocampus_034"], "folds": folds}
