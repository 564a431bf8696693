"""A trained run as both training and evaluation see it: the ``.keras`` model files and the run's ``config.json``.

Training writes a run (``utils.train``), evaluation reads it (``utils.evaluate``); the two never import each other,
so what both need to save and load a run lives here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import keras

from utils import fileio

log = logging.getLogger(__name__)


def load_model(path: str | os.PathLike) -> keras.Model:
    """Load a ``.keras`` file in Keras's safe mode; the toolkit's registered layers, losses and metrics are known.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a loadable Keras model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises many types for damaged or foreign files
        raise ValueError(f"{path}: not a loadable Keras model ({type(error).__name__}: {error})") from error


def save_model(model: keras.Model, path: Path) -> None:
    """Save a ``.keras`` file atomically (with optimizer state)."""
    fileio.write_with(path, lambda tmp: model.save(tmp), suffix=".keras")


def load_run(run_dir: str | os.PathLike, load: bool = True) -> tuple[dict, keras.Model | None]:
    """The run's resolved config and its best model (``model.keras``, else ``last.keras``), loaded in safe mode
    (``None`` with ``load=False``).

    Raises:
        FileNotFoundError: the run folder, its config or both model files are missing.
        ValueError: the model file is not a readable Keras model.
    """
    config = fileio.read_json(Path(run_dir) / "config.json")
    return config, load_model(model_path(run_dir)) if load else None


def model_path(run_dir: str | os.PathLike) -> Path:
    """``model.keras`` (best) or else ``last.keras`` of a run.

    Raises:
        FileNotFoundError: neither exists.
    """
    for name in ("model.keras", "last.keras"):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    raise FileNotFoundError(f"{run_dir}: neither model.keras nor last.keras found (train first)")
