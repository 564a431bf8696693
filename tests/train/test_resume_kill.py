"""A training process killed with SIGKILL in the middle of an epoch, then resumed with --resume, ends like the run
that was never interrupted: the same epochs, a continuous history.csv, the same learning rates and losses."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, STEPS, LR = 3, 150, 3e-3  # killed in the second epoch, resumed for two
TIMEOUT_S = 300


def command(data, run, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--output", str(run), "--epochs",
            str(EPOCHS), "--steps-per-epoch", str(STEPS), "--patch-size", "16", "16", "16", "--batch-size", "2",
            "--lr", str(LR), "--val-overlap", "0", "--no-tensorboard", "--deterministic", *extra]  # fmt: skip


def environment():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CI": "1", "CUDA_VISIBLE_DEVICES": ""}


def epochs_done(run):
    try:
        return json.loads((run / "state.json").read_text())["epoch"]
    except (FileNotFoundError, ValueError):
        return 0


def history_of(run):
    with open(run / "history.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(prepared_sample, tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen(command(prepared_sample, killed), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while epochs_done(killed) < 1 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # Into the steps of the second epoch: 150 steps take 1.6 s on a quiet AVX-512 EPYC core (11 ms a step), so a
        # fixed wait of a second or more could outlast the epoch; 0.3 s lands a few dozen steps in there, and earlier
        # in the epoch on a slower or busier machine.
        time.sleep(0.3)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert epochs_done(killed) == 1, "the kill did not land in the second epoch"
    assert [int(row["epoch"]) for row in history_of(killed)] == [0]

    resumed = subprocess.run(command(prepared_sample, killed, "--resume"), env=environment(), capture_output=True,
                             text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = subprocess.run(command(prepared_sample, reference), env=environment(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    history, expected = history_of(killed), history_of(reference)
    assert [int(row["epoch"]) for row in history] == list(range(EPOCHS)) == [int(r["epoch"]) for r in expected]
    assert epochs_done(killed) == EPOCHS
    times = [float(row["time_s"]) for row in history]
    assert times == sorted(times)
    poly = [LR * (1 - (epoch + (STEPS - 1) / STEPS) / EPOCHS) ** 0.9 for epoch in range(EPOCHS)]
    np.testing.assert_allclose([float(row["lr"]) for row in history], poly, rtol=1e-5)
    np.testing.assert_allclose(
        [float(row["loss"]) for row in history], [float(row["loss"]) for row in expected], rtol=1e-4
    )
