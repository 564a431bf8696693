"""Prepare a dataset (``data_gen.py``); :mod:`utils.prepared` reads it back.

A prepared dataset ``data/<name>/`` holds ``manifest.json``, ``fingerprint.json``, ``splits.json`` and
``volumes/<id>_image.npy`` ``(Z, Y, X, C)`` float32 / ``volumes/<id>_label.npy`` ``(Z, Y, X)`` uint8
(docs/ARCHITECTURE.md).

Preparation runs in two passes over the cases, each spread over ``workers`` processes with one progress bar:
the fingerprint pass (shapes, spacings, intensities) and the preparation pass. Each case's result is written
atomically with a key of its inputs and settings, so a rerun skips finished cases, redoes changed ones, and a case
that fails is reported without losing the others.

Memory: a worker reads an integer image (CT in HU) in its own dtype (``load_case(integers=True)``) and hands the case
over to :func:`utils.preprocessing.prepare_case` (``release=True``), which frees the source once resampled and
normalises in place: a case's peak is its source, its float32 prepared image and its prepared label, plus slabs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from utils import fileio
from utils.formats import CaseError, CaseSpec, DatasetSource, load_case
from utils.prepare.exports import ExportSettings, export_dataset
from utils.prepare.fingerprint import _ct_stats, aggregate_fingerprint, case_fingerprint
from utils.prepare.splits import keep_prepared, make_folds, make_splits, read_splits_file
from utils.prepared import MANIFEST_VERSION, input_root, portable_entry
from utils.preprocessing import PreprocessSettings, prepare_case

log = logging.getLogger(__name__)


@dataclass
class CaseFailure:
    case_id: str
    message: str


class PreparationError(RuntimeError):
    """Some cases failed; the others were written. ``failures`` lists them."""

    def __init__(self, failures: Sequence[CaseFailure]):
        self.failures = list(failures)
        lines = "\n".join(f"  {f.case_id}: {f.message}" for f in self.failures)
        super().__init__(f"{len(self.failures)} case(s) failed:\n{lines}")


def _source_key(spec: CaseSpec) -> dict:
    """Size and modification time of every source file of a case (changes invalidate cached results); nothing for a
    case that discovery refused (its files may lie outside the dataset folder and are never touched)."""
    stats = {}
    for path in [] if spec.error else spec.source_files():
        if os.path.exists(path):
            st = os.stat(path)
            stats[str(path)] = [st.st_size, int(st.st_mtime_ns)]
    return stats


def _run_parallel(function: Callable, jobs: Sequence[tuple], workers: int, description: str) -> list:
    """Run ``function(*job)`` for every job, in ``workers`` processes, with one progress bar; keep job order."""
    results = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=description, unit="case", dynamic_ncols=True)
    if workers <= 1:
        for i, job in enumerate(jobs):
            results[i] = function(*job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(function, *job): i for i, job in enumerate(jobs)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BrokenProcessPool as error:
                bar.close()
                raise ChildProcessError(
                    f"a data_gen.py worker process died in the {description} pass (killed by the system, perhaps out "
                    f"of memory) with {sum(r is None for r in results)} of {len(jobs)} cases unfinished; the cases "
                    "finished so far are kept: rerun the same command to continue (with fewer --workers if memory is "
                    "short)"
                ) from error
    bar.close()
    return results


def _load_checked(spec: CaseSpec, allowed: set, num_channels: int):
    """Read a case (an integer image in its own dtype) and check it has the dataset's number of channels and is not
    all zero."""
    case = load_case(spec, allowed, integers=True)
    if not case.image.any():
        raise CaseError(f"{spec.image[0] if spec.image else spec.id}: image is all zero")
    if case.image.shape[-1] != num_channels:
        raise CaseError(
            f"{spec.image[0] if spec.image else spec.id}: image has {case.image.shape[-1]} channel(s) "
            f"(shape {case.image.shape[:-1]} x {case.image.shape[-1]}), the dataset lists {num_channels}"
        )
    return case


def _failure_message(spec: CaseSpec, error: BaseException) -> str:
    """A one-line message naming the case's file for any error a reader raised (no traceback): the reader's own
    message when it names a source file (or a series' folder), else the files and the error's type."""
    text = str(error) if isinstance(error, ValueError | OSError) else f"cannot read ({type(error).__name__}: {error})"
    text = " ".join(text.split()) or type(error).__name__
    files = [str(p) for p in [*spec.image, spec.label] if p]
    places = [*files, *{str(Path(f).parent) for f in spec.image}]
    if str(error) != spec.error and not any(place in text for place in places):  # spec.error names its file
        shown = str(Path(files[0]).parent) if len(spec.image) > 3 else ", ".join(dict.fromkeys(files))
        text = f"{shown or spec.id}: {text}"
    return text


def _fingerprint_job(spec: CaseSpec, allowed: set, num_classes: int, cache_dir: str, num_channels: int) -> tuple:
    key = fileio.digest(spec.to_json(), _source_key(spec), "fingerprint-v2")
    cache = Path(cache_dir) / f"{spec.id}.json"
    if cache.is_file():
        try:
            cached = fileio.read_json(cache)
            if cached.get("key") == key:
                return "ok", cached["record"]
        except ValueError:
            pass
    try:
        record = case_fingerprint(_load_checked(spec, allowed, num_channels), num_classes)
    except Exception as error:  # any reader failure is this case's failure, reported with its file
        return "error", _failure_message(spec, error)
    fileio.write_json(cache, {"key": key, "record": record})
    return "ok", record


def _prepare_job(
    spec: CaseSpec,
    allowed: set,
    settings: dict,
    fingerprint: dict,
    channel_names: list,
    output: str,
    resolved: dict,
) -> tuple:
    settings_obj = PreprocessSettings(**settings)
    out = Path(output)
    key = fileio.digest(spec.to_json(), _source_key(spec), settings, resolved, "prepare-v1")
    entry_path = out / "volumes" / f"{spec.id}.json"
    if entry_path.is_file():
        try:
            entry = fileio.read_json(entry_path)
            files = [entry["image"]] + ([entry["label"]] if entry.get("label") else [])
            if entry.get("key") == key and all((out / f).is_file() for f in files):
                return "ok", entry
        except (ValueError, KeyError):
            pass
    try:
        case = _load_checked(spec, allowed, len(channel_names))
        image, label, record = prepare_case(case, settings_obj, fingerprint, channel_names, release=True)
    except Exception as error:  # any reader failure is this case's failure, reported with its file
        return "error", _failure_message(spec, error)
    image_rel = f"volumes/{spec.id}_image.npy"
    fileio.write_npy(out / image_rel, image)
    label_rel = None
    if label is not None:
        label_rel = f"volumes/{spec.id}_label.npy"
        fileio.write_npy(out / label_rel, label)
    entry = {
        "id": spec.id,
        "patient": spec.patient,
        "source": {k: v for k, v in spec.to_json().items() if k not in ("id", "patient")},
        "image": image_rel,
        "label": label_rel,
        "geometry": record.to_json(),
        "writer": case.writer,
        "key": key,
    }
    fileio.write_json(entry_path, entry)
    return "ok", entry


def plan_splits(
    cases: Sequence[CaseSpec],
    split: Sequence[float],
    seed: int,
    folds: int | None = None,
    splits_file: str | os.PathLike | None = None,
) -> dict:
    """``splits.json`` over every case found: the user's file, K folds, or the seeded ``split`` fractions.

    Raises:
        ValueError: both ``folds`` and ``splits_file``; bad fractions, fold count or file.
        FileNotFoundError: a split file that does not exist.
    """
    if folds is not None and splits_file:
        raise ValueError("give either --folds (drawn folds) or --splits (your own file), not both")
    if splits_file:
        return read_splits_file(splits_file, cases)
    splits = make_splits(cases, split, seed)  # checks the fractions
    return make_folds(cases, folds, float(split[2]), seed) if folds is not None else splits


def prepare_dataset(
    source: DatasetSource,
    output: str | os.PathLike,
    settings: PreprocessSettings,
    split: Sequence[float] = (0.8, 0.2, 0.0),
    seed: int = 0,
    workers: int = 1,
    exports: ExportSettings | None = None,
    folds: int | None = None,
    splits_file: str | os.PathLike | None = None,
    source_root: str | os.PathLike | None = None,
) -> dict:
    """Fingerprint, preprocess and write every case of ``source`` into ``output``; return the manifest.

    ``manifest.json`` stores the source files' paths relative to ``source_root`` (default
    :func:`utils.prepared.input_root`), so that the dataset and its raw files can move.

    ``exports`` adds the slice and patch exports of :mod:`utils.prepare.exports` once the manifest is written.
    ``folds`` (K-fold cross-validation) or ``splits_file`` (the user's split) replace the split drawn from ``split``
    (:mod:`utils.prepare.splits`); both are checked before any case is read.

    Raises:
        ValueError: both ``folds`` and ``splits_file``, or a bad split file or fold count.
        PreparationError: after writing every case that worked and the dataset files, when some cases failed.
    """
    planned_splits = plan_splits(source.cases, split, seed, folds, splits_file)
    if source_root is not None and not Path(source_root).is_dir():
        raise FileNotFoundError(f"{source_root}: --source-root folder not found")
    out = fileio.check_writable(output)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    fileio.remove_stale_temporaries(out)
    allowed = {int(k) for k in source.labels}
    num_classes = max(allowed) + 1
    cache_dir = str(out / ".cache")
    failures = []

    results = _run_parallel(
        _fingerprint_job,
        [(s, allowed, num_classes, cache_dir, len(source.channels)) for s in source.cases],
        workers,
        "fingerprint",
    )
    records = []
    for spec, (status, value) in zip(source.cases, results, strict=True):
        if status == "ok":
            records.append(value)
        else:
            failures.append(CaseFailure(spec.id, value))
    fingerprint = aggregate_fingerprint(records, source.channels, source.labels) if records else None
    if fingerprint is None:
        raise PreparationError(failures or [CaseFailure("-", "no case could be read")])
    fileio.write_json(out / "fingerprint.json", fingerprint)

    good = [s for s in source.cases if s.id not in {f.case_id for f in failures}]
    resolved = {"median_spacing": fingerprint["median_spacing"], "intensity": _ct_stats(fingerprint)}
    channel_names = [source.channels[k] for k in sorted(source.channels, key=int)]
    jobs = [(s, allowed, settings.to_dict(), fingerprint, channel_names, str(out), resolved) for s in good]
    entries = []
    for spec, (status, value) in zip(good, _run_parallel(_prepare_job, jobs, workers, "prepare"), strict=True):
        if status == "ok":
            entries.append(value)
        else:
            failures.append(CaseFailure(spec.id, value))

    # The split is drawn over every case found, then the cases that failed are left out: a case that becomes
    # unreadable (or readable again) never moves the others between train, val and test.
    splits = keep_prepared(planned_splits, {e["id"] for e in entries})
    readable = [spec for spec in source.cases if not spec.error]  # a refused case's files may lie anywhere
    files = [f for spec in readable for f in spec.source_files()]
    root = Path(source_root).resolve() if source_root else input_root(source.path, files)  # paths relative to it
    manifest = {
        "version": MANIFEST_VERSION,
        "name": source.name,
        "source": {
            "path": str(Path(source.path).resolve()),
            "format": source.format,
            "root": str(root),
            "root_from_dataset": Path(os.path.relpath(root, out.resolve())).as_posix(),
        },
        "labels": source.labels,
        "label_values": source.label_values or [int(k) for k in sorted(source.labels, key=int)],
        "channels": source.channels,
        "preprocessing": settings.to_dict(),
        "resolved": resolved,
        "seed": seed,
        "split_fractions": list(split),
        "folds": len(splits.get("folds", [])) or None,
        "splits_file": Path(splits_file).name if splits_file else None,
        "cases": [portable_entry({k: v for k, v in e.items() if k != "key"}, root) for e in entries],
    }
    fileio.write_json(out / "splits.json", splits)
    fileio.write_json(out / "manifest.json", manifest)
    if exports is not None:
        export_dataset(out, manifest, splits, exports)
    if failures:
        raise PreparationError(failures)
    return manifest
