"""report.html: one self-contained page; checked as text and, when Chromium is installed, in a real headless browser
(the summary and case tables are there, every embedded image decodes, a header click sorts the cases)."""

import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from utils.evaluate.report import render_report, write_report
from utils.evaluate.results import summarize
from utils.geometry import resize_nearest, resize_volume
from utils.plots import DisplayVolume, class_color, plot_dice_boxplot, plot_overlay, side_by_side

NAMES = {"1": "liver", "2": "tumour"}
CHROMIUM = os.environ.get("CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install -y chromium; or set CHROMIUM=/path/to/browser), "
    "so report.html is only checked as text",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder with four cases (one unlabelled), their overlays and the box plot, and its report."""
    output = tmp_path_factory.mktemp("results")
    dice = {"a": (0.91, 0.62), "b": (0.45, float("nan")), "c": (0.80, 0.10), "d": None}
    records = []
    for index, (case_id, scores) in enumerate(dice.items()):
        truth = np.zeros((6, 20, 24), dtype=np.uint8)
        truth[1:5, 4:14, 5:15] = 1
        truth[2:4, 6:9, 7:10] = 2
        prediction = np.roll(truth, index, axis=2)
        image = np.random.default_rng(index).normal(size=(6, 20, 24, 1)).astype(np.float32) + truth[..., None]
        volume = DisplayVolume.from_source(image, truth if scores else None, prediction, np.diag([3.0, 1.0, 1.0, 1]))
        plot_overlay(volume, output / "overlays" / f"{case_id}.png", {1: "liver", 2: "tumour"}, title=case_id)
        metrics = None
        if scores:
            metrics = {k: {"dice": v, "hd95": 2.0 * (1 - v)} for k, v in zip("12", scores, strict=True)}
        records.append({"id": case_id, "metrics": metrics, "overlay": f"overlays/{case_id}.png"})
        records[-1]["predicted_ml"] = {"1": 1.5 + index, "2": 0.1 * index}
    summary = summarize(records, NAMES, ["dice", "hd95"])
    summary["settings"] = {"run": "runs/demo", "split": "test", "tta": True}
    scored = [r for r in records if r["metrics"]]
    plot_dice_boxplot({NAMES[k]: [r["metrics"][k]["dice"] for r in scored] for k in NAMES}, output / "dice_boxplot.png")
    write_report(summary, records, NAMES, output, title="Demo <results>")
    return output


def test_report_is_one_self_contained_page(results):
    text = (results / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and "<title>Demo &lt;results&gt;</title>" in text
    assert not re.search(r'src="(?!data:)', text) and "http" not in text.replace("http-equiv", "")
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 5  # the box plot and four overlays
    for encoded in images:
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).size[0] > 100
    rows = re.findall(r'<tr id="case-(\w+)">', text)
    assert rows == ["b", "c", "a", "d"]  # worst mean dice first, unscored last
    assert 'data-value="0.45"' in text and 'data-value="NaN"' in text
    summary_table = re.search(r'<table id="summary">(.*?)</table>', text).group(1)
    assert summary_table.count("<tr>") == 1 + 2  # header and two classes


def test_a_report_without_scores_still_lists_the_cases(tmp_path):
    records = [{"id": "x", "metrics": None, "predicted_ml": {"1": 2.0}}]
    text = render_report(summarize(records, NAMES, ["dice"]), records, NAMES, tmp_path)
    assert "nothing was scored" in text and '<tr id="case-x">' in text and "volume liver (ml)" in text


def test_training_pictures_use_the_class_colours_of_the_report():
    """TensorBoard's ``image | truth | prediction`` and the overlays share one palette (class 3 was blue in one and
    yellow in the other, class 7 black in TensorBoard)."""
    truth = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4, 1)
    picture = side_by_side(image, truth, np.zeros_like(truth), min_size=6)
    assert picture.shape == (6, 2 * (3 * 4 + 4), 3) and picture.dtype == np.uint8
    truth_panel = picture[::2, 2 * (4 + 2) : 2 * (2 * 4 + 2) : 2]
    assert [tuple(colour) for colour in truth_panel.reshape(-1, 3)] == [(0, 0, 0), *map(class_color, range(1, 12))]
    assert class_color(3) == (255, 225, 25) and class_color(11) == class_color(1)
    assert not picture[::2, 2 * (2 * 4 + 4) :: 2].any() and (picture[:, 8:12] == 255).all()
    grey = picture[::2, :8:2, 0]
    assert grey[0, 0] == 0 and grey[-1, -1] == 255 and (np.diff(grey.ravel().astype(int)) >= 0).all()


def test_one_nearest_resize_serves_label_volumes_and_display_slices():
    """:func:`utils.geometry.resize_nearest` resamples prepared label volumes (channels kept) and the GIF's slices."""
    volume = np.arange(4 * 6 * 5 * 2).reshape(4, 6, 5, 2)
    resized = resize_nearest(volume, (8, 3, 5))
    np.testing.assert_array_equal(resized, volume[[0, 0, 1, 1, 2, 2, 3, 3]][:, [1, 3, 5]])
    np.testing.assert_array_equal(resize_volume(volume, (8, 3, 5), order=0), resized)
    slice_ = volume[0, ..., 0]
    np.testing.assert_array_equal(resize_nearest(slice_, (3, 10)), slice_[[1, 3, 5]][:, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]])


def chromium(*args, timeout=90):
    profile = tempfile_dir()
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def tempfile_dir():
    import tempfile

    return tempfile.mkdtemp(prefix="chromium-profile-")


CLICK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const header = Array.from(document.querySelectorAll("#cases th")).find(th => th.textContent === "dice tumour");
  header.click();
  const ascending = Array.from(document.querySelectorAll("#cases tbody tr")).map(tr => tr.id).join(",");
  header.click();
  const descending = Array.from(document.querySelectorAll("#cases tbody tr")).map(tr => tr.id).join(",");
  document.body.dataset.sorted = ascending + "|" + descending;
});
</script></body>"""


@needs_chromium
def test_report_renders_in_headless_chromium(results, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text((results / "report.html").read_text().replace("</body>", CLICK_SCRIPT))
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images-loaded="5/5"' in body, body
    assert 'data-sorted="case-c,case-a,case-b,case-d|case-a,case-c,case-b,case-d"' in body, body
    assert len(re.findall(r'<tr id="case-', dom)) == 4
    assert re.search(r'<table id="summary">.*liver.*tumour.*</table>', dom, re.S)

    screenshot = tmp_path / "report.png"
    chromium("--window-size=1280,1600", f"--screenshot={screenshot}", (results / "report.html").as_uri())
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=int)
    assert pixels.shape == (1600, 1280, 3)
    assert pixels.std() > 20  # text, tables and pictures, not a blank page
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((red > 150) & (green < 100) & (blue < 150)).sum() > 200  # the liver contours of the overlays
