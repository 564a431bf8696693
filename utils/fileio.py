"""Safe, atomic file output, small JSON helpers, the key that marks finished work for a rerun, and the lock that
keeps one writer per output folder.

Every artifact of the toolkit is written through these functions: the content goes to a temporary file in the
destination folder, is flushed to disk, and is then renamed over the final name. An interrupted run therefore never
leaves a half-written file under a final name, and a rerun can trust any file it finds. Files that must change
together (a checkpoint and the state that says which epoch it holds) are written as one :func:`atomic_group`: every
temporary is complete before the first rename, so a full disk leaves the previous set whole.

Each script holds :func:`folder_lock` on the folder it writes: a second run on the same folder is refused, naming the
first, and a lock left by a process that died is taken over.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class OutputError(OSError):
    """An output file or folder cannot be written (permissions, disk full, ...)."""


class FolderInUse(OutputError):
    """Another run holds the lock of the output folder; the message names it (pid, host, command, start)."""


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
        group = _GROUP.get()
        if group is None:
            os.replace(tmp, path)
        else:
            group.append((tmp, path))
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise OutputError(error.errno, f"cannot write {path}: {error.strerror}") from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_GROUP: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("atomic_group", default=None)


@contextlib.contextmanager
def atomic_group() -> Iterator[None]:
    """Write several files as one: inside the block every write of this module goes to its complete, flushed
    temporary file as usual, but the renames wait until the block ends and then happen in the order of the writes.
    When a write fails (a full disk), the block's temporaries are deleted and no file under a final name has changed.
    A group inside a group joins it.

    Raises:
        OutputError: a write (or a rename) failed; whatever else a writer raised.
    """
    if _GROUP.get() is not None:
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _GROUP.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _GROUP.reset(token)
    for index, (tmp, path) in enumerate(pending):
        try:
            os.replace(tmp, path)
        except OSError as error:
            for rest, _ in pending[index:]:
                rest.unlink(missing_ok=True)
            raise OutputError(error.errno, f"cannot write {path}: {error.strerror}") from error


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


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How a script was started, for lock files: ``script`` and its arguments (``sys.argv`` when ``argv`` is None)."""
    import sys

    return shlex.join([script, *(sys.argv[1:] if argv is None else argv)])


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the lock of an output folder while one run writes it: ``<folder>/.lock`` names the holder (pid, host,
    command, start) and is held with ``flock``, which the system releases when the holder dies however it ends.

    A second run on the same folder is refused with :class:`FolderInUse` naming the holder. A lock file left by a
    process that died on this host is taken over, with a one-line note. One left by another host is refused (whether
    that process lives cannot be told from here): its message says to delete the file once that run has ended. The
    lock file is removed on the way out, and the folder too when this run created it and left it empty.

    Raises:
        FolderInUse: another run holds the folder.
        OutputError: the folder or its lock file cannot be created.
    """
    folder = Path(folder)
    created = not folder.exists()
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(error.errno, f"cannot write into {folder}: {error.strerror}") from error
    fd, locked = _acquire_lock(path)
    try:
        _check_previous_holder(folder, path, _lock_holder(path), locked)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a run stopped by bad settings leaves no folder behind


def _acquire_lock(path: Path) -> tuple[int, bool]:
    """Open ``path`` and take its ``flock`` (the file must still be the one at ``path`` once locked: a holder that
    was leaving may have removed it meanwhile). Returns the descriptor, and whether ``flock`` holds it (``False`` on a
    file system without ``flock``).

    Raises:
        FolderInUse: another process holds the lock.
        OutputError: the lock file cannot be created.
    """
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(error.errno, f"cannot write into {path.parent}: {error.strerror}") from error
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(errno.EBUSY, _in_use_message(path.parent, _lock_holder(path))) from None
        except OSError as error:  # a file system without flock: the recorded pid decides (_check_previous_holder)
            log.debug("%s: flock unavailable (%s)", path, error)
            locked = False
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, locked
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OutputError(errno.EBUSY, f"cannot lock {path.parent}: its lock file keeps changing")


def _check_previous_holder(folder: Path, path: Path, previous: dict | None, locked: bool) -> None:
    """Refuse the folder when the lock file names a process that may still run; note a takeover of a dead one's.

    On this host a held ``flock`` proves that the recorded process is gone (its pid may have been reused since);
    without ``flock`` the pid is looked up.

    Raises:
        FolderInUse: the holder runs on this host (seen when ``flock`` is unavailable), or ran on another host.
    """
    if not previous or previous.get("pid") == os.getpid():
        return
    pid, host = previous.get("pid"), previous.get("host")
    if host != socket.gethostname():
        raise FolderInUse(
            errno.EBUSY,
            f"{_in_use_message(folder, previous)}; if that run has ended, delete {path} and start again",
        )
    if not locked and isinstance(pid, int) and _alive(pid):
        raise FolderInUse(errno.EBUSY, _in_use_message(folder, previous))
    log.warning("note: %s was locked by pid %s (%s), which is no longer running; lock taken over", folder, pid,
                previous.get("command", "?"))  # fmt: skip


def _lock_holder(path: Path) -> dict | None:
    """What a lock file says of its holder (``None`` when empty or unreadable)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _in_use_message(folder: Path, holder: dict | None) -> str:
    if not holder:
        return f"{folder} is in use by another run (its lock file {folder / LOCK_FILE} holds no details yet)"
    return (
        f"{folder} is in use by another run: pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')}: {holder.get('command', '?')}; wait until it ends or write elsewhere"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
