"""``report.html``: one self-contained page that a clinician opens from a folder or an e-mail, in any browser.

The page holds the summary table (per class and region: cases, empty cases, dice mean ± std, median and quartiles,
the mean of the other metrics), the dice box plot, and one row per case with its scores and overlay. Images are
embedded as base64 ``data:`` URLs, so the file needs nothing beside it (the per-case GIFs are linked, as
``gifs/<id>.gif`` beside the report). A few lines of inline JavaScript sort the case table by any column (click a
header; cases without a score go last), enlarge an overlay on click, and record on
``<body data-images-loaded="n/m">`` how many images decoded.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from utils import fileio
from utils.metrics import finite_mean

SCRIPT = """
function sortTable(th) {
  const table = th.closest("table"), body = table.tBodies[0];
  const index = Array.from(th.parentNode.children).indexOf(th);
  const ascending = th.dataset.order !== "asc";
  th.parentNode.querySelectorAll("th").forEach(h => { delete h.dataset.order; });
  th.dataset.order = ascending ? "asc" : "desc";
  const numeric = th.dataset.sort === "number";
  const key = row => {
    const cell = row.cells[index];
    return numeric ? parseFloat(cell.dataset.value) : cell.textContent.trim();
  };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (numeric) {
      if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
      return ascending ? x - y : y - x;
    }
    return ascending ? x.localeCompare(y) : y.localeCompare(x);
  });
  rows.forEach(row => body.appendChild(row));
}
document.querySelectorAll("th[data-sort]").forEach(th => th.addEventListener("click", () => sortTable(th)));
document.querySelectorAll("td.overlay img").forEach(img => img.addEventListener("click", () => {
  img.classList.toggle("large");
}));
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(image => image.complete && image.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
"""

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; vertical-align: middle; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
th[data-sort] { cursor: pointer; } th[data-sort]:hover { background: #e0e8f0; }
th[data-order="asc"]::after { content: " \\25B2"; } th[data-order="desc"]::after { content: " \\25BC"; }
#cases { width: 100%; } td.overlay { width: 45%; }  /* the overlay shrinks to fit beside the metrics */
td.overlay img { width: 100%; max-width: 560px; height: auto; display: block; cursor: zoom-in; }
td.overlay img.large { width: auto; max-width: none; cursor: zoom-out; }
.meta { color: #555; font-size: 0.9em; } .low { background: #fde0dc; } code { font-size: 0.95em; }
"""


def data_url(path: str | os.PathLike) -> str | None:
    """``data:`` URL of a PNG or GIF file, or ``None`` when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return None
    kind = "gif" if path.suffix.lower() == ".gif" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _cell(value, digits: int = 3, low: float | None = None) -> str:
    finite = value is not None and math.isfinite(float(value))
    data = f"{float(value):.6g}" if finite else "NaN"
    css = ' class="low"' if finite and low is not None and float(value) < low else ""
    return f'<td data-value="{data}"{css}>{_number(value, digits)}</td>'


def summary_table(summary: Mapping) -> str:
    """The per-class (and region) table of ``summary.json``."""
    classes = summary.get("classes", {})
    if not classes:
        return "<p>No case had a label, so nothing was scored.</p>"
    metrics = [m for m in next(iter(classes.values())) if m != "name"]
    others = [m for m in metrics if m != "dice"]
    head = ["class / region", "cases", "empty"]
    if "dice" in metrics:
        head += ["dice mean ± std", "dice median [q1, q3]"]
    head += [f"{m} mean" for m in others]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for entry in classes.values():
        first = entry[metrics[0]]
        cells = [f'<td class="text">{html.escape(str(entry["name"]))}</td>', f"<td>{first['n']}</td>"]
        cells.append(f"<td>{first['n_empty']}</td>")
        if "dice" in metrics:
            dice = entry["dice"]
            cells.append(f"<td>{_number(dice['mean'])} ± {_number(dice['std'])}</td>")
            cells.append(f"<td>{_number(dice['median'])} [{_number(dice['q1'])}, {_number(dice['q3'])}]</td>")
        cells += [f"<td>{_number(entry[m]['mean'], 2)}</td>" for m in others]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    foreground = summary.get("foreground_mean", {})
    note = ", ".join(f"{m} {_number(v)}" for m, v in foreground.items() if v is not None)
    return f'<table id="summary">{"".join(rows)}</table><p class="meta">Foreground mean over classes: {note}</p>'


def case_table(records: Sequence[Mapping], names: Mapping[str, str], output: Path) -> str:
    """One row per case: mean dice, dice and hd95 per class/region, predicted volumes, the overlay (embedded)."""
    keys = list(dict.fromkeys(k for r in records for k in (r.get("metrics") or {})))
    volume_keys = list(dict.fromkeys(k for r in records for k in (r.get("predicted_ml") or {})))
    has_dice = any("dice" in (r.get("metrics") or {}).get(k, {}) for r in records for k in keys)
    has_hd95 = any("hd95" in (r.get("metrics") or {}).get(k, {}) for r in records for k in keys)
    head = ['<th class="text" data-sort="text">case</th>']
    if has_dice:
        head.append('<th data-sort="number" data-order="asc">mean dice</th>')
        head += [f'<th data-sort="number">dice {html.escape(names.get(k, k))}</th>' for k in keys]
    if has_hd95:
        head += [f'<th data-sort="number">hd95 {html.escape(names.get(k, k))} (mm)</th>' for k in keys]
    head += [f'<th data-sort="number">volume {html.escape(names.get(k, k))} (ml)</th>' for k in volume_keys]
    head.append('<th class="text">overlay</th>')
    rows = []
    for record in sorted(records, key=lambda r: _sort_key(r, keys)):
        metrics = record.get("metrics") or {}
        cells = [f'<td class="text">{html.escape(record["id"])}</td>']
        if has_dice:
            cells.append(_cell(mean_dice(record, keys), low=0.5))
            cells += [_cell(metrics.get(k, {}).get("dice"), low=0.5) for k in keys]
        if has_hd95:
            cells += [_cell(metrics.get(k, {}).get("hd95"), 2) for k in keys]
        cells += [_cell((record.get("predicted_ml") or {}).get(k), 2) for k in volume_keys]
        cells.append(f'<td class="overlay text">{_pictures(record, output)}</td>')
        rows.append(f'<tr id="case-{html.escape(record["id"])}">{"".join(cells)}</tr>')
    return f'<table id="cases"><thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _pictures(record: Mapping, output: Path) -> str:
    parts = []
    overlay = data_url(output / record["overlay"]) if record.get("overlay") else None
    if overlay:
        parts.append(f'<img src="{overlay}" alt="overlay of {html.escape(record["id"])}">')
    if record.get("gif") and (output / record["gif"]).is_file():
        parts.append(f'<a href="{html.escape(record["gif"])}">slices (animated GIF)</a>')
    return "".join(parts) or "–"


def mean_dice(record: Mapping, keys: Sequence[str]) -> float:
    """Mean dice over the record's classes (not regions) with a finite dice; NaN when there is none."""
    metrics = record.get("metrics") or {}
    return finite_mean(metrics[k].get("dice") for k in keys if k.isdigit() and k in metrics)


def _sort_key(record: Mapping, keys: Sequence[str]) -> tuple:
    value = mean_dice(record, keys)
    return (not math.isfinite(value), value if math.isfinite(value) else 0.0, record["id"])


def describe_plan(plan: Mapping) -> str:
    """One sentence on a post-processing plan of :mod:`utils.evaluate.postprocess`."""
    kept = plan.get("lcc_class_names") or [str(k) for k in plan.get("lcc_classes", [])]
    text = f"largest connected component kept for {', '.join(kept)}" if kept else "no largest-component filtering"
    if plan.get("decided_on"):
        changes = "; ".join(
            f"class {k}: {_number(v['without_lcc'])} → {_number(v['with_lcc'])}"
            for k, v in plan.get("dice", {}).items()
        )
        text += f" (decided on {plan.get('num_cases', 0)} {plan['decided_on']} cases, dice without → with: {changes})"
    if plan.get("min_size"):
        text += f"; components under {plan['min_size']:g} {plan.get('min_size_unit', 'voxels')} removed"
    return text + "."


def render_report(
    summary: Mapping,
    records: Sequence[Mapping],
    names: Mapping[str, str],
    output: str | os.PathLike,
    title: str = "Segmentation results",
) -> str:
    """The HTML text of the report (see the module docstring)."""
    output = Path(output)
    settings = summary.get("settings", {})
    meta = ", ".join(
        f"{html.escape(str(k))} <code>{html.escape(str(v))}</code>"
        for k, v in settings.items()
        if k in ("run", "data", "input", "split", "model", "overlap", "blend", "tta", "postprocess")
    )
    boxplot = data_url(output / "dice_boxplot.png")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{summary.get("num_cases", len(records))} cases, {summary.get("num_scored", 0)} scored. '
        f"{meta}</p>",
        "<h2>Summary</h2>",
        summary_table(summary),
    ]
    if summary.get("postprocessing"):
        parts.append(f'<p class="meta">Post-processing: {html.escape(describe_plan(summary["postprocessing"]))}</p>')
    if boxplot:
        parts.append(f'<h2>Dice per case</h2><img id="boxplot" src="{boxplot}" alt="dice box plot">')
    parts += [
        "<h2>Cases</h2>",
        '<p class="meta">Worst mean dice first; click a column header to sort. Contours: truth solid, prediction '
        "dashed. Dice below 0.5 is shaded.</p>",
        case_table(records, names, output),
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(
    summary: Mapping,
    records: Sequence[Mapping],
    names: Mapping[str, str],
    output: str | os.PathLike,
    title: str = "Segmentation results",
) -> Path:
    """Write ``<output>/report.html`` atomically; overlays and the box plot are read from ``output``."""
    return fileio.write_text(Path(output) / "report.html", render_report(summary, records, names, output, title))
