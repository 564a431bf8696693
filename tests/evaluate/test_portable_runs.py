"""A prepared dataset and a run that moved: evaluation.py --data finds raw files with --source-root or scores against
the prepared labels with a note; a run predicts new images from its own dataset/ record after the training dataset
is gone, with the same masks."""

import json
import shutil

import builders
import nibabel as nib
import numpy as np
import pytest
from builders import label_reader
from conftest import SAMPLE

import data_gen
import evaluation
import train
from utils.evaluate.options import Options
from utils.evaluate.pipeline import evaluate
from utils.evaluate.sources import from_prepared
from utils.formats import load_case
from utils.prepared import PreparedDataset
from utils.preprocessing import restore_label

FLAGS = ["--spacing", "original", "--normalize", "none", "--crop", "nonzero", "--split", "0.5", "0.25", "0.25"]
OPTIONS = Options(progress=False, pictures="overlays", metrics=["dice", "hd95"])


def masks(folder):
    """``{file name: (voxels, affine)}`` of the NIfTI masks of a results folder."""
    return {
        p.name: (np.asarray(nib.load(p).dataobj), nib.load(p).affine)
        for p in sorted((folder / "masks").glob("*.nii.gz"))
    }


def assert_same_masks(first, second):
    a, b = masks(first), masks(second)
    assert sorted(a) == sorted(b) and a
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0])
        np.testing.assert_array_equal(a[name][1], b[name][1])


def test_scores_fall_back_to_the_prepared_labels_when_the_raw_files_are_gone(tmp_path):
    raw = builders.write_msd(tmp_path / "raw", cases=4)
    data = tmp_path / "data"
    assert data_gen.main(["--input", str(raw), "--output", str(data), *FLAGS]) == 0
    run = builders.make_run(tmp_path / "run", data)
    before = evaluate(run, data, tmp_path / "before", split="all", options=OPTIONS, predict=label_reader)
    assert 0 < before["classes"]["1"]["dice"]["mean"] < 1  # the islands are called core

    shutil.move(str(raw), str(tmp_path / "archive"))
    after = evaluate(run, data, tmp_path / "after", split="all", options=OPTIONS, predict=label_reader)
    log = (tmp_path / "after" / "evaluation.log").read_text()
    notes = [line for line in log.splitlines() if "prepared labels" in line]
    assert len(notes) == 1 and "the source files of 4 of 4 case(s) are not under" in notes[0]
    assert "--source-root" in notes[0]
    assert after["failures"] == [] and after["classes"] == before["classes"]  # no resampling: the labels are exact
    assert (tmp_path / "after" / "metrics.csv").read_bytes() == (tmp_path / "before" / "metrics.csv").read_bytes()
    assert_same_masks(tmp_path / "before", tmp_path / "after")
    record = json.loads((tmp_path / "after" / "cases" / "case_000.json").read_text())
    assert record["truth"] == "prepared" and (tmp_path / "after" / record["overlay"]).is_file()

    archive = tmp_path / "archive"
    found = evaluate(
        run, data, tmp_path / "found", split="all", options=OPTIONS, predict=label_reader, source_root=archive
    )
    assert "prepared labels" not in (tmp_path / "found" / "evaluation.log").read_text()
    assert found["classes"] == before["classes"]
    assert "truth" not in json.loads((tmp_path / "found" / "cases" / "case_000.json").read_text())


def test_a_case_rebuilt_from_its_prepared_volumes_is_its_source_inside_the_crop(synthetic):
    _, dataset, _ = synthetic  # original spacing, no normalisation, nonzero crop: the inverse is exact
    prepared = PreparedDataset(dataset)
    for case_id in prepared.cases:
        source, rebuilt = load_case(prepared.spec(case_id)), from_prepared(prepared, case_id)
        record = prepared.geometry(case_id)
        np.testing.assert_array_equal(rebuilt.label, source.label)
        np.testing.assert_array_equal(rebuilt.affine, source.affine)
        assert rebuilt.image.shape == source.image.shape
        inside = restore_label(np.ones(record.shape, np.uint8), record).astype(bool)  # the crop box, source order
        np.testing.assert_array_equal(rebuilt.image[inside], source.image[inside])
        assert np.all(rebuilt.image[~inside] == prepared.image(case_id).min())


def test_a_missing_source_root_is_refused_in_one_line(tmp_path, capsys):
    raw = builders.write_msd(tmp_path / "raw", cases=2)
    data = tmp_path / "data"
    assert data_gen.main(["--input", str(raw), "--output", str(data), *FLAGS[:-4]]) == 0
    run = builders.make_run(tmp_path / "run", data)
    argv = ["--run", str(run), "--data", str(data), "--output", str(tmp_path / "out"), "--source-root", "gone"]
    capsys.readouterr()
    assert evaluation.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "evaluation.py: error: gone: --source-root folder not found"
    ]


@pytest.mark.slow
def test_a_run_and_its_dataset_moved_with_the_raw_files_gone_still_predict_and_evaluate(tmp_path):
    raw = builders.hippocampus_subset(tmp_path / "raw", SAMPLE, cases=("001", "011", "020", "034", "040"))
    data, run = tmp_path / "data", tmp_path / "runs" / "tiny"
    assert data_gen.main(["--input", str(raw), "--output", str(data), "--split", "0.6", "0.2", "0.2"]) == 0
    short = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--no-tensorboard"]
    tiny = ["--model", "unet3d", "--model-args", '{"filters": 4, "depth": 2}', "--patch-size", "16", "16", "16"]
    assert train.main(["--data", str(data), "--output", str(run), *tiny, *short]) == 0
    record = json.loads((run / "dataset" / "manifest.json").read_text())
    manifest = json.loads((data / "manifest.json").read_text())
    for key in ("labels", "label_values", "channels", "preprocessing", "resolved"):
        assert record[key] == manifest[key], key
    assert (run / "dataset" / "fingerprint.json").read_bytes() == (data / "fingerprint.json").read_bytes()
    assert json.loads((run / "dataset" / "splits.json").read_text()) == json.loads((data / "splits.json").read_text())
    quick = ["--no-tta", "--pictures", "none", "--quiet", "--metrics", "dice"]

    def predict(name, images):
        return evaluation.main(["--run", str(run), "--input", str(images), "--output", str(tmp_path / name), *quick])

    def score(name, dataset, *flags):
        argv = ["--run", str(run), "--data", str(dataset), "--split", "all", "--output", str(tmp_path / name)]
        return evaluation.main([*argv, *quick, *flags])

    assert predict("new_before", raw) == 0 and score("scored_before", data) == 0
    moved = tmp_path / "elsewhere" / "data"
    shutil.move(str(data), str(moved))
    shutil.move(str(raw), str(tmp_path / "archive"))
    assert predict("new_after", tmp_path / "archive") == 0  # the training dataset is not where config.json says
    assert_same_masks(tmp_path / "new_before", tmp_path / "new_after")
    assert score("scored_without_raw", moved) == 0
    assert "prepared labels" in (tmp_path / "scored_without_raw" / "evaluation.log").read_text()
    assert score("scored_with_raw", moved, "--source-root", str(tmp_path / "archive")) == 0
    before = (tmp_path / "scored_before" / "metrics.csv").read_bytes()
    assert (tmp_path / "scored_with_raw" / "metrics.csv").read_bytes() == before
    assert (tmp_path / "scored_without_raw" / "metrics.csv").read_bytes() == before  # 1 mm cases, not resampled
    shutil.rmtree(moved)
    assert predict("new_without_dataset", tmp_path / "archive") == 0
    assert_same_masks(tmp_path / "new_before", tmp_path / "new_without_dataset")
