"""Evaluation: summaries with hand-computed values, compatibility checks, and a whole evaluation of a synthetic
dataset whose images spell out their labels, so that a fake model predicts them exactly (no training needed)."""

import csv
import json
import math
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from builders import label_reader, make_run

import data_gen
import utils.evaluate.pipeline
from utils.evaluate.options import Options, check_regions
from utils.evaluate.pipeline import check_compatible, evaluate, finish_case
from utils.evaluate.predict import predict_images
from utils.evaluate.results import summarize
from utils.geometry import GeometryRecord
from utils.prepared import PreparedDataset
from utils.runs import TrainingConfig


def record(case_id, dice_1, dice_2):
    return {"id": case_id, "metrics": {"1": {"dice": dice_1}, "2": {"dice": dice_2}}}


def test_summary_statistics_and_the_empty_rule():
    records = [
        record("a", 0.8, 0.6),
        record("b", 0.6, float("nan")),
        record("c", 1.0, 0.4),
        {"id": "unlabelled", "metrics": None},
    ]
    summary = summarize(records, {1: "anterior", 2: "posterior"}, ["dice"])
    first, second = summary["classes"]["1"], summary["classes"]["2"]
    assert first["name"] == "anterior"
    assert first["dice"]["mean"] == pytest.approx(0.8)
    assert first["dice"]["median"] == pytest.approx(0.8)
    assert first["dice"]["std"] == pytest.approx(math.sqrt((0.0**2 + 0.2**2 + 0.2**2) / 3), abs=1e-6)
    assert first["dice"]["q1"] == pytest.approx(0.7) and first["dice"]["q3"] == pytest.approx(0.9)
    assert second["dice"]["mean"] == pytest.approx(0.5)
    assert (second["dice"]["n"], second["dice"]["n_empty"]) == (2, 1)
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.65)
    assert summary["num_cases"] == 4 and summary["num_scored"] == 3
    assert "NaN" in summary["empty_rule"]


def test_regions_are_summarised_but_left_out_of_the_foreground_mean():
    records = [{"id": "a", "metrics": {"1": {"dice": 0.5}, "2": {"dice": 0.7}, "tumour": {"dice": 0.9}}}]
    summary = summarize(records, {"1": "core", "2": "rim"}, ["dice"])
    assert summary["classes"]["tumour"]["region"] is True
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.6)


def test_bad_regions_are_refused():
    assert check_regions({"whole": [1, "2"]}) == {"whole": [1, 2]}
    with pytest.raises(ValueError, match="list of label values"):
        check_regions({"whole": 1})
    with pytest.raises(ValueError, match="must not be empty or a number"):
        check_regions({"3": [1]})


class FakeDataset:
    path = "data/other"
    labels = {"0": "background", "1": "liver"}
    num_channels = 1


def test_incompatible_dataset_is_refused():
    with pytest.raises(ValueError, match="labels"):
        check_compatible(TrainingConfig(labels={"0": "background", "1": "tumour"}, num_channels=1), FakeDataset())
    with pytest.raises(ValueError, match="channel"):
        check_compatible(TrainingConfig(labels=FakeDataset.labels, num_channels=4), FakeDataset())


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_evaluation_writes_masks_on_the_source_grid_scores_pictures_and_report(synthetic, tmp_path):
    raw, dataset, run = synthetic
    options = Options(regions={"whole": [1, 2]}, progress=False)
    summary = evaluate(run, dataset, tmp_path, split="all", options=options, predict=label_reader)
    assert summary["failures"] == []
    manifest = json.loads((dataset / "manifest.json").read_text())
    for case in manifest["cases"]:
        source = nib.load(PreparedDataset(dataset).spec(case["id"]).label)  # the manifest's paths are relative
        mask = nib.load(tmp_path / "masks" / f"{case['id']}.nii.gz")
        assert mask.shape == source.shape
        np.testing.assert_array_equal(mask.affine, source.affine)
        island = int(case["id"][-1]) in (1, 2, 5, 6)
        expected = np.asarray(source.dataobj).copy()
        if island:
            expected[13, 16, 9] = 1
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
        for picture in ("overlays/{}.png", "overlays/{}.gif", "cases/{}.json"):
            assert (tmp_path / picture.format(case["id"])).stat().st_size > 100
    rows = read_rows(tmp_path / "metrics.csv")
    assert len(rows) == 8 * 3 and {r["class"] for r in rows} == {"core", "rim", "whole"}
    assert set(rows[0]) == {"case", "label", "class", "dice", "iou", "hd95", "assd", "nsd", "precision",
                            "sensitivity", "volume_truth_ml", "volume_pred_ml"}  # fmt: skip
    assert all(float(r["dice"]) == 1.0 for r in rows if r["class"] == "rim")
    assert summary["classes"]["1"]["dice"]["n"] == 8 and summary["classes"]["1"]["dice"]["mean"] < 1.0
    assert summary["classes"]["whole"]["region"] and summary["postprocessing"]["lcc_classes"] == []
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["split"] == "all"
    assert (tmp_path / "dice_boxplot.png").stat().st_size > 1000
    report = (tmp_path / "report.html").read_text()
    assert report.count('<tr id="case-') == 8 and report.count("data:image/png;base64,") == 9


