"""Score masks that another tool wrote (nnU-Net, MONAI, a colleague's), with no model, and compare tools case by case.

``evaluation.py --predictions DIR [DIR ...] --truth DIR --output results/NAME`` lands in :func:`score_masks`.

Finding the masks (:func:`mask_files`): every NIfTI, NRRD or MHA/MHD file (or 2D PNG, TIFF, BMP mask, one slice)
under a folder is one case; a results folder of this toolkit is read from its ``masks/``, a dataset folder (MSD,
nnU-Net raw) from its ``labelsTr/``. A case's id is its file name without the suffix and without one trailing
``_seg``, ``_label``, ``_labels``, ``_mask``, ``_pred`` or ``_prediction`` (MONAI writes ``<name>_seg.nii.gz``, nnU-Net
``<name>.nii.gz``); predictions and truth are matched by it. Where one id has a NIfTI and another copy (a results
folder's ``.nrrd`` beside its ``.nii.gz``), the NIfTI is read.

Labels: the truth folder's ``dataset.json`` (beside it or one folder up, MSD ``{"1": "name"}`` or nnU-Net v2
``{"name": 1}``) names the classes and gives the label values; without one, the values found in the truth files are
the classes, named ``label <value>``.

Per case, each problem fails that case alone, with one line naming both files: a case missing on one side, a
prediction on another grid than its truth (a prediction stored in another axis order on the same grid is reoriented
first), a prediction (or truth) holding label values the dataset does not have. Scores are those of
``evaluation.py --data`` (:func:`utils.evaluate.pipeline.score`), on the truth's grid and spacing.

One folder writes ``metrics.csv``, ``summary.json``, ``dice_boxplot.png`` and ``report.html`` into the output as a
model's evaluation does (no masks and no pictures: there is no image). Two or more write those into
``<output>/<method>/`` (the method is the folder's name) and, at the top, ``metrics.csv`` with a ``method`` column,
``comparison.csv`` (per case, class and metric: each method's value and the difference of every pair),
``comparison.json`` (per class, metric and pair of methods: the paired cases, the mean and median difference and a
two-sided Wilcoxon signed-rank test, :func:`scipy.stats.wilcoxon`, over the cases both scored; p-values are not
adjusted for the number of tests), ``comparison_boxplot.png`` (a box per method for each class) and ``report.html``.
Each case's scores are kept in ``cases/<id>.json`` (keyed by both files' size and time), so a rerun resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from utils import console, fileio, geometry
from utils.evaluate.options import Options
from utils.evaluate.pipeline import file_stamps, open_output, predicted_volumes, run_cases, score
from utils.evaluate.report import STYLE, data_url
from utils.evaluate.results import write_results
from utils.formats import CaseError, class_indices
from utils.formats.base import NIFTI_SUFFIXES, SITK_SUFFIXES, as_label_map, safe_id, strip_suffix
from utils.formats.itk import read_sitk, sitk_to_array
from utils.formats.nifti import read_nifti
from utils.plots import plot_dice_boxplot

log = logging.getLogger(__name__)
ID_ENDINGS = re.compile(r"_(seg|label|labels|mask|pred|prediction)$", re.IGNORECASE)
MASK_SUFFIXES = (*SITK_SUFFIXES, ".png", ".tif", ".tiff", ".bmp")  # 2D masks: one-slice volumes (no JPEG: lossy)
PAIRED_METRICS = ("dice", "iou", "hd95", "assd", "nsd", "precision", "sensitivity")  # not the volumes


def case_id_of(path: str | os.PathLike) -> str:
    """The case id of a mask file: its name without the suffix and one trailing ``_seg``-like word."""
    return safe_id(ID_ENDINGS.sub("", strip_suffix(Path(path).name)))


def mask_folder(folder: str | os.PathLike) -> Path:
    """Where the masks of ``folder`` are: its ``masks/`` (a results folder) or ``labelsTr/`` (a dataset folder)
    when it holds no mask file itself, else the folder.

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder of masks not found")
    if not any(_is_mask(p) for p in folder.iterdir()):
        for name in ("masks", "labelsTr"):
            if (folder / name).is_dir():
                return folder / name
    return folder


