"""The machine a run uses: the CPU kind and its vector instructions, the accelerators the Keras backend sees, and the
TensorFlow switch that decides CPU speed.

TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI-class instructions; on an AVX2-only
CPU (most AMD servers and workstations, many laptops) it falls back to its own kernels, which made the toolkit's
train step 7 times slower there. :func:`enable_onednn` turns oneDNN on unless the user chose
(``TF_ENABLE_ONEDNN_OPTS`` set to anything): every entry point calls it before TensorFlow is imported. Nothing here
imports a deep-learning library at module level.

TensorFlow's start-up lines (``oneDNN custom operations are on``, ``Could not find cuda drivers``, ``failed call to
cuInit``) come from its C++ code, partly before absl's logging is initialised and so past ``TF_CPP_MIN_LOG_LEVEL``:
:func:`quiet_startup` raises that level to 3 and imports Keras (and so its backend) while the process's standard
error goes to a temporary file, then writes back every line that is not one of those start-up lines. ``--verbose``
on the scripts skips both.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
# The instruction-set flags (Linux /proc/cpuinfo names) that decide which kernels TensorFlow, PyTorch and XLA use.
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
)


def enable_onednn() -> str:
    """Set ``TF_ENABLE_ONEDNN_OPTS=1`` unless it is set already; returns the value in force.

    Call before TensorFlow is imported (it reads the variable once, at import).
    """
    return os.environ.setdefault(ONEDNN_VARIABLE, "1")


LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# Lines TensorFlow's C++ code prints on every start: absl's notice, oneDNN, CUDA probing on a machine without a GPU.
STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|Could not find cuda drivers|"
    r"failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
    r"TF-TRT Warning|This TensorFlow binary is optimized to use available CPU instructions|"
    r"To enable the following instructions|rebuild TensorFlow with the appropriate compiler flags"
)


def quiet_startup(verbose: bool = False) -> None:
    """Hide TensorFlow's and CUDA's start-up lines unless ``verbose``; call before Keras is imported.

    Sets ``TF_CPP_MIN_LOG_LEVEL=3`` (errors are still raised as Python exceptions) unless the user set it, then
    imports Keras with the process's standard error (file descriptor 2, which C++ writes to) caught, and writes back
    every caught line but :data:`STARTUP_NOISE`. Does nothing when Keras is imported already, or with ``verbose``.
    """
    if verbose or "keras" in sys.modules:
        return
    os.environ.setdefault(LOG_LEVEL_VARIABLE, "3")
    with filtered_stderr():
        import keras  # noqa: F401  (imports the backend, whose C++ start-up lines are filtered)

        if keras.backend.backend() == "tensorflow":
            import absl.logging
            import tensorflow as tf

            absl.logging.set_verbosity(absl.logging.ERROR)
            tf.config.list_physical_devices()  # CUDA is probed here: its lines fall into the filter too


class filtered_stderr:
    """Send file descriptor 2 to a temporary file; on exit restore it and write back the lines that are not noise."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._file = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc_info) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        text = self._file.read().decode(errors="replace")
        self._file.close()
        kept = [line for line in text.splitlines() if line.strip() and not STARTUP_NOISE.search(line)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")


def cpu_info(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """The CPU model, its vendor, the cores this process may use and which of :data:`ISA_FLAGS` it has.

    Returns:
        ``{"model": "AMD EPYC 7B13", "vendor": "AuthenticAMD", "cores": 2, "isa": {"avx2": True, ...},
        "kind": "avx2"}``; ``kind`` is the widest vector extension (``amx``, ``avx512``, ``avx2``, ``avx`` or the
        machine name), the label benchmark tables are grouped by.
    """
    text = ""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        pass
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = {name: name in flags for name in ISA_FLAGS}
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id", ""),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": isa,
        "kind": cpu_kind(isa) or platform.machine(),
    }


def cpu_kind(isa: dict[str, bool]) -> str:
    """``amx``, ``avx512``, ``avx2``, ``avx`` or ``""``: the widest vector extension among the flags."""
    for kind, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")):
        if isa.get(flag):
            return kind
    return ""


def gpu_expected() -> str | None:
    """Why a GPU is expected on this machine (``CUDA_VISIBLE_DEVICES`` names devices, or ``nvidia-smi`` exists), or
    ``None``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible not in (None, "", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    if shutil.which("nvidia-smi"):
        return "nvidia-smi is installed"
    return None


def accelerators(backend: str) -> list[str]:
    """The GPUs (or TPUs) that the Keras backend sees, by name; empty when it trains on the CPU."""
    if backend == "tensorflow":
        import tensorflow as tf

        return [device.name for device in tf.config.list_logical_devices() if device.device_type in ("GPU", "TPU")]
    if backend == "jax":
        import jax

        return [str(device) for device in jax.devices() if device.platform != "cpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def describe(backend: str, cpu: dict | None = None, devices: list[str] | None = None) -> dict:
    """What a run trains on, for ``config.json`` and for the first line it prints: ``{"backend", "devices",
    "cpu"}``, with the ONEDNN setting for TensorFlow."""
    cpu = cpu or cpu_info()
    devices = accelerators(backend) if devices is None else devices
    record = {"backend": backend, "devices": devices or ["cpu"], "cpu": cpu}
    if backend == "tensorflow":
        record[ONEDNN_VARIABLE] = os.environ.get(ONEDNN_VARIABLE, "")
    return record


def first_line(record: dict) -> str:
    """One sentence: ``Training on 1 GPU (/device:GPU:0) with tensorflow`` or ``Training on the CPU (AMD EPYC
    7B13, 2 cores, avx2) with tensorflow``."""
    cpu = record["cpu"]
    if record["devices"] != ["cpu"]:
        count = len(record["devices"])
        where = f"{count} accelerator{'s' if count > 1 else ''} ({', '.join(record['devices'])})"
    else:
        where = f"the CPU ({cpu['model']}, {cpu['cores']} cores, {cpu['kind']})"
    return f"Training on {where} with {record['backend']}"
