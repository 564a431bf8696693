"""Data-loader workers that die or raise: training stops with a message naming the cause and a non-zero status
instead of hanging, and the checkpoint of the last complete epoch stays loadable. The faults are injected by
tests/worker_fault.py once the first epoch is saved."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import ROOT
from test_evaluate import synthetic  # noqa: F401  (a fixture: a tiny prepared dataset)

from utils.runs import load_model
from utils.train.workers import describe_exit

TIMEOUT_S = 240  # a hang shows as a timeout; the runs below end in well under a minute


def train_with_fault(mode, data, run, worker_mode) -> tuple[int, str]:
    """Run tests/worker_fault.py; returns its exit status and stderr (a hang fails the test, killing its processes)."""
    command = [sys.executable, str(ROOT / "tests" / "worker_fault.py"), mode, "--data", str(data), "--output",
               str(run), "--epochs", "4", "--steps-per-epoch", "30", "--patch-size", "16", "16", "16",
               "--batch-size", "2", "--val-overlap", "0", "--no-tensorboard", "--workers", "2",
               "--worker-mode", worker_mode]  # fmt: skip
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CI": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"training with a failing worker ({mode}, {worker_mode}) hung for {TIMEOUT_S} s")
    return process.returncode, stderr


DIED = r"a data-loader worker process \(pid \d+\) died \(killed by signal 9, SIGKILL; out of memory\?\)"
RAISED = r"raised RuntimeError: injected fault at batch \d+"


@pytest.mark.parametrize(
    ("mode", "worker_mode", "message"),
    [
        pytest.param("kill", "process", DIED, id="process-killed-while-building"),
        pytest.param("oom", "process", DIED, id="process-killed-from-outside"),
        pytest.param("raise", "process", r"a data-loader worker process \(pid \d+\) " + RAISED, id="process-raises"),
        pytest.param("raise", "thread", r"a data-loader worker thread \(.*\) " + RAISED, id="thread-raises"),
    ],
)
def test_a_failing_worker_stops_training_with_its_cause(synthetic, tmp_path, mode, worker_mode, message):  # noqa: F811
    _, dataset, _ = synthetic
    run = tmp_path / "run"
    code, stderr = train_with_fault(mode, dataset, run, worker_mode)
    lines = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]
    assert "--resume" in lines[0] and "Traceback" not in stderr
    state = json.loads((run / "state.json").read_text())
    assert 1 <= state["epoch"] < 4
    assert not list(run.glob(".*.tmp*"))
    load_model(run / "last.keras")  # the last complete epoch is intact


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (-signal.SIGKILL, "killed by signal 9, SIGKILL; out of memory?"),
        (-signal.SIGSEGV, "killed by signal 11, SIGSEGV"),
        (3, "exited with status 3"),
    ],
)
def test_exit_codes_are_described(code, words):
    assert describe_exit(code) == words
