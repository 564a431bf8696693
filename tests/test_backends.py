"""The models and losses on the PyTorch and JAX backends: a representative subset, not the whole suite again.

Keras fixes its backend when it is first imported, so each other backend runs ``tests/backend_subset.py`` in its own
process: every architecture built small, trained one step, saved and loaded again; every loss on three seeded cases.
The losses must equal this process's (TensorFlow) values, which tests/test_losses.py holds to MONAI, PyTorch and
hand-computed references, and here directly to MONAI for the losses it has. The full model and loss files run under
the TensorFlow backend; ``KERAS_BACKEND=torch pytest tests/test_model.py tests/test_losses.py`` runs them elsewhere.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import model
from utils import losses

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import backend_subset  # noqa: E402

TIMEOUT_S = 300
XLA_QUICK = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module", params=["torch", "jax"])
def backend_run(request, tmp_path_factory):
    """The subset's results on one backend (skipped when the backend is not installed or is this one)."""
    backend = request.param
    if keras.backend.backend() == backend:
        pytest.skip(f"this session already runs on the {backend} backend")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install -r requirements-dev.txt)")
    out = tmp_path_factory.mktemp(backend) / "result.json"
    env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    # XLA compiles every weight initialiser and step of these tiny nets: its quick mode halves the time
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {XLA_QUICK}".strip()
    command = [sys.executable, str(ROOT / "tests" / "backend_subset.py"), str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{backend}: {(done.stdout + done.stderr)[-4000:]}"
    result = json.loads(out.read_text())
    assert result["backend"] == backend
    return result


def test_every_architecture_trains_a_step_and_reloads(backend_run):
    assert sorted(backend_run["models"]) == sorted(model.MODELS)
    for name, result in backend_run["models"].items():
        spatial = backend_subset.SPATIAL[int(name[-2])]
        assert result["shape"] == [2, *spatial, 3], name
        assert np.isfinite(result["loss"]) and result["loss"] > 0, name
        assert result["sum_error"] < 1e-5, name
        assert result["reload_difference"] < 1e-5, name


@pytest.fixture(scope="module")
def tensorflow_losses():
    return backend_subset.loss_values()


def test_every_loss_equals_the_tensorflow_backend(backend_run, tensorflow_losses):
    assert sorted(backend_run["losses"]) == sorted(backend_subset.LOSS_OPTIONS) == sorted(losses.LOSSES)
    for name, values in backend_run["losses"].items():
        np.testing.assert_allclose(values, tensorflow_losses[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_losses_equal_monai_where_it_has_them(backend_run):
    torch = pytest.importorskip("torch")
    monai_losses = pytest.importorskip("monai.losses")
    references = {  # MONAI takes logits: the log of the probabilities gives them back through its softmax
        "dice": monai_losses.DiceLoss(softmax=True),
        "gdl": monai_losses.GeneralizedDiceLoss(softmax=True),
        "dice_ce": monai_losses.DiceCELoss(softmax=True),
        "tversky": monai_losses.TverskyLoss(softmax=True, alpha=0.3, beta=0.7),
    }
    for name, reference in references.items():
        for (y_true, y_pred), value in zip(backend_subset.loss_cases(), backend_run["losses"][name], strict=True):
            logits, target = (torch.from_numpy(np.moveaxis(a, -1, 1).copy()) for a in (np.log(y_pred), y_true))
            assert value == pytest.approx(float(reference(logits, target)), rel=1e-5, abs=1e-6), name
