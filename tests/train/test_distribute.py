"""Data-parallel training: MirroredStrategy over two logical CPU devices and a two-process
MultiWorkerMirroredStrategy run on loopback, each in subprocesses (the devices of a process are fixed when
TensorFlow starts); the strategy object's bookkeeping."""

import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from utils.train.distribute import Distribution, make_distribution

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--patch-size", "16", "16", "16", "--batch-size", "2", "--steps-per-epoch", "3", "--no-tensorboard"]
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute needs tensorflow")

TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {root!r})
import train
sys.exit(train.main(sys.argv[1:]))
"""


def environment(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "CI": "1", **extra}


def history_of(run):
    with open(run / "history.csv") as handle:
        return list(csv.DictReader(handle))


def test_default_strategy_is_one_replica_that_keeps_the_sampler():
    distribution = make_distribution("default")
    assert distribution.num_replicas == 1 and distribution.is_chief and distribution.strategy is None
    assert distribution.agree(3.5) == 3.5
    sampler = object()
    assert distribution.input_for_fit(sampler) is sampler
    with pytest.raises(ValueError, match="strategy must be one of"):
        make_distribution("ring")


def test_learning_rate_scaling_with_replicas():
    eight = Distribution("mirrored", None, 8, 1, 0)
    assert eight.scaled_lr(0.01, "none") == 0.01
    assert eight.scaled_lr(0.01, "linear") == pytest.approx(0.08)
    assert eight.scaled_lr(0.01, "sqrt") == pytest.approx(0.01 * np.sqrt(8))


def test_multiworker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        make_distribution("multiworker")


def test_mirrored_strategy_trains_over_two_logical_cpus(prepared_sample, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-c", TWO_CPUS.format(root=str(ROOT)), "--data", str(prepared_sample), "--output",
               str(run), "--strategy", "mirrored", "--epochs", "2", "--grad-clip", "5", *TINY]  # fmt: skip
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["replicas"] == 2 and config["batch_size"] == 2 and config["global_batch_size"] == 4
    history = history_of(run)
    assert len(history) == 2 and all(np.isfinite(float(row["loss"])) for row in history)
    assert 0 <= float(history[-1]["val_dice"]) <= 1


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multiworker_strategy_trains_with_two_processes_on_loopback(prepared_sample, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(prepared_sample), "--output", str(run),
               "--strategy", "multiworker", "--epochs", "2", *TINY]  # fmt: skip
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log = open(tmp_path / f"worker{index}.log", "w")
        workers.append(subprocess.Popen(command, env=environment(TF_CONFIG=tf_config), stdout=log, stderr=log))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        codes = [worker.wait(timeout=max(1.0, deadline - time.monotonic())) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    logs = [(tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], logs
    config = json.loads((run / "config.json").read_text())
    assert config["replicas"] == 2 and config["global_batch_size"] == 4
    history = history_of(run)
    assert [int(row["epoch"]) for row in history] == [0, 1]
    assert all(np.isfinite(float(row["loss"])) for row in history)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_data_parallel_trains_over_two_cpu_devices(prepared_sample, tmp_path):
    """Under KERAS_BACKEND=jax, --strategy mirrored is keras.distribution.DataParallel over the local devices (two CPU
    devices forced through XLA_FLAGS)."""
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(prepared_sample), "--output", str(run),
               "--strategy", "mirrored", "--epochs", "2", *TINY]  # fmt: skip
    quick = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # compiling is most of it
    flags = f"--xla_force_host_platform_device_count=2 {quick}"
    env = environment(KERAS_BACKEND="jax", XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["backend"] == "jax"
    assert config["replicas"] == 2 and config["batch_size"] == 2 and config["global_batch_size"] == 4
    history = history_of(run)
    assert len(history) == 2 and all(np.isfinite(float(row["loss"])) for row in history)
    assert 0 <= float(history[-1]["val_dice"]) <= 1