def test_auto_postprocessing_is_decided_on_validation_and_stored_in_the_run(synthetic, tmp_path, monkeypatch):
    _, dataset, run = synthetic
    splits = json.loads((dataset / "splits.json").read_text())
    assert any(int(c[-1]) in (1, 2, 5, 6) for c in splits["val"]), splits  # a validation case has an island
    options = Options(postprocess="auto", pictures="none", metrics=["dice"], progress=False)
    summary = evaluate(run, dataset, tmp_path, split="test", options=options, predict=label_reader)
    plan = summary["postprocessing"]
    assert plan["lcc_classes"] == [1] and plan["lcc_class_names"] == ["core"] and plan["decided_on"] == "validation"
    assert plan["dice"]["1"]["with_lcc"] == 1.0 > plan["dice"]["1"]["without_lcc"]
    assert summary["foreground_mean"]["dice"] == 1.0
    stored = json.loads((run / "postprocessing.json").read_text())
    assert [d["plan"] for d in stored["decisions"]] == [
        {k: v for k, v in plan.items() if k != "lcc_class_names"}
    ] and stored["decisions"][0]["key"]["tta"] is False
    monkeypatch.setattr("utils.evaluate.pipeline.decide_lcc", lambda *a, **k: pytest.fail("decided again"))
    again = evaluate(run, dataset, tmp_path / "again", split="test", options=options, predict=label_reader)
    assert again["postprocessing"] == plan and not again["failures"]
    (run / "postprocessing.json").unlink()


def test_a_rerun_reuses_finished_cases(synthetic, tmp_path):
    _, dataset, run = synthetic
    options = Options(pictures="none", metrics=["dice"], progress=False)
    evaluate(run, dataset, tmp_path, split="val", options=options, predict=label_reader)
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return label_reader(batch)

    evaluate(run, dataset, tmp_path, split="val", options=options, predict=counting)
    assert calls == []
    (tmp_path / "masks").joinpath(next(iter(sorted((tmp_path / "masks").iterdir()))).name).unlink()
    evaluate(run, dataset, tmp_path, split="val", options=options, predict=counting)
    assert calls  # the case whose mask went missing was predicted again


def test_a_2d_run_predicts_slice_by_slice(synthetic, tmp_path):
    _, dataset, run = synthetic
    run_2d = tmp_path / "run2d"
    run_2d.mkdir()
    config = json.loads((run / "config.json").read_text())
    (run_2d / "config.json").write_text(json.dumps({**config, "model": "unet2d", "patch_size": [16, 16]}))
    shapes = []

    def reader(batch):
        shapes.append(batch.shape)
        return label_reader(batch)

    options = Options(pictures="none", metrics=["dice"], progress=False)
    summary = evaluate(run_2d, dataset, tmp_path / "out", split="val", options=options, predict=reader)
    assert {s[1:] for s in shapes} == {(16, 16, 1)} and max(s[0] for s in shapes) == 2
    assert summary["classes"]["2"]["dice"]["mean"] == 1.0


def test_cases_are_scored_and_written_in_source_label_values(tmp_path):
    """Classes 0, 1, 2 stand for source values 0, 4, 7 (e.g. after remapping): the mask holds 4 and 7, metrics are
    keyed by them, and a region is given in those values."""
    truth = np.zeros((4, 6, 6), dtype=np.uint8)
    truth[1:3, 1:4, 1:4] = 1
    truth[1:3, 4:6, 1:4] = 2
    prediction = truth.copy()
    prediction[1, 1, 1] = 0
    shape, affine, spacing = [4, 6, 6], np.eye(4).tolist(), [2, 1, 1]
    geometry = GeometryRecord(
        source_shape=shape,
        source_affine=affine,
        source_spacing=spacing,
        source_axcodes=["R", "A", "S"],
        oriented_shape=shape,
        crop_box=[[0, 4], [0, 6], [0, 6]],
        cropped_shape=shape,
        shape=shape,
        spacing=spacing,
        target_spacing=spacing,
        downsample=1,
        affine=affine,
    )
    case = {"id": "c1", "geometry": geometry, "writer": {}}
    options = Options(regions={"tumour": [4, 7]}, metrics=["dice", "volume_pred_ml"], pictures="none")
    names = {"4": "core", "7": "edge"}
    record = finish_case(tmp_path, case, prediction, truth, truth[..., None], np.eye(4), [0, 4, 7], names, options)
    assert set(record["metrics"]) == {"4", "7", "tumour"}
    assert record["metrics"]["7"]["dice"] == 1.0 and record["metrics"]["4"]["dice"] == pytest.approx(34 / 35)
    assert record["metrics"]["tumour"]["dice"] == pytest.approx(58 / 59)
    assert record["predicted_ml"] == {"4": 0.034, "7": 0.024}
    written = np.asarray(nib.load(tmp_path / "masks" / "c1.nii.gz").dataobj)
    assert sorted(np.unique(written).tolist()) == [0, 4, 7]


