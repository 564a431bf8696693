"""The whole workflow on the shipped sample: data_gen.py → train.py → evaluation.py, as a user runs it."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

import evaluation
import train
from utils.prepared import PreparedDataset

DICE_FLOOR = 0.6  # an untrained or broken model scores below 0.1 on these cases; 3 epochs of 40 steps reach ~0.75


@pytest.fixture()
def prepared(prepared_sample):
    return prepared_sample


def test_data_gen_writes_the_prepared_dataset(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    splits = json.loads((prepared / "splits.json").read_text())
    fingerprint = json.loads((prepared / "fingerprint.json").read_text())
    assert len(manifest["cases"]) == 40
    assert manifest["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert [len(splits[k]) for k in ("train", "val", "test")] == [28, 6, 6]
    assert not set(splits["train"]) & set(splits["test"])
    assert fingerprint["median_spacing"] == [1.0, 1.0, 1.0]
    case = manifest["cases"][0]
    image = np.load(prepared / case["image"], mmap_mode="r")
    label = np.load(prepared / case["label"], mmap_mode="r")
    assert image.dtype == np.float32 and image.ndim == 4 and image.shape[-1] == 1
    assert label.dtype == np.uint8 and label.shape == image.shape[:3]
    assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3  # z-score per MR case


@pytest.mark.slow
def test_train_then_evaluate_reaches_the_dice_floor(prepared, tmp_path):
    run, results = tmp_path / "run", tmp_path / "results"
    assert (
        train.main(
            [
                "--data",
                str(prepared),
                "--output",
                str(run),
                "--model",
                "unet3d",
                "--epochs",  # a fixed amount of work, not a time limit: a busy machine gets the same model, later
                "3",
                "--steps-per-epoch",
                "40",
            ]
        )
        == 0
    )
    for name in ("config.json", "model.keras", "last.keras", "history.csv", "curves.png", "model_summary.txt"):
        assert (run / name).is_file(), name
    with open(run / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert len(history) >= 2
    assert all(np.isfinite(float(row["loss"])) for row in history)
    assert float(history[-1]["loss"]) < float(history[0]["loss"])

    assert (
        evaluation.main(["--run", str(run), "--data", str(prepared), "--split", "test", "--output", str(results)]) == 0
    )
    summary = json.loads((results / "summary.json").read_text())
    assert summary["settings"]["tta"] == [0, 1, 2]  # test-time mirroring along the axes the training mirrored
    test_ids = json.loads((prepared / "splits.json").read_text())["test"]
    for case_id in test_ids:
        source = nib.load(PreparedDataset(prepared).spec(case_id).label)
        mask = nib.load(results / "masks" / f"{case_id}.nii.gz")
        assert mask.shape == source.shape
        np.testing.assert_array_equal(mask.affine, source.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    with open(results / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(test_ids)
    assert (results / "dice_boxplot.png").stat().st_size > 1000
    assert summary["foreground_mean"]["dice"] > DICE_FLOOR
