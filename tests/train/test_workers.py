"""The toolkit's data loader: the same batches in the same order for any number and kind of workers, and workers
that die or raise stop training with a message naming the cause and a non-zero status instead of hanging, with the
checkpoint of the last complete epoch still loadable (faults injected into train.py by tests/train/worker_fault.py once
the first epoch is saved); worker processes end with the loader."""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

from utils.runs import load_model
from utils.train.augment import Augmenter, augmentation_settings
from utils.train.sampling import PatchSampler
from utils.train.workers import BatchLoader, DataLoaderError, describe_exit, guarded

TIMEOUT_S = 240  # a hang shows as a timeout; the runs below end in well under a minute


def train_with_fault(mode, data, run, worker_mode) -> tuple[int, str]:
    """Run tests/train/worker_fault.py; returns its exit status and stderr (a hang fails the test, killing its
    processes)."""
    command = [sys.executable, str(ROOT / "tests" / "train" / "worker_fault.py"), mode, "--data", str(data), "--output",
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
def test_a_failing_worker_stops_training_with_its_cause(synthetic, tmp_path, mode, worker_mode, message):
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


def sampler_args():
    """Image and label loaders of two random cases, their ids, the patch size and the number of classes."""
    rng = np.random.default_rng(0)
    images = {c: rng.normal(size=(12, 14, 13, 1)).astype(np.float32) for c in ("c0", "c1")}
    labels = {c: rng.integers(0, 3, size=(12, 14, 13)).astype(np.uint8) for c in images}
    return images.get, labels.get, ["c0", "c1"], (8, 8, 8), 3


def sampler(kind=PatchSampler, **kwargs):
    augment = Augmenter(augmentation_settings("strong", 3), 3)
    return kind(*sampler_args(), batch_size=3, steps_per_epoch=3, augment=augment, seed=2, **kwargs)


class Failing(PatchSampler):
    """A sampler whose batch 5 raises; in a worker process with ``kill``, batch 5 kills its worker instead."""

    kill = False

    def __getitem__(self, index):
        if index == 5 and self.kill and multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        if index == 5:
            raise RuntimeError("injected fault")
        return super().__getitem__(index)


# Keras reads two batches to learn their shapes, then starts again at 0 and reads on across epochs (3 steps each).
ORDER = [0, 1, 0, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(("workers", "mode"), [(0, "thread"), (2, "thread"), (3, "thread"), (1, "process"),
                                               (2, "process")])  # fmt: skip
def test_the_loader_hands_over_the_samplers_batches_in_order(workers, mode):
    direct = sampler()
    with BatchLoader(sampler(), workers, mode, max_queue_size=4) as loader:
        for index in ORDER:
            x, y = loader[index]
            expected = direct.batch(index // 3, index % 3)
            np.testing.assert_array_equal(x, expected[0])
            np.testing.assert_array_equal(y, expected[1])
    assert not multiprocessing.active_children()


def test_guarded_reads_the_samplers_worker_settings_and_ends_its_processes():
    direct = sampler()
    with guarded(sampler(workers=2, use_multiprocessing=True, max_queue_size=3)) as (loader, callbacks):
        assert isinstance(loader, BatchLoader) and loader.mode == "process" and loader.num_workers == 2
        assert loader.workers == 1 and not loader.use_multiprocessing  # Keras starts no workers of its own
        assert len(multiprocessing.active_children()) == 2 and len(callbacks) == 1
        np.testing.assert_array_equal(loader[4][0], direct[4][0])
    assert not multiprocessing.active_children()
    plain = object()
    with guarded(plain) as (data, callbacks):
        assert data is plain and callbacks == []


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_batch_that_raises_is_named_when_it_is_taken(mode):
    with BatchLoader(sampler(Failing), 2, mode, max_queue_size=4) as loader:
        for index in range(5):  # batch 5 failed while these were taken
            loader[index]
        with pytest.raises(
            DataLoaderError, match=r"worker .* raised RuntimeError: injected fault \(building batch 5\)"
        ):
            loader[5]
        assert "injected fault" in loader.failure


def test_a_killed_worker_process_fails_the_loader_within_seconds():
    failing = sampler(Failing)
    failing.kill = True
    with BatchLoader(failing, 2, "process", max_queue_size=4) as loader:
        started = time.monotonic()
        with pytest.raises(DataLoaderError, match=DIED):
            for index in range(10):  # batch 5 kills the worker that builds it
                loader[index]
        assert time.monotonic() - started < 10
        assert index <= 5
    assert not multiprocessing.active_children()
