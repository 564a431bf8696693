"""Runs of folds: the ensemble averages the folds' probabilities before the arg-max, --split cv scores every case with
the fold that did not train on it (with each fold's summary), --save-probabilities writes them on the source grid,
and fold folders without a model or outside the splits are reported in one line. The synthetic images spell out their
labels, so fake models with known outputs stand in for trained ones (hand-computed results, no training)."""

import csv
import json

import builders
import nibabel as nib
import numpy as np
import pytest
from builders import label_reader

import data_gen
from utils.evaluate.ensemble import Ensemble
from utils.evaluate.options import Options
from utils.evaluate.pipeline import evaluate
from utils.evaluate.predict import predict_images
from utils.runs import TrainingConfig

UNSURE_RIM = np.array([0.2, 0.2, 0.6], np.float32)  # a fold that calls every voxel rim, unsure
OPTIONS = {"pictures": "none", "metrics": ["dice"], "progress": False}


def constant(probabilities):
    return lambda batch: np.broadcast_to(probabilities, (*batch.shape[:-1], len(probabilities))).copy()


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory):
    """Eight synthetic cases in two folds of four (nonzero crop, original spacing, no normalisation)."""
    root = tmp_path_factory.mktemp("cv")
    raw = builders.write_msd(root / "raw", cases=8)
    flags = ["--spacing", "original", "--normalize", "none", "--crop", "nonzero", "--folds", "2", "--seed", "1"]
    assert data_gen.main(["--input", str(raw), "--output", str(root / "data"), *flags]) == 0
    return raw, root / "data"


def fold_run(root, dataset, folds=(0, 1), without_model=()):
    """``root/fold_<i>`` for each fold: the synthetic run's config and, but for ``without_model``, a model file
    (never loaded: the tests pass ``predict``)."""
    for fold in folds:
        folder = builders.make_run(root / f"fold_{fold}", dataset)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "fold": fold}))
        if fold not in without_model:
            (folder / "model.keras").write_bytes(b"never loaded")
    return root


def test_the_ensemble_averages_probabilities_before_the_argmax():
    class Member:
        config = TrainingConfig(labels={"0": "background", "1": "organ"}, num_classes=2)

        def __init__(self, value):
            self.value = value

        def probabilities(self, image, options):
            return np.full((*image.shape[:3], 2), [1 - self.value, self.value], np.float32)

    ensemble = Ensemble(None, {0: Member(0.8), 1: Member(0.2), 2: Member(0.35)})
    averaged = ensemble.probabilities(np.zeros((2, 3, 4, 1)), Options())
    np.testing.assert_allclose(averaged[0, 0, 0], [0.55, 0.45], atol=1e-6)  # fold 0 alone says organ: 0.8 > 0.2
    assert averaged.shape == (2, 3, 4, 2) and ensemble.config is Member.config