def _is_mask(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(MASK_SUFFIXES)


def mask_files(folder: str | os.PathLike) -> tuple[dict[str, Path], dict[str, str]]:
    """The mask file of each case under ``folder`` (searched recursively, see the module docstring).

    Returns:
        ``(files, problems)``: ``{case id: path}``, and ``{case id: message}`` for ids that name several files.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no mask file.
    """
    root = mask_folder(folder)
    found: dict[str, list[Path]] = {}
    for path in sorted(p for p in root.rglob("*") if _is_mask(p)):
        found.setdefault(case_id_of(path), []).append(path)
    if not found:
        raise ValueError(f"{root}: no mask file (NIfTI, NRRD, MHA, PNG, TIFF) found")
    files, problems = {}, {}
    for case_id, paths in found.items():
        nifti = [p for p in paths if p.name.lower().endswith(NIFTI_SUFFIXES)]
        chosen = nifti if nifti else paths
        if len(chosen) == 1:
            files[case_id] = chosen[0]
        else:
            problems[case_id] = f"{', '.join(map(str, chosen))}: several files for case {case_id!r} in {root}"
    return files, problems


def read_mask(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A label map ``(Z, Y, X)`` and its affine (NIfTI with nibabel, the others with SimpleITK; a 2D mask is one
    slice).

    Raises:
        CaseError: an unreadable file, or one that does not hold integer label values, naming it.
    """
    path = Path(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        array, affine = read_nifti(path)
    else:
        array, affine = sitk_to_array(read_sitk(path), path)
    return as_label_map(array, path), affine


def dataset_labels(truth: Path) -> tuple[list[int] | None, dict[str, str]]:
    """Label values and ``{str(value): name}`` from a ``dataset.json`` in the truth folder or one up (MSD or
    nnU-Net v2 labels; nnU-Net region lists are left out); ``(None, {})`` without one."""
    for folder in (truth, truth.parent):
        path = folder / "dataset.json"
        if path.is_file():
            labels = fileio.read_json(path).get("labels")
            if not isinstance(labels, dict):
                continue
            names = {}
            for key, value in labels.items():
                if str(key).isdigit():
                    names[str(int(key))] = str(value)
                elif isinstance(value, int) and not isinstance(value, bool):
                    names[str(value)] = str(key)
            if names:
                return sorted({0, *(int(v) for v in names)}), names
    return None, {}


def truth_values(files: Mapping[str, Path]) -> list[int]:
    """Every label value found in the truth files (0 included); files that cannot be read are left to their case."""
    values = {0}
    for path in files.values():
        try:
            values.update(int(v) for v in np.unique(read_mask(path)[0]))
        except CaseError:
            continue
    return sorted(values)


def on_truth_grid(
    prediction: np.ndarray, affine: np.ndarray, truth: np.ndarray, truth_affine: np.ndarray, names: tuple[str, str]
) -> np.ndarray:
    """The prediction in the truth's array order (reoriented when only the axis order or directions differ).

    Raises:
        CaseError: another grid (shape, spacing, origin or direction), naming both files.
    """
    if geometry.axcodes(affine) != geometry.axcodes(truth_affine):
        prediction, affine, _ = geometry.reorient(prediction, affine, geometry.axcodes(truth_affine))
    where = f"{names[0]}: prediction on another grid than its truth {names[1]}"
    if tuple(prediction.shape) != tuple(truth.shape):
        raise CaseError(f"{where}: shape {tuple(prediction.shape)}, truth {tuple(truth.shape)}")
    scale = max(1.0, float(np.abs(truth_affine[:3, :3]).max()))
    difference = float(np.abs(np.asarray(affine) - np.asarray(truth_affine)).max())
    if difference > 1e-3 * scale:
        spacing = [tuple(round(s, 4) for s in geometry.spacing_from_affine(a)) for a in (affine, truth_affine)]
        raise CaseError(
            f"{where}: spacing {spacing[0]} mm, truth {spacing[1]} mm; origin or direction differ by up to "
            f"{difference:.3g} mm"
        )
    return prediction


def check_values(mask: np.ndarray, values: Sequence[int], path: Path, other: Path, side: str) -> None:
    """Refuse label values outside the dataset's, naming both files.

    Raises:
        CaseError: ``PATH: label values [..] that the truth does not have ([..]); compared with OTHER``.
    """
    unknown = sorted(set(np.unique(mask).astype(int).tolist()) - set(values))
    if unknown:
        lacking = "the truth does not have" if side == "the prediction" else "the truth's dataset.json does not list"
        raise CaseError(
            f"{path}: {side} holds label values {unknown} that {lacking} (values {list(values)}); compared with {other}"
        )


def score_case(prediction: Path, truth: Path, values: Sequence[int], options: Options) -> dict:
    """The record of one case (``cases/<id>.json``): its metrics on the truth's grid and predicted volumes."""
    truth_map, truth_affine = read_mask(truth)
    check_values(truth_map, values, truth, prediction, "the truth")
    mask, affine = read_mask(prediction)
    mask = on_truth_grid(mask, affine, truth_map, truth_affine, (str(prediction), str(truth)))
    check_values(mask, values, prediction, truth, "the prediction")
    spacing = geometry.spacing_from_affine(truth_affine)
    return {
        "id": case_id_of(truth),
        "masks": [],
        "prediction": str(prediction),
        "truth": str(truth),
        "metrics": score(mask, truth_map, values, spacing, options),
        "predicted_ml": predicted_volumes(class_indices(mask, list(values)), values, spacing),
    }


def score_folder(
    predictions: Path,
    truth: tuple[Path, Mapping[str, Path], Mapping[str, str]],
    values: Sequence[int],
    names: Mapping[str, str],
    output: Path,
    options: Options,
    title: str,
) -> tuple[dict, list[dict]]:
    """Score one folder of predictions against the truth (``(folder, files, problems)``) into ``output``.

    Returns:
        The summary (also ``summary.json``) and the case records.
    """
    truth_root, truth_files, truth_problems = truth
    files, problems = mask_files(predictions)
    problems = {**truth_problems, **problems}

    def process(case_id: str) -> dict:
        if case_id in problems:
            raise CaseError(problems[case_id])
        if case_id not in files:
            raise CaseError(f"{truth_files[case_id]}: no prediction for case {case_id!r} in {predictions}")
        if case_id not in truth_files:
            raise CaseError(f"{files[case_id]}: no truth for case {case_id!r} in {truth_root}")
        return {**score_case(files[case_id], truth_files[case_id], values, options), "id": case_id}

    def inputs(case_id: str) -> str:
        return file_stamps([files.get(case_id), truth_files.get(case_id)])

    open_output(output)
    settings = {"predictions": str(predictions.resolve()), "truth": str(truth_root.resolve()), **options.key()}
    key = {**settings, "label_values": list(values)}
    case_ids = sorted({*files, *truth_files, *problems})
    records, failures = run_cases(case_ids, process, output, key, options.progress, inputs)
    return write_results(output, records, failures, names, options, settings, {}, title), records


def method_names(folders: Sequence[Path]) -> list[str]:
    """A distinct, file-safe name per folder of predictions: its name (its parent's for ``masks``)."""
    names = []
    for folder in folders:
        folder = folder.resolve()
        base = safe_id(folder.parent.name if folder.name in ("masks", "labelsTr") else folder.name)
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


@console.logged_to("evaluation.log")
def score_masks(
    predictions: Sequence[str | os.PathLike],
    truth: str | os.PathLike,
    output: str | os.PathLike,
    options: Options | None = None,
) -> dict:
    """Score one or more folders of predicted masks against a folder of true label maps (module docstring).

    Returns:
        One folder: its summary (also ``summary.json``). Several: ``{"num_cases", "foreground_mean": {method:
        ...}, "failures", "methods", "paired"}`` (``comparison.json`` holds it).

    Raises:
        FileNotFoundError: a folder that does not exist.
        ValueError: a folder without masks.
    """
    options = dataclasses.replace(options, pictures="none") if options else Options(pictures="none")  # no image
    folders = [Path(p) for p in predictions]
    for folder in folders:
        mask_folder(folder)  # every folder exists before anything is written
    truth_root = mask_folder(truth)
    truth_files, truth_problems = mask_files(truth_root)
    values, names = dataset_labels(truth_root)
    values = values or truth_values(truth_files)
    names = {str(v): names.get(str(v), f"label {v}") for v in values[1:]}
    output = open_output(output)
    truth_record = (truth_root, truth_files, truth_problems)
    if len(folders) == 1:
        title = f"{folders[0].name} against {truth_root}"
        return score_folder(folders[0], truth_record, values, names, output, options, title)[0]
    methods = method_names(folders)
    summaries, records = {}, {}
    for method, folder in zip(methods, folders, strict=True):
        title = f"{method} against {truth_root}"
        summaries[method], records[method] = score_folder(
            folder, truth_record, values, names, output / method, options, title
        )
    return write_comparison(output, dict(zip(methods, folders, strict=True)), summaries, records, names, options)


def paired_test(reference: Sequence[float], other: Sequence[float]) -> dict:
    """The two-sided Wilcoxon signed-rank test of ``other - reference`` over the pairs where both are finite (zero
    differences dropped, as :func:`scipy.stats.wilcoxon` does by default); all differences zero gives p = 1."""
    import warnings

    from scipy.stats import wilcoxon

    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    differences = b[keep] - a[keep]
    result = {"n": int(differences.size), "mean_difference": None, "median_difference": None}
    result.update(statistic=None, p_value=None)
    if not differences.size:
        return result
    result.update(mean_difference=_round(differences.mean()), median_difference=_round(np.median(differences)))
    if not np.any(differences != 0):
        return {**result, "statistic": 0.0, "p_value": 1.0}
    with warnings.catch_warnings():  # scipy warns that few pairs or zeros make its p-value approximate
        warnings.simplefilter("ignore")
        test = wilcoxon(differences)
    return {**result, "statistic": _round(test.statistic), "p_value": _round(test.pvalue)}


def _round(value) -> float:
    return float(f"{float(value):.6g}")


def write_comparison(
    output: Path,
    folders: Mapping[str, Path],
    summaries: Mapping[str, dict],
    records: Mapping[str, Sequence[dict]],
    names: Mapping[str, str],
    options: Options,
) -> dict:
    """``metrics.csv``, ``comparison.csv``, ``comparison.json``, ``comparison_boxplot.png`` and ``report.html`` of
    several methods' case records (module docstring); returns what ``comparison.json`` holds."""
    methods = list(folders)
    scores = {m: {r["id"]: r["metrics"] for r in records[m] if r.get("metrics")} for m in methods}
    cases = sorted({c for table in scores.values() for c in table})
    keys = list(dict.fromkeys(k for table in scores.values() for case in table.values() for k in case))
    metrics = [m for m in options.metrics if m in PAIRED_METRICS]
    pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]

    def value(method: str, case: str, key: str, metric: str) -> float:
        return float(scores[method].get(case, {}).get(key, {}).get(metric, math.nan))

    paired = {}
    for key in keys:
        entry = paired.setdefault(key, {"name": names.get(key, key)})
        for metric in metrics:
            entry[metric] = {}
            for a, b in pairs:
                common = [c for c in cases if c in scores[a] and c in scores[b]]
                test = paired_test(
                    [value(a, c, key, metric) for c in common], [value(b, c, key, metric) for c in common]
                )
                entry[metric][f"{b} - {a}"] = test
    rows = [
        {
            "case": case,
            "label": key,
            "class": names.get(key, key),
            "metric": metric,
            **{m: _cell_text(value(m, case, key, metric)) for m in methods},
            **{f"{b} - {a}": _cell_text(value(b, case, key, metric) - value(a, case, key, metric)) for a, b in pairs},
        }
        for case in cases
        for key in keys
        for metric in metrics
    ]
    _write_csv(output / "comparison.csv", rows, ["case", "label", "class", "metric", *methods])
    _write_csv(output / "metrics.csv", _method_rows(methods, records, names), ["method", "case", "label", "class"])
    if "dice" in metrics and keys:
        plot_dice_boxplot(
            {f"{names.get(k, k)}\n{m}": [value(m, c, k, "dice") for c in scores[m]] for k in keys for m in methods},
            output / "comparison_boxplot.png",
            title=f"dice per case: {', '.join(methods)}",
        )
    failures = [{**f, "id": f"{m}/{f['id']}"} for m in methods for f in summaries[m]["failures"]]
    comparison = {
        "num_cases": len({r["id"] for m in methods for r in [*records[m], *summaries[m]["failures"]]}),
        "methods": {m: _method_summary(folders[m], summaries[m]) for m in methods},
        "foreground_mean": {m: summaries[m]["foreground_mean"] for m in methods},
        "paired": paired,
        "test": "two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) of the per-case differences 'B - A' over "
        "the cases both methods scored (NaN values, i.e. classes empty in truth and prediction, left out; zero "
        "differences dropped); p-values are not adjusted for the number of tests",
        "failures": failures,
    }
    fileio.write_json(output / "comparison.json", comparison)
    fileio.write_text(output / "report.html", render_comparison(comparison, output))
    return comparison


def _cell_text(number: float) -> str:
    return "" if not math.isfinite(number) else f"{number:.6g}"


def _write_csv(path: Path, rows: Sequence[dict], first: Sequence[str]) -> None:
    fields = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buffer.getvalue())


