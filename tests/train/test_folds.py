"""train.py --fold I: fold I's train and val split from splits.json, into runs/NAME/fold_I/, a run folder that
evaluates on its own; folds that do not exist are refused before any work; two trained folds ensembled and
cross-validated through evaluation.py (slow)."""

import json
import shutil

import builders
import numpy as np
import pytest

import data_gen
import evaluation
import train
from utils.evaluate.options import Options
from utils.evaluate.pipeline import evaluate
from utils.runs import load_config

TINY = ["--patch-size", "8", "16", "16", "--batch-size", "2", "--steps-per-epoch", "2", "--epochs", "1",
        "--model-args", '{"filters": 4, "depth": 2}', "--no-tensorboard", "--validation", "volumes"]  # fmt: skip


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """Four synthetic cases prepared in two folds (original spacing, no normalisation)."""
    root = tmp_path_factory.mktemp("folded")
    raw = builders.write_msd(root / "raw", cases=4)
    flags = ["--spacing", "original", "--normalize", "none", "--folds", "2", "--seed", "3"]
    assert data_gen.main(["--input", str(raw), "--output", str(root / "data"), *flags]) == 0
    return root / "data"


def test_a_fold_trains_on_its_split_into_its_own_run_folder_that_evaluates_alone(folded, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--data", str(folded), "--output", str(run), "--fold", "1", *TINY]) == 0
    folder = run / "fold_1"
    config = load_config(folder)
    assert config.fold == 1 and config.output == str(folder) and (folder / "model.keras").is_file()
    assert not (run / "config.json").exists()
    fold = json.loads((folded / "splits.json").read_text())["folds"][1]
    assert f"Validation after each epoch: volumes of {len(fold['val'])} cases" in (folder / "train.log").read_text()
    options = Options(pictures="none", metrics=["dice"], progress=False, tta=False)
    summary = evaluate(folder, folded, tmp_path / "results", split="val", options=options)
    assert summary["failures"] == [] and summary["num_cases"] == len(fold["val"])  # its own fold's val
    assert sorted(json.loads(p.read_text())["id"] for p in (tmp_path / "results" / "cases").iterdir()) == sorted(
        fold["val"]
    )


def test_folds_the_dataset_does_not_hold_are_refused_before_any_work(folded, tmp_path, capsys):
    assert train.main(["--data", str(folded), "--output", str(tmp_path / "run"), "--fold", "2", *TINY]) == 2
    assert f"{folded / 'splits.json'}: no fold 2; it holds folds 0 to 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert train.main(["--data", str(folded), "--output", str(tmp_path / "run"), "--fold", "-1"]) == 2
    assert "setting 'fold' must be an integer >= 0" in capsys.readouterr().err
    plain = tmp_path / "plain"
    splits = json.loads((folded / "splits.json").read_text())
    plain.mkdir()
    for name in ("manifest.json", "fingerprint.json"):
        (plain / name).write_text((folded / name).read_text())
    (plain / "splits.json").write_text(json.dumps({k: splits[k] for k in ("train", "val", "test")}))
    assert train.main(["--data", str(plain), "--output", str(tmp_path / "run"), "--fold", "0"]) == 2
    assert f"{plain / 'splits.json'}: holds no folds; prepare the dataset with data_gen.py --folds K" in (
        capsys.readouterr().err
    )
    args = ["--data", str(folded), "--output", str(tmp_path / "run"), "--fold", "0", "--source", "slices"]
    assert train.main(args) == 2
    assert "--fold 0 trains from volumes/ only" in capsys.readouterr().err


@pytest.mark.slow
def test_two_trained_folds_ensemble_and_cross_validate_from_the_command_line(folded, tmp_path):
    run = tmp_path / "run"
    for fold in ("0", "1"):
        assert train.main(["--data", str(folded), "--output", str(run), "--fold", fold, *TINY]) == 0
    flags = ["--run", str(run), "--data", str(folded), "--pictures", "none", "--quiet", "--metrics", "dice"]
    assert evaluation.main([*flags, "--split", "cv", "--output", str(tmp_path / "cv"), "--save-probabilities"]) == 0
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    folds = json.loads((folded / "splits.json").read_text())["folds"]
    assert summary["num_cases"] == 4 and summary["settings"]["folds"] == [0, 1] and summary["settings"]["tta"]
    assert [summary["folds"][k]["num_cases"] for k in ("0", "1")] == [len(f["val"]) for f in folds]
    for case_id in folds[0]["val"] + folds[1]["val"]:
        probabilities = np.load(tmp_path / "cv" / "probabilities" / f"{case_id}.npz")["probabilities"]
        assert probabilities.shape[0] == 3 and np.isfinite(probabilities).all()
        assert (tmp_path / "cv" / "probabilities" / f"{case_id}.nii.gz").is_file()
    assert evaluation.main([*flags, "--split", "all", "--output", str(tmp_path / "all"), "--no-tta"]) == 0
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["num_cases"] == 4
    record = run / "fold_1" / "dataset" / "splits.json"  # the run's record of what it trained on
    assert json.loads(record.read_text())["train"] == folds[1]["train"]
    shutil.rmtree(record.parent)  # a resumed run without the record writes it again, from the split it resumes with
    resume = ["--data", str(folded), "--output", str(run / "fold_1"), "--resume", "--epochs", "2"]
    assert train.main(resume) == 0  # the fold folder itself, without --fold: its config.json names the fold
    assert json.loads(record.read_text())["train"] == folds[1]["train"] and load_config(run / "fold_1").fold == 1
