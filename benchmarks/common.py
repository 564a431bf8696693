"""Shared pieces of the benchmarks: interleaved worker processes, load averages, machine facts, prepared data.

Each side of a comparison (ours, MONAI, ...) runs in its own worker process (``worker.py``), so TensorFlow's and
PyTorch's thread pools never share a process. The parent starts every worker, waits until each has built its model
or dataset and warmed up, then asks them for one repetition at a time in alternation (the order rotates each round),
so that the background load of this shared machine falls on every side alike. Every repetition records the 1-minute
load average beside its figure.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SHARED_DATA = REPO.parent / "shared" / "data"
HIPPOCAMPUS = SHARED_DATA / "msd_hippocampus"
LUNG1 = SHARED_DATA / "pyradiomics" / "lung1_image.nrrd"
PATCH = (40, 56, 40)
NUM_CLASSES = 3
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
# PyTorch's OpenMP threads spin at barriers by default; on this shared 2-core machine a spinning thread steals the
# core its partner needs and PyTorch's step time doubles or worse under background load, while TensorFlow's thread
# pool is unaffected. Passive waiting keeps the peer from losing to the load (train_step.py measures both).
# TensorFlow does not use OpenMP, so the setting is neutral for our side.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# oneDNN on, as every entry point of the toolkit sets it (utils/device.py), unless the caller chose.
ONEDNN_ENV = {"TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")}

# The targets of issue 14, each ours / the peer in one run (higher is better): train step against plain PyTorch on
# the same network, the augmented data pipeline, sliding-window inference on *each* volume set, preprocessing.
TARGETS = {"train_step": 1.0, "data_pipeline": 2.0, "inference": 1.5, "preprocessing": 2.0}
# Quality: held-out mean foreground dice at least QUALITY_FLOOR after a 10-minute budget (not asked of the quick run's
# 1.5 minutes) and at least the peer's + QUALITY_MARGIN, both sides trained for the same wall time within EQUAL_TIME.
QUALITY_FLOOR, QUALITY_MARGIN, EQUAL_TIME = 0.875, 0.01, 0.05


def verdict(name: str, result: dict) -> tuple[bool, str]:
    """Whether one benchmark's result meets its target, and the target in words."""
    if name == "quality":
        ours, peer = result["ours"]["heldout_dice"], result["monai"]["heldout_dice"]
        times = result["train_seconds"]
        ok = ours >= peer + QUALITY_MARGIN and abs(times["ours"] / times["monai"] - 1) <= EQUAL_TIME
        words = f"dice >= MONAI + {QUALITY_MARGIN}, equal time ±{EQUAL_TIME:.0%}"
        if result["minutes"] >= 10:
            ok, words = ok and ours >= QUALITY_FLOOR, f"dice >= {QUALITY_FLOOR} and {words}"
        return ok, words
    if name == "inference":
        ratios = [figures["ratio"] for figures in result["by_volume"].values()]
        return min(ratios) >= TARGETS[name], f">= {TARGETS[name]} on each volume set"
    return result["ratio"] >= TARGETS[name], f">= {TARGETS[name]}"


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    with open("/proc/loadavg") as handle:
        return [float(v) for v in handle.read().split()[:3]]


def summarize(values: Sequence[float]) -> dict:
    """Median, min, max and count of repeated measurements."""
    array = np.asarray(values, dtype=float)
    return {
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
        "n": int(array.size),
    }


def machine() -> dict:
    """CPU model, its kind and vector instructions, core count, memory, OS and library versions of this machine."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from utils.device import cpu_info

    cpu = cpu_info()
    with open("/proc/meminfo") as handle:
        memory_kb = int(handle.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu["model"],
        "cpu_kind": cpu["kind"],
        "isa": cpu["isa"],
        "TF_ENABLE_ONEDNN_OPTS": ONEDNN_ENV["TF_ENABLE_ONEDNN_OPTS"],
        # oneDNN capped below the CPU's own instruction set (AVX2 reproduced on an AVX-512 CPU), or None
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "memory_gib": round(memory_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def library_versions() -> dict:
    """Versions of the libraries compared, read in a subprocess (importing them here would start their threads)."""
    code = (
        "import json, importlib.metadata as m\n"
        "names = ['tensorflow', 'keras', 'torch', 'monai', 'numpy', 'scipy', 'nibabel', 'SimpleITK']\n"
        "out = {}\n"
        "for n in names:\n"
        "    try:\n"
        "        out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def bench_env(**extra: str | None) -> dict:
    """The environment of a worker or script: the repository on the path, quiet libraries, passive OpenMP waiting,
    plus ``extra`` (a ``None`` value removes the variable)."""
    env = {**os.environ, **QUIET_ENV, **OMP_ENV, **ONEDNN_ENV, **extra}
    env = {key: value for key, value in env.items() if value is not None}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class Worker:
    """One side of a comparison in its own process; see ``worker.py`` for the protocol.

    Args:
        module: benchmark module defining ``WORKERS``.
        side: key of ``WORKERS``.
        options: keyword arguments of the worker class (JSON-serialisable).
        log_dir: where the worker's stderr goes.
        env: extra environment variables (``KERAS_BACKEND``).
    """

    def __init__(self, module: str, side: str, options: dict, log_dir: Path, env: dict | None = None, label=None):
        self.name = f"{module}.{label or side}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "worker.py"), module, side, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=str(REPO),
            env=bench_env(**(env or {})),
        )

    def _read(self, tag: str):
        for line in self.process.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag) :])
            self._log.write(line)
        raise RuntimeError(f"worker {self.name} ended early (exit {self.process.wait()}); see {self.log_path}")

    def ready(self) -> dict:
        """Wait until setup and warm-up are done; returns the worker's description of itself."""
        return self._read("READY ")

    def run(self) -> dict:
        """One repetition; its figures plus the load average at its end."""
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        result = self._read("RESULT ")
        result["loadavg"] = loadavg()
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log.close()