def test_an_ensemble_of_folds_predicts_and_saves_probabilities_on_the_source_grid(cv_data, tmp_path):
    raw, dataset = cv_data
    run = fold_run(tmp_path / "run", dataset)
    predict = {0: label_reader, 1: constant(UNSURE_RIM)}
    options = Options(save_probabilities=True, **OPTIONS)
    summary = evaluate(run, dataset, tmp_path / "out", split="all", options=options, predict=predict)
    # fold 1 alone calls everything rim; averaged with fold 0 every voxel keeps its class: (1 + 0.2) / 2 > 0.3
    assert summary["failures"] == [] and summary["settings"]["folds"] == [0, 1]
    assert summary["classes"]["2"]["dice"]["mean"] == 1.0  # the four islands are core: dice 240 / 241 there
    assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx((4 + 4 * 240 / 241) / 8)
    manifest = json.loads((dataset / "manifest.json").read_text())
    for case in manifest["cases"]:
        source = nib.load(raw / "imagesTr" / f"{case['id']}.nii.gz")
        classes = np.clip(np.rint(np.asarray(source.dataobj) / 100), 0, 2).astype(int)  # what label_reader says
        expected = (np.eye(3)[classes] + UNSURE_RIM) / 2
        expected[np.asarray(source.dataobj) == 0] = [1, 0, 0]  # outside the nonzero crop: background
        saved = np.load(tmp_path / "out" / "probabilities" / f"{case['id']}.npz")["probabilities"]
        assert saved.dtype == np.float16 and saved.shape == (3, *source.shape[::-1])  # (K, Z, Y, X)
        np.testing.assert_allclose(np.transpose(saved, (3, 2, 1, 0)), expected, atol=1e-3)
        volume = nib.load(tmp_path / "out" / "probabilities" / f"{case['id']}.nii.gz")
        assert volume.shape == (*source.shape, 3)
        np.testing.assert_allclose(volume.affine, source.affine)
        np.testing.assert_allclose(volume.get_fdata(), expected, atol=1e-3)
        mask = np.asarray(nib.load(tmp_path / "out" / "masks" / f"{case['id']}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.argmax(volume.get_fdata(), axis=-1), mask)


def test_cross_validation_scores_each_case_with_the_fold_that_did_not_train_on_it(cv_data, tmp_path):
    _, dataset = cv_data
    folds = json.loads((dataset / "splits.json").read_text())["folds"]
    run = fold_run(tmp_path / "run", dataset)
    predict = {0: label_reader, 1: constant(np.array([1, 0, 0], np.float32))}  # fold 1 finds nothing
    summary = evaluate(run, dataset, tmp_path / "cv", split="cv", options=Options(**OPTIONS), predict=predict)
    with open(tmp_path / "cv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    rim = {row["case"]: float(row["dice"]) for row in rows if row["class"] == "rim"}
    assert rim == {**dict.fromkeys(folds[0]["val"], 1.0), **dict.fromkeys(folds[1]["val"], 0.0)}
    assert summary["num_cases"] == 8 and summary["classes"]["2"]["dice"]["mean"] == 0.5
    per_fold = json.loads((tmp_path / "cv" / "summary.json").read_text())["folds"]
    assert [per_fold[k]["classes"]["2"]["dice"]["mean"] for k in ("0", "1")] == [1.0, 0.0]
    assert [per_fold[k]["num_cases"] for k in ("0", "1")] == [len(folds[0]["val"]), len(folds[1]["val"])]


def test_a_fold_without_a_model_is_named_and_the_other_folds_finish(cv_data, tmp_path, caplog):
    _, dataset = cv_data
    folds = json.loads((dataset / "splits.json").read_text())["folds"]
    run = fold_run(tmp_path / "run", dataset, without_model=(1,))
    options = Options(**OPTIONS)
    summary = evaluate(run, dataset, tmp_path / "cv", split="cv", options=options, predict=label_reader)
    assert sorted(f["id"] for f in summary["failures"]) == sorted(folds[1]["val"])
    assert all(f"{run / 'fold_1'}: neither model.keras nor last.keras found" in f["error"] for f in summary["failures"])
    assert summary["num_cases"] == len(folds[0]["val"]) and summary["classes"]["2"]["dice"]["mean"] == 1.0
    assert "the ensemble averages folds 0" in caplog.text
    ensemble = evaluate(run, dataset, tmp_path / "all", split="all", options=options, predict=label_reader)
    assert ensemble["failures"] == [] and ensemble["settings"]["folds"] == [0]
    (run / "fold_0" / "model.keras").unlink()
    with pytest.raises(FileNotFoundError, match="no fold folder holds a model"):
        evaluate(run, dataset, tmp_path / "none", split="all", options=options, predict=label_reader)


def test_folds_outside_the_splits_and_cv_without_folds_are_refused(cv_data, synthetic, tmp_path):
    _, dataset = cv_data
    run = fold_run(tmp_path / "run", dataset, folds=(0, 1, 2))
    options = Options(**OPTIONS)
    with pytest.raises(ValueError, match=r"fold_2: fold 2 is not in .*splits.json, which holds folds 0 to 1"):
        evaluate(run, dataset, tmp_path / "out", split="cv", options=options, predict=label_reader)
    _, plain, single = synthetic
    with pytest.raises(ValueError, match="--split cv needs a run of folds"):
        evaluate(single, plain, tmp_path / "out", split="cv", options=options, predict=label_reader)
    with pytest.raises(ValueError, match="splits.json: holds no folds for --split cv"):
        evaluate(fold_run(tmp_path / "two", plain), plain, tmp_path / "out", split="cv", options=options,
                 predict=label_reader)  # fmt: skip


def test_new_images_are_predicted_by_the_ensemble_with_probabilities(cv_data, tmp_path):
    raw, dataset = cv_data
    run = fold_run(tmp_path / "run", dataset)
    options = Options(save_probabilities=True, **OPTIONS)
    summary = predict_images(run, raw, tmp_path / "new", options=options, predict=label_reader)
    assert summary["failures"] == [] and summary["num_cases"] == 8 and summary["settings"]["folds"] == [0, 1]
    for path in sorted((tmp_path / "new" / "masks").glob("*.nii.gz")):
        saved = np.load(tmp_path / "new" / "probabilities" / path.name.replace(".nii.gz", ".npz"))["probabilities"]
        mask = np.asarray(nib.load(path).dataobj)
        np.testing.assert_array_equal(np.argmax(saved, axis=0), mask.transpose(2, 1, 0))
        np.testing.assert_allclose(saved.astype(np.float32).sum(axis=0), 1.0, atol=2e-3)


def test_auto_postprocessing_of_folds_is_decided_on_the_out_of_fold_predictions(cv_data, tmp_path):
    _, dataset = cv_data
    run = fold_run(tmp_path / "run", dataset)
    options = Options(postprocess="auto", pictures="none", metrics=["dice"], progress=False)
    summary = evaluate(run, dataset, tmp_path / "out", split="cv", options=options, predict=label_reader)
    plan = summary["postprocessing"]
    assert plan["num_cases"] == 8  # every fold's val, each by its own fold (the run's val split alone holds 4)
    assert plan["lcc_classes"] == [1] and summary["foreground_mean"]["dice"] == 1.0  # the islands are removed
    assert json.loads((run / "postprocessing.json").read_text())["decisions"][0]["plan"]["num_cases"] == 8