def _method_rows(methods: Sequence[str], records: Mapping[str, Sequence[dict]], names: Mapping[str, str]) -> list:
    """The rows of every method's ``metrics.csv``, each with a ``method`` column first."""
    rows = []
    for method in methods:
        for record in records[method]:
            for key, values in (record.get("metrics") or {}).items():
                rows.append({"method": method, "case": record["id"], "label": key, "class": names.get(key, key)})
                rows[-1].update(values)
    return rows


def _method_summary(folder: Path, summary: Mapping) -> dict:
    return {
        "folder": str(folder.resolve()),
        "num_cases": summary["num_cases"],
        "num_scored": summary["num_scored"],
        "foreground_mean": summary["foreground_mean"],
        "dice_mean": {k: c.get("dice", {}).get("mean") for k, c in summary["classes"].items()},
        "failures": len(summary["failures"]),
    }


def _number(value, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _p_value(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def render_comparison(comparison: Mapping, output: Path) -> str:
    """``report.html`` of a comparison: the methods' means, the paired tests, the box plot and links to each
    method's own report."""
    methods = comparison["methods"]
    classes = {k: v["name"] for k, v in comparison["paired"].items()}
    head = "".join(f"<th>dice {html.escape(n)}</th>" for n in classes.values())
    rows = [
        f'<tr><td class="text"><a href="{html.escape(m)}/report.html">{html.escape(m)}</a></td>'
        f"<td>{s['num_scored']}</td><td>{s['failures']}</td>"
        + "".join(f"<td>{_number(s['dice_mean'].get(k))}</td>" for k in classes)
        + f'<td class="text"><code>{html.escape(s["folder"])}</code></td></tr>'
        for m, s in methods.items()
    ]
    tests = []
    for entry in comparison["paired"].values():
        for metric, pairs in entry.items():
            if metric == "name":
                continue
            for pair, test in pairs.items():
                tests.append(
                    f'<tr><td class="text">{html.escape(entry["name"])}</td><td class="text">{metric}</td>'
                    f'<td class="text">{html.escape(pair)}</td><td>{test["n"]}</td>'
                    f"<td>{_number(test['mean_difference'], 4)}</td><td>{_number(test['median_difference'], 4)}</td>"
                    f"<td>{_p_value(test['p_value'])}</td></tr>"
                )
    boxplot = data_url(output / "comparison_boxplot.png")
    failures = "".join(f"<li>{html.escape(f['id'])}: {html.escape(f['error'])}</li>" for f in comparison["failures"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Comparison of segmentations</title>',
        f"<style>{STYLE}</style></head><body><h1>Comparison: {html.escape(', '.join(methods))}</h1>",
        f'<p class="meta">{comparison["num_cases"]} cases. Each method\'s own report (per case, per class) is '
        "linked from its name.</p>",
        '<h2>Methods</h2><table><tr><th class="text">method</th><th>scored</th><th>failed</th>'
        f'{head}<th class="text">folder</th></tr>{"".join(rows)}</table>',
    ]
    if boxplot:
        parts.append(f'<h2>Dice per case</h2><img id="boxplot" src="{boxplot}" alt="dice box plot by method">')
    parts += [
        "<h2>Paired tests</h2>",
        f'<p class="meta">{html.escape(comparison["test"])}.</p>',
        '<table id="paired"><tr><th class="text">class</th><th class="text">metric</th><th class="text">B - A</th>'
        f"<th>cases</th><th>mean difference</th><th>median difference</th><th>p</th></tr>{''.join(tests)}</table>",
    ]
    if failures:
        parts.append(f"<h2>Failed cases</h2><ul>{failures}</ul>")
    return "\n".join([*parts, "</body></html>"]) + "\n"
