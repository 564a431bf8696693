"""What every script shares on the console: ``--version``, ``--verbose``, logging, and the log file of a run.

The version is written once, in ``pyproject.toml``: an installed toolkit reads it from its package metadata, a clone
from the file itself (a clone wins, so a clone next to an older installed copy reports its own version). This module
imports nothing heavy: ``--help`` and ``--version`` stay instant.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

DISTRIBUTION = "keras-medseg"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
LOG_FORMAT = "%(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def version() -> str:
    """The toolkit's version: ``pyproject.toml``'s ``[project] version`` in a clone, the package metadata when
    installed, ``"unknown"`` when neither is there."""
    if PYPROJECT.is_file():
        match = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', PYPROJECT.read_text(), re.M | re.S)
        if match:
            return match.group(1)
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def add_script_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--version`` and ``--verbose`` (TensorFlow's start-up lines and debug messages shown)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()} ({DISTRIBUTION})")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show TensorFlow's and CUDA's start-up lines and the toolkit's debug messages",
    )


def start(verbose: bool = False, backend: bool = True) -> None:
    """Configure logging to the console and hide the backend's start-up lines unless ``verbose``.

    Call first in a script's ``main`` after parsing, before anything imports Keras. ``backend=False`` (data_gen.py,
    which needs no deep-learning library) only raises ``TF_CPP_MIN_LOG_LEVEL`` instead of importing Keras quietly.
    """
    import os

    from utils.device import LOG_LEVEL_VARIABLE, quiet_startup

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if verbose:
        logging.getLogger(__name__.split(".")[0]).setLevel(logging.DEBUG)  # the toolkit's loggers, not every library's
    elif backend:
        quiet_startup()
    else:
        os.environ.setdefault(LOG_LEVEL_VARIABLE, "3")


@contextlib.contextmanager
def log_file(path: str | Path, header: tuple[str, ...] = ()) -> Iterator[Path | None]:
    """Copy every log record of the process (INFO and up) into ``path``, appended, while the block runs.

    The file starts with a line naming the toolkit's version, then ``header`` (lines already shown on the console,
    such as the device a run trains on); a resumed run appends to its log. A folder that cannot be written gets no log
    (yields ``None``): the caller's own check of the folder says what is wrong with it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError:
        yield None
        return
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    for line in (f"{DISTRIBUTION} {version()}: log of {path.parent}", *header):
        handler.handle(
            logging.makeLogRecord({"name": __name__, "levelno": logging.INFO, "levelname": "INFO", "msg": line})
        )
    root = logging.getLogger()
    previous_level = root.level
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(previous_level)


def logged_to(filename: str) -> Callable[[Callable], Callable]:
    """Decorate a function that writes into the folder given as its ``output`` argument: while it runs, the log goes
    to ``output/filename`` too (:func:`log_file`)."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            output = signature.bind(*args, **kwargs).arguments["output"]
            with log_file(Path(output) / filename):
                return function(*args, **kwargs)

        return wrapper

    return decorate