def test_foreground_cropped_cases_are_prepared_again_without_their_label(synthetic, tmp_path, monkeypatch):
    """Under --crop foreground the stored volume was cropped with the case's own label; evaluation must not use it."""
    raw, _, _ = synthetic
    dataset = tmp_path / "data"
    flags = ["--spacing", "original", "--normalize", "none", "--crop", "foreground", "--crop-margin", "1"]
    assert data_gen.main(["--input", str(raw), "--output", str(dataset), "--split", "0.5", "0.25", "0.25", *flags]) == 0
    run = make_run(tmp_path / "run", dataset)
    seen = []
    original = utils.evaluate.pipeline.prepare_case

    def spy(case, *args):
        seen.append(case.label)
        return original(case, *args)

    monkeypatch.setattr(utils.evaluate.pipeline, "prepare_case", spy)
    options = Options(pictures="none", metrics=["dice"], progress=False)
    summary = evaluate(run, dataset, tmp_path / "out", split="test", options=options, predict=label_reader)
    assert len(seen) == summary["num_cases"] == 2 and all(label is None for label in seen)
    assert summary["classes"]["2"]["dice"]["mean"] == 1.0


def test_a_dataset_of_another_manifest_version_is_refused_in_one_line(synthetic, tmp_path):
    """Evaluation and prediction on new images (which takes the training dataset's preprocessing) both refuse it."""
    raw, dataset, run = synthetic
    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": 0}))
    expected = (
        f"{old / 'manifest.json'}: prepared with an older version of data_gen.py (manifest version 0, this toolkit "
        f"reads 1); rerun data_gen.py --input {manifest['source']['path']} --output {old}"
    )
    options = Options(pictures="none", progress=False)
    with pytest.raises(ValueError) as error:
        evaluate(run, old, tmp_path / "out", options=options, predict=label_reader)
    assert str(error.value) == expected
    with pytest.raises(ValueError) as error:
        predict_images(run, raw, tmp_path / "out", data=old, options=options, predict=label_reader)
    assert str(error.value) == expected


def test_a_single_model_is_evaluated_slab_by_slab_with_the_masks_of_whole_probabilities(
    synthetic, tmp_path, monkeypatch
):
    """Without ``--save-probabilities`` a case's probabilities are arg-maxed slab by slab as the sliding window
    finishes them (``Predictor.probabilities`` is never called); the masks and scores are those of the whole
    probabilities, which ``--save-probabilities`` still makes."""
    raw, dataset, run = synthetic

    def soft(batch):  # the synthetic labels, blurred by a smooth function of the intensity (no exact ties)
        logits = np.stack([0.01 * batch[..., 0], -0.003 * batch[..., 0], np.sin(batch[..., 0])], axis=-1)
        return 0.8 * label_reader(batch) + 0.2 * np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    options = Options(progress=False, pictures="none", postprocess="none")
    whole = evaluate(run, dataset, tmp_path / "whole", split="all", options=replace(options, save_probabilities=True),
                     predict=soft)  # fmt: skip
    monkeypatch.setattr(utils.evaluate.pipeline.Predictor, "probabilities", lambda *a: pytest.fail("made whole"))
    streamed = evaluate(run, dataset, tmp_path / "streamed", split="all", options=options, predict=soft)
    assert whole["failures"] == streamed["failures"] == []
    masks = sorted((tmp_path / "whole" / "masks").glob("*.nii.gz"))
    assert len(masks) == 8
    for path in masks:
        expected = np.asarray(nib.load(path).dataobj)
        np.testing.assert_array_equal(
            np.asarray(nib.load(tmp_path / "streamed" / "masks" / path.name).dataobj), expected
        )
    assert whole["classes"]["1"]["dice"]["mean"] == streamed["classes"]["1"]["dice"]["mean"]