def interleave(module: str, sides: dict[str, tuple[str, dict, dict | None]], reps: int, log_dir: Path) -> dict:
    """Run the sides of a comparison in alternation.

    Args:
        module: benchmark module name.
        sides: ``{label: (worker side, options, env)}``.
        reps: repetitions per side.
        log_dir: worker logs.

    Returns:
        ``{label: {"info": ready info, "reps": [result, ...]}}``.
    """
    workers = {}
    out = {}
    try:
        # Start and warm up one at a time, so that no side's set-up slows another's warm-up.
        for label, (side, options, env) in sides.items():
            workers[label] = Worker(module, side, options, log_dir, env, label)
            out[label] = {"info": workers[label].ready(), "reps": []}
        labels = list(sides)
        for rep in range(reps):
            shift = rep % len(labels)
            for label in labels[shift:] + labels[:shift]:
                out[label]["reps"].append(workers[label].run())
    finally:
        for worker in workers.values():
            worker.close()
    return out


def run_script(args: Sequence[str], log_path: Path, env: dict | None = None, timeout: float | None = None) -> float:
    """Run a command from the repository root, its output to ``log_path``; returns its wall-clock seconds.

    Raises:
        RuntimeError: a non-zero exit status, naming the log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(
            list(args), cwd=str(REPO), env=bench_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT,
            timeout=timeout,
        ).returncode  # fmt: skip
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited with {code}; see {log_path}")
    return seconds


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy across file systems): data_gen.py refuses a symbolic link out
    of the dataset folder."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def msd_subset(source: Path, case_ids: Sequence[str], target: Path) -> Path:
    """An MSD-layout folder holding only ``case_ids`` of ``source`` (hard links or copies, a filtered dataset.json)."""
    if target.exists():
        shutil.rmtree(target)
    (target / "imagesTr").mkdir(parents=True)
    (target / "labelsTr").mkdir(parents=True)
    meta = json.loads((source / "dataset.json").read_text())
    wanted = set(case_ids)
    meta["training"] = [c for c in meta["training"] if Path(c["image"]).name.split(".")[0] in wanted]
    meta["numTraining"], meta["test"], meta["numTest"] = len(meta["training"]), [], 0
    for case in meta["training"]:
        for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            name = Path(case[key]).name
            link_or_copy(source / folder / name, target / folder / name)
    (target / "dataset.json").write_text(json.dumps(meta, indent=2))
    return target


def hippocampus_ids() -> list[str]:
    """Every case id of the shared MSD Hippocampus dataset, sorted."""
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    return sorted(Path(c["image"]).name.split(".")[0] for c in meta["training"])


def prepared_hippocampus(workdir: Path, log_dir: Path) -> Path:
    """The 200 Hippocampus cases prepared once by ``data_gen.py`` (a rerun skips finished cases)."""
    out = workdir / "prepared" / "hippocampus"
    if not (out / "manifest.json").is_file():
        run_script(
            [sys.executable, "data_gen.py", "--input", str(HIPPOCAMPUS), "--output", str(out), "--workers", "2"],
            log_dir / "prepare_hippocampus.log",
        )
    return out


def prepared_images(data: str | Path, split: str) -> list[str]:
    """Image ``.npy`` paths of a split of a prepared dataset (read from its JSON files, without the toolkit)."""
    data = Path(data)
    cases = {c["id"]: c for c in json.loads((data / "manifest.json").read_text())["cases"]}
    ids = json.loads((data / "splits.json").read_text())[split]
    return [str(data / cases[c]["image"]) for c in ids]


def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "keras-medseg-bench"
