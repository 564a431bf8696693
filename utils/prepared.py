"""Read access to a prepared dataset ``data/<name>/`` (written by ``data_gen.py``, read by training and evaluation).

A prepared dataset holds ``manifest.json``, ``fingerprint.json``, ``splits.json`` and ``volumes/<id>_image.npy``
``(Z, Y, X, C)`` float32 / ``volumes/<id>_label.npy`` ``(Z, Y, X)`` uint8 (docs/ARCHITECTURE.md).

``manifest.json`` carries the ``version`` of its shape, :data:`MANIFEST_VERSION`; :func:`read_manifest` refuses one
of another version in one line that says how to prepare the dataset again. Each case entry holds the case's
:class:`~utils.formats.CaseSpec` (``source``, without ``id`` and ``patient``) and its
:class:`~utils.geometry.GeometryRecord` (``geometry``) as plain JSON; :meth:`PreparedDataset.spec` and
:meth:`PreparedDataset.geometry` give them back typed.

Portable paths: ``source.root`` records the input root (:func:`input_root`: the ``--input`` folder, or the folder of
an input file, widened to hold a ``--label`` folder beside it) and ``source.root_from_dataset`` the same folder
relative to the dataset; every source file under it (the case spec's ``image``, ``label``, ``masks``, ``unreadable``
and the writer record's ``reference`` and DICOM ``files``) is stored relative to it, any other stays absolute
(:func:`portable_entry`). :class:`PreparedDataset` joins them
onto the first root that exists: ``source_root`` (``evaluation.py --source-root``), the recorded root, or the root
beside the dataset (the two moved together); manifests written before this held absolute paths: they load as they
are, and ``source_root`` replaces the recorded root in them.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils import fileio

if TYPE_CHECKING:
    from utils.formats import CaseSpec
    from utils.geometry import GeometryRecord

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1
SOURCE_PATH_KEYS = ("image", "label", "masks", "unreadable")  # case spec fields holding source files


def _writer_path_keys(writer: dict) -> tuple[str, ...]:
    """The mask writer record's fields that hold source files: the NIfTI/ITK ``reference`` and a DICOM series'
    ``files`` (a PNG writer's ``files`` are output names)."""
    return ("reference", "files") if writer.get("kind") == "dicom" else ("reference",)


def input_root(path: str | os.PathLike, files: Iterable[str] = ()) -> Path:
    """The folder an input's source paths are stored relative to: the input folder (or the folder of an input file,
    an HDF5 file or one NRRD image), widened to the deepest folder that also holds ``files`` lying outside it (a
    ``--label`` folder beside the input folder), unless only the file system's root would."""
    path = Path(path).resolve()
    root = path.parent if path.is_file() else path
    outside = [str(Path(f).resolve()) for f in files if f and root not in Path(f).resolve().parents]
    if not outside:
        return root
    common = Path(os.path.commonpath([str(root), *outside]))
    return common if common.parent != common else root


def _relative(value: str, bases: list[Path]) -> str:
    """``value`` relative to the first base it lies under (POSIX form), else absolute."""
    for candidate in dict.fromkeys([Path(os.path.abspath(value)), Path(value).resolve()]):
        for base in bases:
            if candidate == base or base in candidate.parents:
                return candidate.relative_to(base).as_posix()
    return os.path.abspath(value)


def _map_paths(record: dict, keys: Sequence[str], change: Callable[[str], str]) -> dict:
    """A copy of ``record`` with ``change`` applied to each path under ``keys`` (``label`` and ``reference`` hold one,
    the others a list); a value of another type is left for the record's own check to name."""
    out = dict(record)
    for key in keys:
        value = out.get(key)
        if key in ("label", "reference"):
            if isinstance(value, str) and value:
                out[key] = change(value)
        elif isinstance(value, list):
            out[key] = [change(v) if isinstance(v, str) and v else v for v in value]
    return out


def portable_entry(entry: dict, root: str | os.PathLike) -> dict:
    """A manifest case entry with its source and writer paths relative to ``root`` where they lie under it."""
    bases = list(dict.fromkeys([Path(os.path.abspath(root)), Path(root).resolve()]))
    out = dict(entry)
    if isinstance(entry.get("source"), dict):
        out["source"] = _map_paths(entry["source"], SOURCE_PATH_KEYS, lambda v: _relative(v, bases))
    if isinstance(entry.get("writer"), dict):
        out["writer"] = _map_paths(entry["writer"], _writer_path_keys(entry["writer"]), lambda v: _relative(v, bases))
    return out


def read_manifest(folder: str | os.PathLike) -> dict:
    """``folder/manifest.json``, when its version is the one this toolkit reads.

    Raises:
        FileNotFoundError: no manifest.
        ValueError: malformed JSON, or another version, in one line that names the file, both versions and the
            command that prepares the dataset again.
    """
    path = Path(folder) / "manifest.json"
    manifest = fileio.read_json(path)
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if type(version) is not int or version != MANIFEST_VERSION:
        newer = type(version) is int and version > MANIFEST_VERSION
        source = manifest.get("source") if isinstance(manifest, dict) else None
        input_path = source.get("path", "...") if isinstance(source, dict) else "..."
        raise ValueError(
            f"{path}: prepared with {'a newer' if newer else 'an older'} version of data_gen.py (manifest version "
            f"{version}, this toolkit reads {MANIFEST_VERSION}); "
            f"rerun data_gen.py --input {input_path} --output {folder}"
        )
    return manifest


def _open_maps_limit() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return 64
    return 1024 if soft == resource.RLIM_INFINITY else max(16, min(1024, soft // 4))


class PreparedDataset:
    """Read access to a prepared dataset folder.

    The memory maps of the last volumes read stay open (up to 1,024, and a quarter of the file descriptors this
    process may open, since each map holds one): a sampler reads a small patch from a random case many times per
    second, and opening a map (path checks, header parsing, ``mmap``) cost as much as reading the patch.

    Raises:
        FileNotFoundError: the folder, ``manifest.json`` or ``splits.json`` is missing.
        ValueError: a manifest of another version (:func:`read_manifest`).
    """

    def __init__(self, path: str | os.PathLike, source_root: str | os.PathLike | None = None):
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._max_maps = _open_maps_limit()
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: prepared dataset folder not found (run data_gen.py first)")
        self.manifest = read_manifest(self.path)
        self.splits = fileio.read_json(self.path / "splits.json")
        fingerprint_path = self.path / "fingerprint.json"
        self.fingerprint = fileio.read_json(fingerprint_path) if fingerprint_path.is_file() else {}
        self.cases = {c["id"]: c for c in self.manifest["cases"]}
        self.recorded_root, self.source_root = self._source_roots(source_root)

    def _source_roots(self, given: str | os.PathLike | None) -> tuple[Path | None, Path | None]:
        """The input root the manifest records, and the one its relative source paths are joined onto: ``given``,
        else the recorded root, else the root at its recorded place relative to the dataset, whichever exists
        first (the recorded one when none does)."""
        source = self.manifest.get("source") if isinstance(self.manifest.get("source"), dict) else {}
        recorded = source.get("root")
        if not recorded and source.get("path"):  # manifests before source.root: the input, or its file's folder
            path = Path(source["path"])
            recorded = path.parent if path.is_file() or (not path.exists() and path.suffix) else path
        beside = source.get("root_from_dataset") and Path(os.path.normpath(self.path / source["root_from_dataset"]))
        candidates = [Path(c) for c in (given, recorded, beside) if c]
        root = next((c for c in candidates if c.is_dir()), Path(given or recorded) if given or recorded else None)
        return (Path(recorded) if recorded else None), root

    def source_path(self, value: str) -> str:
        """A source path of the manifest as a path to open: a relative one joined onto :attr:`source_root`, an
        absolute one under the recorded root moved to :attr:`source_root`, any other as it is."""
        path = Path(value)
        if not path.is_absolute():
            return str((self.source_root or self.path) / path)
        recorded, root = self.recorded_root, self.source_root
        if recorded is not None and root is not None and root != recorded and recorded in path.parents:
            return str(root / path.relative_to(recorded))
        return value

    def writer(self, case_id: str) -> dict:
        """The case's mask writer record (how its source was stored) with its source paths made openable."""
        writer = self.cases[case_id].get("writer") or {}
        return _map_paths(writer, _writer_path_keys(writer), self.source_path)

    def missing_sources(self, case_id: str) -> list[str]:
        """The case's source files (images, label, masks) that are not where :meth:`spec` says."""
        spec = self.spec(case_id)
        return [] if spec.error else [p for p in spec.source_files() if not Path(p).exists()]

    @property
    def labels(self) -> dict[str, str]:
        return self.manifest["labels"]

    @property
    def num_classes(self) -> int:
        return max(int(k) for k in self.labels) + 1

    @property
    def num_channels(self) -> int:
        return len(self.manifest["channels"])

    def split(self, name: str) -> list[str]:
        """Case ids of a split (``train``, ``val``, ``test``) or ``all``."""
        if name == "all":
            return list(self.cases)
        if name not in self.splits:
            raise ValueError(f"{self.path / 'splits.json'}: no split {name!r} (have {sorted(self.splits)})")
        return list(self.splits[name])

    @property
    def folds(self) -> list[dict]:
        """The cross-validation folds of ``splits.json``, ``[{"train": [ids], "val": [ids]}, ...]`` (empty without)."""
        return list(self.splits.get("folds") or [])

    def with_fold(self, index: int) -> PreparedDataset:
        """This dataset seen through fold ``index``: its ``train`` and ``val`` splits are the fold's.

        Raises:
            ValueError: ``splits.json`` has no folds, or none of that index, naming the file.
        """
        where, folds = self.path / "splits.json", self.folds
        if not folds:
            raise ValueError(f"{where}: holds no folds; prepare the dataset with data_gen.py --folds K or --splits")
        if not 0 <= index < len(folds):
            raise ValueError(f"{where}: no fold {index}; it holds folds 0 to {len(folds) - 1}")
        view = copy.copy(self)
        view.splits = {**self.splits, "train": list(folds[index]["train"]), "val": list(folds[index]["val"])}
        return view

    def spec(self, case_id: str) -> CaseSpec:
        """The case's source files (openable paths, :meth:`source_path`) and how to read them.

        Raises:
            ValueError: the manifest's entry is not a case spec, naming the key.
        """
        from utils.formats import CaseSpec  # here, so that training, which never reads sources, loads no readers

        case = self.cases[case_id]
        where = f"{self.path / 'manifest.json'}: case {case_id!r}"
        if not isinstance(case.get("source"), dict):
            raise ValueError(f"{where}: no 'source' object (the case spec)")
        source = _map_paths(case["source"], SOURCE_PATH_KEYS, self.source_path)
        return CaseSpec.from_json({"id": case_id, "patient": case.get("patient", case_id), **source}, where)

    def geometry(self, case_id: str) -> GeometryRecord:
        """How the case's prepared grid came from its source grid.

        Raises:
            ValueError: the manifest's entry is not a geometry record, naming the key.
        """
        from utils.geometry import GeometryRecord  # here, like CaseSpec above

        where = f"{self.path / 'manifest.json'}: case {case_id!r}: geometry"
        return GeometryRecord.from_json(self.cases[case_id]["geometry"], where)

    def image(self, case_id: str) -> np.ndarray:
        """``(Z, Y, X, C)`` float32, memory-mapped."""
        return self._mapped(self.cases[case_id]["image"])

    def label(self, case_id: str) -> np.ndarray | None:
        """``(Z, Y, X)`` uint8, memory-mapped, or ``None`` when unlabelled."""
        rel = self.cases[case_id].get("label")
        return None if rel is None else self._mapped(rel)

    def _mapped(self, relative: str) -> np.ndarray:
        with self._lock:
            array = self._maps.pop(relative, None)
        if array is None:
            array = fileio.load_npy(fileio.inside(self.path, relative))
        with self._lock:
            self._maps[relative] = array
            while len(self._maps) > self._max_maps:
                self._maps.popitem(last=False)
        return array

    def __getstate__(self) -> dict:
        """Pickled for worker processes without the open maps and the lock (each worker opens its own)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_maps", "_lock", "_max_maps")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._maps, self._lock, self._max_maps = OrderedDict(), threading.Lock(), _open_maps_limit()
