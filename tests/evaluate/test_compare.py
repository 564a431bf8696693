"""evaluation.py --predictions DIR [DIR ...] --truth DIR: other tools' masks scored with no model, matched by case id,
and compared case by case (hand-computed dice, the exact Wilcoxon p-value), bad cases failing alone."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from builders import write_nifti

import evaluation
from utils import geometry
from utils.evaluate.compare import case_id_of, mask_files, paired_test, score_masks
from utils.evaluate.options import Options

SHAPE = (6, 8, 10)  # (Z, Y, X)
ZYX = geometry.nifti_affine_to_zyx(np.eye(4))  # the arrays' affine when the NIfTI's is the identity
QUIET = Options(metrics=["dice", "hd95"], progress=False)


def truth_map(i: int) -> np.ndarray:
    """Class 1: a 2 x 4 x (2 + i) block; class 2: a 2 x 3 x 4 block."""
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 1:5, 0 : 2 + i] = 1
    label[3:5, 5:8, 0:4] = 2
    return label


def shifted_map(i: int) -> np.ndarray:
    """Class 1 moved one voxel along x: overlap 2 x 4 x (1 + i), dice (1 + i) / (2 + i); class 2 exact."""
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 1:5, 1 : 3 + i] = 1
    label[3:5, 5:8, 0:4] = 2
    return label


@pytest.fixture
def folders(tmp_path):
    """truth/ (with a dataset.json naming the classes), perfect/ (nnU-Net names) and shifted/ (MONAI's
    <case>/<case>_seg.nii.gz), six cases each."""
    truth, perfect, shifted = tmp_path / "truth", tmp_path / "perfect", tmp_path / "shifted"
    for folder in (truth / "labelsTr", perfect):
        folder.mkdir(parents=True)
    labels = {"background": 0, "core": 1, "rim": 2}  # nnU-Net v2 style
    (truth / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "MR"}}))
    for i in range(6):
        write_nifti(truth / "labelsTr" / f"case_{i}.nii.gz", truth_map(i))
        write_nifti(perfect / f"case_{i}.nii.gz", truth_map(i))
        (shifted / f"case_{i}").mkdir(parents=True)
        write_nifti(shifted / f"case_{i}" / f"case_{i}_seg.nii.gz", shifted_map(i))
    return truth, perfect, shifted


def test_one_folder_is_scored_like_a_models_evaluation(folders, tmp_path):
    truth, _, shifted = folders
    summary = score_masks([shifted], truth, tmp_path / "out", QUIET)
    assert summary["num_scored"] == 6 and summary["failures"] == []
    expected = [(1 + i) / (2 + i) for i in range(6)]
    assert summary["classes"]["1"]["name"] == "core"
    assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert summary["classes"]["2"]["dice"]["mean"] == 1.0 and summary["classes"]["2"]["hd95"]["mean"] == 0.0
    with open(tmp_path / "out" / "metrics.csv") as handle:
        rows = {(r["case"], r["label"]): r for r in csv.DictReader(handle)}
    assert float(rows[("case_3", "1")]["dice"]) == pytest.approx(4 / 5)
    for name in ("summary.json", "dice_boxplot.png", "report.html", "cases/case_0.json"):
        assert (tmp_path / "out" / name).is_file(), name


def test_two_folders_are_compared_case_by_case_with_a_paired_wilcoxon_test(folders, tmp_path):
    truth, perfect, shifted = folders
    out = tmp_path / "out"
    code = evaluation.main(
        ["--predictions", str(perfect), str(shifted), "--truth", str(truth), "--output", str(out), "--quiet"]
    )
    assert code == 0
    comparison = json.loads((out / "comparison.json").read_text())
    core = comparison["paired"]["1"]["dice"]["shifted - perfect"]
    differences = [-1 / (2 + i) for i in range(6)]
    assert core["n"] == 6 and core["mean_difference"] == pytest.approx(np.mean(differences), rel=1e-5)
    assert core["p_value"] == pytest.approx(2 / 2**6)  # exact: all six differences negative, two-sided
    rim = comparison["paired"]["2"]["dice"]["shifted - perfect"]
    assert rim["p_value"] == 1.0 and rim["mean_difference"] == 0.0
    assert comparison["foreground_mean"]["perfect"]["dice"] == 1.0
    with open(out / "comparison.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["metric"] == "dice" and r["label"] == "1"]
    assert [float(r["shifted - perfect"]) for r in rows] == pytest.approx(differences, abs=1e-5)
    with open(out / "metrics.csv") as handle:
        assert {r["method"] for r in csv.DictReader(handle)} == {"perfect", "shifted"}
    for name in ("comparison_boxplot.png", "report.html", "perfect/summary.json", "shifted/report.html"):
        assert (out / name).is_file(), name
    assert 'href="shifted/report.html"' in (out / "report.html").read_text()


def test_bad_cases_fail_alone_with_both_files_named(folders, tmp_path):
    truth, perfect, _ = folders
    (perfect / "case_1.nii.gz").unlink()
    write_nifti(perfect / "case_1.nii.gz", np.zeros((6, 8, 9), np.uint8))  # another grid
    three = truth_map(2)
    three[0, 0, 0] = 3
    write_nifti(perfect / "case_2.nii.gz", three)  # a value the truth does not have
    (perfect / "case_3.nii.gz").unlink()  # missing
    write_nifti(perfect / "extra.nii.gz", truth_map(0))  # no truth
    flipped = np.ascontiguousarray(truth_map(4)[::-1])  # the same grid stored with z reversed
    write_nifti(
        perfect / "case_4.nii.gz", flipped, ZYX @ np.array([[-1, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    )
    nrrd = sitk.GetImageFromArray(truth_map(5))
    found = geometry.sitk_geometry_from_affine(ZYX)
    nrrd.SetSpacing(found["spacing"])
    nrrd.SetOrigin(found["origin"])
    nrrd.SetDirection(found["direction"])
    (perfect / "case_5.nii.gz").unlink()
    sitk.WriteImage(nrrd, str(perfect / "case_5.nrrd"))

    summary = score_masks([perfect], truth, tmp_path / "out", QUIET)
    errors = {f["id"]: f["error"] for f in summary["failures"]}
    assert sorted(errors) == ["case_1", "case_2", "case_3", "extra"]
    truth_file = truth / "labelsTr"
    assert (
        f"{perfect / 'case_1.nii.gz'}: prediction on another grid than its truth {truth_file / 'case_1.nii.gz'}"
        in (errors["case_1"])
    )
    assert "shape (6, 8, 9), truth (6, 8, 10)" in errors["case_1"]
    assert f"{perfect / 'case_2.nii.gz'}: the prediction holds label values [3]" in errors["case_2"]
    assert str(truth_file / "case_2.nii.gz") in errors["case_2"]
    assert errors["case_3"].endswith(f"{truth_file / 'case_3.nii.gz'}: no prediction for case 'case_3' in {perfect}")
    assert errors["extra"].endswith(f"{perfect / 'extra.nii.gz'}: no truth for case 'extra' in {truth_file}")
    assert all((tmp_path / "out" / "cases" / f"case_{i}.json").is_file() for i in (0, 4, 5))
    assert summary["num_scored"] == 3 and summary["classes"]["1"]["dice"]["mean"] == 1.0  # 0, 4 reoriented, 5 NRRD
    assert (tmp_path / "out" / "report.html").is_file()


def test_case_ids_and_the_files_read_for_them(tmp_path):
    assert [case_id_of(n) for n in ("a_seg.nii.gz", "a.nrrd", "b_label.mha", "c_mask_pred.nii")] == [
        "a",
        "a",
        "b",
        "c_mask",
    ]
    results = tmp_path / "results"
    (results / "masks").mkdir(parents=True)
    write_nifti(results / "masks" / "a.nii.gz", truth_map(0))
    (results / "masks" / "a.nrrd").write_bytes(b"the same mask in the source's format")
    (results / "summary.json").write_text("{}")
    files, problems = mask_files(results)
    assert files == {"a": results / "masks" / "a.nii.gz"} and problems == {}
    write_nifti(results / "masks" / "a_seg.nii.gz", truth_map(0))
    assert "several files for case 'a'" in mask_files(results)[1]["a"]


def test_paired_test_edge_cases():
    assert paired_test([1.0, 0.5], [1.0, 0.5])["p_value"] == 1.0
    assert paired_test([np.nan], [1.0]) == {
        "n": 0,
        "mean_difference": None,
        "median_difference": None,
        "statistic": None,
        "p_value": None,
    }


def test_2d_png_masks_are_one_slice_cases(tmp_path):
    from PIL import Image

    truth, predictions = tmp_path / "truth", tmp_path / "predictions"
    truth.mkdir()
    predictions.mkdir()
    label = np.zeros((6, 8), np.uint8)
    label[1:5, 2:6] = 1  # 16 pixels
    Image.fromarray(label).save(truth / "slice_7.png")
    label[1:5, 5] = 0  # 12 of them predicted: dice 2 * 12 / (16 + 12)
    Image.fromarray(label).save(predictions / "slice_7_pred.png")
    summary = score_masks([predictions], truth, tmp_path / "out", QUIET)
    assert summary["failures"] == [] and summary["classes"]["1"]["name"] == "label 1"
    assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx(6 / 7)
