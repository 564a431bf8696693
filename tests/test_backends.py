"""Runs the backend-agnostic tests (models, losses) again under ``KERAS_BACKEND=torch``.

Keras fixes its backend when it is first imported, so the second backend needs its own process; this test starts
it, so that the single ``python -m pytest`` command of the README covers TensorFlow and PyTorch.
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKEND_AGNOSTIC_TESTS = ["tests/test_model.py", "tests/test_losses.py"]
OUTPUT_TAIL = 6000


def _torch_import_error() -> str | None:
    """None when ``import torch`` works in a fresh interpreter, else the last line of its error."""
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=300)
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {probe.returncode}"


@pytest.mark.slow
def test_backend_agnostic_tests_pass_on_torch():
    if keras.backend.backend() == "torch":
        pytest.skip("this session already runs on the torch backend")
    error = _torch_import_error()
    if error is not None:
        pytest.skip(f"PyTorch cannot be imported ({error}); `pip install torch` to test the torch backend")
    files = [name for name in BACKEND_AGNOSTIC_TESTS if (ROOT / name).exists()]
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = (result.stdout + result.stderr)[-OUTPUT_TAIL:]
    if result.returncode != 0:
        print(tail)
    assert result.returncode == 0, f"{' '.join(command)} failed on the torch backend:\n{tail}"
