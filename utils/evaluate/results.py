"""The files an evaluation leaves: ``metrics.csv`` (one row per case and class), ``summary.json`` (per-class
statistics with the rule for empty classes), ``dice_boxplot.png`` and ``report.html``."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from utils import fileio
from utils.evaluate.options import Options
from utils.evaluate.report import write_report
from utils.plots import plot_dice_boxplot

log = logging.getLogger(__name__)


def write_results(
    output: Path,
    records: Sequence[dict],
    failures: Sequence[dict],
    names: Mapping[str, str],
    options: Options,
    settings: dict,
    plan: dict,
    title: str,
    extra: dict | None = None,
) -> dict:
    """``metrics.csv``, ``summary.json``, ``dice_boxplot.png`` and ``report.html`` from the case records; ``extra``
    adds keys to ``summary.json`` (``folds``: each fold's summary under ``--split cv``)."""
    summary = summarize(records, names, options.metrics)
    summary["settings"] = settings
    summary["postprocessing"] = plan
    summary["failures"] = list(failures)
    summary.update(extra or {})
    write_metrics_csv(output / "metrics.csv", records, names)
    fileio.write_json(output / "summary.json", summary)
    scored = [r for r in records if r["metrics"]]
    if scored and "dice" in options.metrics:
        keys = list(dict.fromkeys(k for r in scored for k in r["metrics"]))
        plot_dice_boxplot(
            {names.get(k, k): [r["metrics"].get(k, {}).get("dice", np.nan) for r in scored] for k in keys},
            output / "dice_boxplot.png",
            title=f"dice per case ({len(scored)} cases)",
        )
    write_report(summary, records, names, output, title=f"Segmentation results: {title}")
    return summary


def summarize(records: Sequence[dict], names: Mapping, metrics: Sequence[str]) -> dict:
    """Per class (and region) and metric: mean, std, median, quartiles, n, n_empty; plus the foreground mean of each
    metric over the classes (regions are left out of it)."""
    names = {str(k): v for k, v in names.items()}
    scored = [r for r in records if r["metrics"]]
    classes = {}
    for key in list(dict.fromkeys(k for r in scored for k in r["metrics"])):
        entry = {"name": names.get(key, key)}
        if not key.isdigit():
            entry["region"] = True
        for metric in metrics:
            values = np.array([r["metrics"].get(key, {}).get(metric, np.nan) for r in scored], dtype=float)
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
        means = [c[metric]["mean"] for k, c in classes.items() if k.isdigit() and c[metric]["mean"] is not None]
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


def write_metrics_csv(path: Path, records: Sequence[dict], names: Mapping) -> None:
    """One row per (case, class or region): ``case, label, class, <metric>...``."""
    names = {str(k): v for k, v in names.items()}
    rows = []
    for record in records:
        for key, values in (record["metrics"] or {}).items():
            rows.append({"case": record["id"], "label": key, "class": names.get(key, key), **values})
    fields = list(dict.fromkeys(k for row in rows for k in row)) or ["case", "label", "class"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buffer.getvalue())
