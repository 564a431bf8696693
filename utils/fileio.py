"""Safe, atomic file output, small JSON helpers, and the key that marks finished work for a rerun.

Every artifact of the toolkit is written through these functions: the content goes to a temporary file in the
destination folder, is flushed to disk, and is then renamed over the final name. An interrupted run therefore never
leaves a half-written file under a final name, and a rerun can trust any file it finds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class OutputError(OSError):
    """An output file or folder cannot be written (permissions, disk full, ...)."""


def check_case_id(case_id: str, source: str | os.PathLike | None = None) -> str:
    """Return ``case_id`` if it is safe to use as a file name, else raise.

    A case id becomes part of output file names, so it may only hold letters, digits, ``.``, ``_`` and ``-``,
    must not start with a dot or dash, and can never contain a path separator or ``..``.

    Raises:
        ValueError: the id is empty, holds a path separator, ``..`` or other characters.
    """
    where = f" (from {source})" if source else ""
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id) or ".." in case_id:
        raise ValueError(
            f"unsafe case id {case_id!r}{where}: ids may only hold letters, digits, '.', '_' and '-', "
            "must not start with '.' or '-' and may not contain '..' or path separators"
        )
    return case_id


def inside(folder: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """Join ``relative`` onto ``folder`` and refuse results that escape ``folder``.

    Raises:
        ValueError: the joined path resolves outside ``folder``.
    """
    base = Path(folder).resolve()
    path = (base / relative).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"path {relative!s} escapes the folder {base}")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it.

    Args:
        path: the final file name.
        suffix: suffix of the temporary file (some writers, such as Keras or nibabel, choose the format from it);
            defaults to the final file's own suffix chain.

    Raises:
        OutputError: the folder cannot be created or written, or the disk is full.
    """
    path = Path(path)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise OutputError(error.errno, f"cannot write into {path.parent}: {error.strerror}") from error
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise OutputError(error.errno, f"cannot write {path}: {error.strerror}") from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove that a file can be written there, before any work starts.

    Raises:
        OutputError: the folder cannot be created or written (permissions, read-only or full disk).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(error.errno, f"cannot write into {folder}: {error.strerror}") from error
    return folder


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files that an interrupted run left in ``folder`` (recursively); returns how many.

    Only names this module creates are touched: a leading dot and a ``.tmp`` part, e.g. ``.case_01.x1y2.tmp.npy``.
    """
    removed = 0
    for path in Path(folder).rglob(".*.tmp*"):
        if path.is_file() and ".tmp" in path.name:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any], suffix: str | None = None) -> Path:
    """Atomically write ``path`` by calling ``writer(temporary_path)``."""
    with atomic_path(path, suffix) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (numpy scalars and arrays are converted)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Atomically save an array as ``.npy`` (never pickled)."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)

    return write_with(path, save, suffix=".npy")


def as_json(data: Any) -> Any:
    """``data`` as :func:`write_json` then :func:`read_json` give it back: numpy values as Python numbers, tuples as
    lists, keys as strings. Results computed now and results read from a file then print the same."""
    return json.loads(json.dumps(data, default=_json_default, allow_nan=True))


def digest(*parts: Any) -> str:
    """A stable key of JSON-like ``parts`` (SHA-1 hex of their JSON, keys sorted, other values as ``str``).

    Prepared datasets store these keys to skip finished work on a rerun, so the recipe must never change: a new
    recipe would make every existing dataset redo all of its cases.
    """
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with an error that names the file when it is missing or malformed.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Load a ``.npy`` array written by the toolkit, memory-mapped by default, never unpickling.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable ``.npy`` array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({error})") from error


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
