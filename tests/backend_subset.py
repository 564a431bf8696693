"""The representative subset of the backend-agnostic checks, run by tests/test_backends.py under another Keras backend.

``KERAS_BACKEND=torch python tests/backend_subset.py OUT.json`` (or ``jax``): every architecture of ``model.MODELS``
is built small (2 channels, 3 classes), trained one step, saved and loaded again; every loss of ``utils.losses`` is
computed on a few seeded cases (2D and 3D, a class absent). The results go to ``OUT.json`` for the test to check
against the TensorFlow backend and the references. Not a test module: Keras fixes its backend when first imported,
so this runs in its own process.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tables import LOSS_OPTIONS, SMALL_MODELS, SPATIAL  # noqa: E402


def loss_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three seeded ``(y_true one-hot, y_pred probabilities)`` pairs, channels last, 3 classes: a 2D batch, a 3D
    batch, and a 2D batch whose last class is absent from the truth."""
    rng = np.random.default_rng(18)
    cases = []
    for shape, present in (((2, 6, 5), 3), ((2, 4, 5, 3), 3), ((1, 7, 4), 2)):
        labels = rng.integers(0, present, size=shape)
        logits = rng.normal(size=(*shape, 3)) * 1.5
        probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        cases.append((np.eye(3, dtype="float32")[labels], probabilities.astype("float32")))
    return cases


def check_model(name: str, folder: Path) -> dict:
    """Build ``name`` small, take one training step, save, load; what the test checks."""
    import keras

    import model

    ndim = int(name[-2])
    spatial = SPATIAL[ndim]
    keras.utils.set_random_seed(0)
    net = model.build_model(name, (*spatial, 2), 3, **SMALL_MODELS[name[:-2]])
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, *spatial, 2)).astype("float32")
    targets = np.eye(3, dtype="float32")[rng.integers(0, 3, size=(2, *spatial))]
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    loss = float(np.ravel(net.train_on_batch(images, targets))[0])
    predicted = net.predict_on_batch(images)  # compiled whole: under JAX a call op by op compiles every op
    path = folder / f"{name}.keras"
    net.save(path)
    reloaded = keras.saving.load_model(path).predict_on_batch(images)
    return {
        "loss": loss,
        "shape": list(predicted.shape),
        "sum_error": float(np.abs(predicted.sum(-1) - 1).max()),
        "reload_difference": float(np.abs(reloaded - predicted).max()),
    }


def loss_values() -> dict[str, list[float]]:
    from keras import ops

    from utils import losses

    values = {}
    for name, options in LOSS_OPTIONS.items():
        loss = losses.get_loss(name, **options)
        values[name] = [
            float(ops.convert_to_numpy(loss(ops.convert_to_tensor(t), ops.convert_to_tensor(p))))
            for t, p in loss_cases()
        ]
    return values


def main(out: str) -> None:
    import keras

    import model

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        models = {name: check_model(name, Path(folder)) for name in model.MODELS}
    result = {"backend": keras.backend.backend(), "models": models, "losses": loss_values()}
    result["seconds"] = round(time.monotonic() - started, 1)
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
