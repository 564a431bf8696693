"""Read access to a prepared dataset ``data/<name>/`` (written by ``data_gen.py``, read by training and evaluation).

A prepared dataset holds ``manifest.json``, ``fingerprint.json``, ``splits.json`` and ``volumes/<id>_image.npy``
``(Z, Y, X, C)`` float32 / ``volumes/<id>_label.npy`` ``(Z, Y, X)`` uint8 (docs/ARCHITECTURE.md).

``manifest.json`` carries the ``version`` of its shape, :data:`MANIFEST_VERSION`; :func:`read_manifest` refuses one
of another version in one line that says how to prepare the dataset again. Each case entry holds the case's
:class:`~utils.formats.CaseSpec` (``source``, without ``id`` and ``patient``) and its
:class:`~utils.geometry.GeometryRecord` (``geometry``) as plain JSON; :meth:`PreparedDataset.spec` and
:meth:`PreparedDataset.geometry` give them back typed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils import fileio

if TYPE_CHECKING:
    from utils.formats import CaseSpec
    from utils.geometry import GeometryRecord

log = logging.getLogger(__name__)
MANIFEST_VERSION = 1


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

    def __init__(self, path: str | os.PathLike):
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

    def spec(self, case_id: str) -> CaseSpec:
        """The case's source files and how to read them.

        Raises:
            ValueError: the manifest's entry is not a case spec, naming the key.
        """
        from utils.formats import CaseSpec  # here, so that training, which never reads sources, loads no readers

        case = self.cases[case_id]
        where = f"{self.path / 'manifest.json'}: case {case_id!r}"
        if not isinstance(case.get("source"), dict):
            raise ValueError(f"{where}: no 'source' object (the case spec)")
        return CaseSpec.from_json({"id": case_id, "patient": case.get("patient", case_id), **case["source"]}, where)

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
