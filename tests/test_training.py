"""Training: planning from the fingerprint, config validation, history files, resuming where a run stopped."""

import csv
import json

import numpy as np
import pytest

import train
from utils.dataset import PreparedDataset
from utils.training import plan_batch_size, read_history, resolve_config, write_history

TINY = ["--patch-size", "16", "16", "16", "--batch-size", "2", "--steps-per-epoch", "3"]


def test_patch_size_is_planned_from_the_median_shape(prepared_sample):
    dataset = PreparedDataset(prepared_sample)
    config = resolve_config({"data": str(prepared_sample), "output": "x", "model": "unet3d"}, dataset)
    median = dataset.fingerprint["median_shape"]  # about 36 x 50 x 35 voxels for Hippocampus
    assert all(p >= m and p % 8 == 0 for p, m in zip(config["patch_size"], median, strict=True))
    assert all(p - m < 8 for p, m in zip(config["patch_size"], median, strict=True))
    assert config["batch_size"] == 4
    assert config["num_classes"] == 3 and config["num_channels"] == 1
    config_2d = resolve_config({"data": str(prepared_sample), "output": "x", "model": "unet2d"}, dataset)
    assert len(config_2d["patch_size"]) == 2 and config_2d["patch_size"] == config["patch_size"][1:]


def test_batch_size_plan():
    assert plan_batch_size({"patch_size": [128, 128, 128]}) == 2
    assert plan_batch_size({"patch_size": [40, 56, 40]}) == 4
    assert plan_batch_size({"patch_size": [512, 512]}) == 2
    assert plan_batch_size({"patch_size": [64, 64]}) == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "nonet3d"}, "unknown model"),
        ({"patch_size": [16, 16]}, "patch size of 3"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"learning_rate": 0.1}, "unknown setting"),
    ],
)
def test_bad_settings_are_refused_before_any_work(prepared_sample, overrides, message):
    dataset = PreparedDataset(prepared_sample)
    with pytest.raises(ValueError, match=message):
        resolve_config({"data": str(prepared_sample), "output": "x", **overrides}, dataset)


def test_history_round_trip(tmp_path):
    rows = [{"epoch": 0, "loss": 1.5, "val_dice": float("nan")}, {"epoch": 1, "loss": 0.5, "val_dice": 0.7}]
    write_history(tmp_path / "history.csv", rows)
    back = read_history(tmp_path / "history.csv")
    assert back[1] == {"epoch": 1.0, "loss": 0.5, "val_dice": 0.7}
    assert np.isnan(back[0]["val_dice"])


def test_resume_continues_where_the_run_stopped(prepared_sample, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--data", str(prepared_sample), "--output", str(run), "--epochs", "2", *TINY]) == 0
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 2
    assert train.main(["--data", str(prepared_sample), "--output", str(run), "--epochs", "3", "--resume"]) == 0
    with open(run / "history.csv") as handle:
        epochs = [int(float(row["epoch"])) for row in csv.DictReader(handle)]
    assert epochs == [0, 1, 2]
    assert json.loads((run / "state.json").read_text())["epoch"] == 3
    config = json.loads((run / "config.json").read_text())
    assert config["patch_size"] == [16, 16, 16] and config["epochs"] == 3
    assert config["backend"] in ("tensorflow", "jax", "torch")


def test_resume_without_a_run_is_a_clear_error(prepared_sample, tmp_path, capsys):
    assert train.main(["--data", str(prepared_sample), "--output", str(tmp_path / "none"), "--resume"]) == 2
    assert "cannot --resume" in capsys.readouterr().err


def test_config_file_sets_keys_and_flags_win(prepared_sample, tmp_path):
    config_file = tmp_path / "settings.yaml"
    config_file.write_text("epochs: 1\nsteps-per-epoch: 2\nbatch_size: 2\npatch_size: [16, 16, 16]\nlr: 0.01\n")
    run = tmp_path / "run"
    assert (
        train.main(
            ["--config", str(config_file), "--data", str(prepared_sample), "--output", str(run), "--lr", "0.002"]
        )
        == 0
    )
    config = json.loads((run / "config.json").read_text())
    assert config["steps_per_epoch"] == 2 and config["lr"] == 0.002


def test_config_file_with_unknown_key_is_refused(prepared_sample, tmp_path, capsys):
    config_file = tmp_path / "settings.yaml"
    config_file.write_text("epochs: 1\nlearnig_rate: 0.1\n")
    assert (
        train.main(["--config", str(config_file), "--data", str(prepared_sample), "--output", str(tmp_path / "run")])
        == 2
    )
    assert "learnig_rate" in capsys.readouterr().err
