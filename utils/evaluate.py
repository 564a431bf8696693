"""Evaluation: predict prepared cases, write masks in the source geometry, score them, summarise and plot.

For each case: whole-volume inference (:func:`utils.inference.predict_volume`), every preprocessing step inverted
(:func:`utils.preprocessing.restore_label`), ``masks/<id>.nii.gz`` on the source grid, and, when the case has a label,
the metrics of :mod:`utils.metrics` computed on the source grid against the source label file. Per-case results are
kept in ``cases/<id>.json`` so that an interrupted evaluation resumes; ``metrics.csv``, ``summary.json`` and
``dice_boxplot.png`` are written from them at the end.

Empty classes: when a class is absent from both the truth and the prediction its dice is NaN; such values are left
out of means and counted in ``summary.json`` as ``n_empty``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from utils import fileio
from utils.dataset import PreparedDataset
from utils.inference import predict_volume
from utils.metrics import compute_case_metrics
from utils.plots import plot_dice_boxplot
from utils.preprocessing import restore_label
from utils.readers import load_case
from utils.training import load_model
from utils.writers import write_mask

log = logging.getLogger(__name__)
DEFAULT_METRICS = ("dice", "iou", "hd95", "assd", "precision", "sensitivity", "volume_truth_ml", "volume_pred_ml")


def load_run(run_dir: str | os.PathLike) -> tuple[dict, keras.Model]:
    """The run's resolved config and its best model (``model.keras``, else ``last.keras``), loaded in safe mode.

    Raises:
        FileNotFoundError: the run folder, its config or both model files are missing.
        ValueError: the model file is not a readable Keras model.
    """
    run_dir = Path(run_dir)
    config = fileio.read_json(run_dir / "config.json")
    for name in ("model.keras", "last.keras"):
        if (run_dir / name).is_file():
            return config, load_model(run_dir / name)
    raise FileNotFoundError(f"{run_dir}: neither model.keras nor last.keras found (train first)")


def check_compatible(config: dict, dataset: PreparedDataset) -> None:
    """Refuse a dataset whose labels or channels differ from the run's training data.

    Raises:
        ValueError: naming both.
    """
    if config.get("labels") != dataset.labels:
        raise ValueError(
            f"{dataset.path}: labels {dataset.labels} differ from those the run was trained on {config.get('labels')}"
        )
    if config.get("num_channels") != dataset.num_channels:
        raise ValueError(
            f"{dataset.path}: {dataset.num_channels} channel(s), "
            f"but the run was trained on {config.get('num_channels')}"
        )


def label_values(manifest: dict) -> np.ndarray:
    """Map from the prepared label index to the label value in the source files."""
    values = manifest.get("label_values")
    return np.asarray(values if values is not None else sorted(int(k) for k in manifest["labels"]))


def evaluate_case(model, config: dict, dataset: PreparedDataset, case_id: str, output: Path, options: dict) -> dict:
    """Predict, write and score one case; returns its per-case record (written to ``cases/<id>.json``)."""
    case = dataset.cases[case_id]
    probabilities = predict_volume(
        model,
        dataset.image(case_id),
        config["patch_size"],
        config["num_classes"],
        overlap=options["overlap"],
        blend=options["blend"],
        batch_size=config["batch_size"],
        tta=options["tta"],
    )
    values = label_values(dataset.manifest)
    mask = values[restore_label(probabilities, case["geometry"])]
    written = write_mask(mask, case, output)
    record = {"id": case_id, "masks": [str(Path(p).relative_to(output)) for p in written], "metrics": None}
    if case["source"].get("label"):
        source = load_case({"id": case_id, **case["source"]})
        foreground = [int(v) for v in values[1:]]
        spacing = source.spacing
        record["metrics"] = {
            str(k): v
            for k, v in compute_case_metrics(
                mask, source.label, foreground, spacing, metrics=options["metrics"]
            ).items()
        }
    return record


def evaluate(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    split: str = "test",
    overlap: float = 0.5,
    blend: str = "gaussian",
    tta: bool = False,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict:
    """Evaluate a trained run on a split of a prepared dataset; returns the summary.

    Raises:
        FileNotFoundError, ValueError: a missing or incompatible run or dataset, or an empty split.
    """
    config, model = load_run(run_dir)
    dataset = PreparedDataset(data)
    check_compatible(config, dataset)
    case_ids = dataset.split(split)
    if not case_ids:
        raise ValueError(f"{dataset.path / 'splits.json'}: split {split!r} is empty")
    output = Path(output)
    options = {"overlap": overlap, "blend": blend, "tta": tta, "metrics": list(metrics)}
    settings_key = {"run": str(Path(run_dir).resolve()), "data": str(dataset.path.resolve()), **options}
    records = []
    for case_id in tqdm(case_ids, desc="evaluate", unit="case", dynamic_ncols=True):
        fileio.check_case_id(case_id)
        cache = output / "cases" / f"{case_id}.json"
        if cache.is_file():
            cached = fileio.read_json(cache)
            if cached.get("settings") == settings_key and all((output / m).is_file() for m in cached["masks"]):
                records.append(cached)
                continue
        record = {**evaluate_case(model, config, dataset, case_id, output, options), "settings": settings_key}
        fileio.write_json(cache, record)
        records.append(record)
    names = {int(v): dataset.labels[str(i)] for i, v in enumerate(label_values(dataset.manifest))}
    summary = summarize(records, names, list(metrics))
    summary["settings"] = {**settings_key, "split": split, "model": config["model"], "patch_size": config["patch_size"]}
    write_metrics_csv(output / "metrics.csv", records, names)
    fileio.write_json(output / "summary.json", summary)
    scored = [r for r in records if r["metrics"]]
    if scored and "dice" in metrics:
        plot_dice_boxplot(
            {names[int(k)]: [r["metrics"][k]["dice"] for r in scored] for k in scored[0]["metrics"]},
            output / "dice_boxplot.png",
            title=f"dice per case ({len(scored)} cases, split {split})",
        )
    return summary


def summarize(records: Sequence[dict], names: dict[int, str], metrics: Sequence[str]) -> dict:
    """Per class and metric: mean, std, median, quartiles, n, n_empty; plus the foreground mean of each metric."""
    scored = [r for r in records if r["metrics"]]
    classes = {}
    for key in scored[0]["metrics"] if scored else []:
        entry = {"name": names.get(int(key), key) if key.isdigit() else key}
        for metric in metrics:
            values = np.array([r["metrics"][key].get(metric, np.nan) for r in scored], dtype=float)
            finite = values[np.isfinite(values)]
            entry[metric] = {
                "mean": _f(finite.mean()) if finite.size else None,
                "std": _f(finite.std()) if finite.size else None,
                "median": _f(np.median(finite)) if finite.size else None,
                "q1": _f(np.percentile(finite, 25)) if finite.size else None,
                "q3": _f(np.percentile(finite, 75)) if finite.size else None,
                "n": int(finite.size),
                "n_empty": int(values.size - finite.size),
            }
        classes[key] = entry
    foreground_mean = {}
    for metric in metrics:
        means = [c[metric]["mean"] for c in classes.values() if c[metric]["mean"] is not None]
        foreground_mean[metric] = _f(np.mean(means)) if means else None
    return {
        "num_cases": len(records),
        "num_scored": len(scored),
        "classes": classes,
        "foreground_mean": foreground_mean,
        "empty_rule": "a class absent from both truth and prediction has NaN dice/iou and NaN distances; NaN values "
        "are left out of the means and counted as n_empty; a class absent from only one of them has dice 0",
    }


def _f(value) -> float:
    return round(float(value), 6)


def write_metrics_csv(path: Path, records: Sequence[dict], names: dict[int, str]) -> None:
    """One row per (case, class): ``case, label, class, <metric>...``."""
    rows = []
    for record in records:
        for key, values in (record["metrics"] or {}).items():
            rows.append(
                {
                    "case": record["id"],
                    "label": key,
                    "class": names.get(int(key), key) if key.isdigit() else key,
                    **values,
                }
            )
    fields = list(dict.fromkeys(k for row in rows for k in row)) or ["case", "label", "class"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buffer.getvalue())
