"""Reliability of evaluation.py: killed with SIGKILL at several moments (in the first case, while writing a picture,
while writing the results), each rerun of the same command resumes, no file under a final name is ever half-written,
no temporary is left at the end, and the results are byte-identical to an uninterrupted run's (masks, cases/,
metrics.csv, summary.json, pictures, report.html). A full disk or an unwritable folder stops it with a clear error
and keeps the finished cases; a rerun redoes the cases whose input files or model changed; masks in every source
format (NRRD, HDF5, DICOM-SEG) are written byte-identically."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import nibabel
import pytest
from builders import kill_when, label_reader, tree_bytes
from conftest import ROOT, SHARED_DATA

import evaluation
import model as model_zoo
from utils import formats as readers
from utils.evaluate.options import Options
from utils.evaluate.pipeline import evaluate
from utils.formats import write_mask
from utils.prepared import PreparedDataset


@pytest.fixture(scope="module")
def model_run(synthetic, tmp_path_factory):
    """The synthetic run's config with a real (untrained, seeded) Keras model, so that evaluation.py runs alone."""
    _, dataset, template = synthetic
    run = tmp_path_factory.mktemp("model_run")
    (run / "config.json").write_text((template / "config.json").read_text())
    keras.utils.set_random_seed(0)
    model_zoo.build_model("unet3d", (8, 16, 16, 1), 3, filters=4, depth=2).save(run / "model.keras")
    return run, dataset


def start_evaluation(run, data, output) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "evaluation.py"), "--run", str(run), "--data", str(data), "--split", "all",
               "--output", str(output), "--quiet"]  # fmt: skip
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    log = open(output.parent / f"{output.name}.log", "ab")  # noqa: SIM115  (closed with the process's end)
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process


def finished(process: subprocess.Popen, output) -> bool:
    code = process.wait()
    assert code == 0, (output.parent / f"{output.name}.log").read_text()[-3000:]
    return True


def cases_done(output) -> int:
    return len(list((output / "cases").glob("*.json"))) if (output / "cases").is_dir() else 0


def temporaries(output) -> list:
    return [p for p in output.rglob(".*.tmp*") if p.is_file()] if output.is_dir() else []


def first_mask_written(output) -> bool:
    masks = output / "masks"
    return masks.is_dir() and any(not p.name.startswith(".") for p in masks.iterdir()) and cases_done(output) == 0


def writing_a_picture(output) -> bool:
    return cases_done(output) >= 3 and any(p.parent.name == "overlays" for p in temporaries(output))


MOMENTS = {
    "in the first case (its mask written, not its pictures)": first_mask_written,
    "while writing a picture": writing_a_picture,
    "while writing the results": lambda output: (output / "metrics.csv").is_file(),
}


RUN_RECORDS = {".lock", "evaluation.log"}  # the lock a killed run leaves; the log every run appends to, with times


def test_killed_evaluation_resumes_to_identical_bytes(model_run, tmp_path):
    run, data = model_run
    reference = tmp_path / "reference"
    assert finished(start_evaluation(run, data, reference), reference)
    expected = tree_bytes(reference)
    assert {"metrics.csv", "summary.json", "report.html", "dice_boxplot.png"} <= set(expected)
    assert sum(name.startswith("masks/") for name in expected) == 8

    output = tmp_path / "killed"
    for moment, ready in MOMENTS.items():
        process = start_evaluation(run, data, output)
        assert kill_when(process, lambda ready=ready: ready(output)), f"finished before the kill {moment}"
        for path in output.rglob("*"):
            relative = str(path.relative_to(output))
            if path.is_file() and ".tmp" not in path.name and path.name not in RUN_RECORDS:  # complete when named
                assert path.read_bytes() == expected[relative], f"{relative} differs after a kill {moment}"
    assert finished(start_evaluation(run, data, output), output)
    result = tree_bytes(output)
    assert sorted(result) == sorted(expected)  # every output, and no temporary left
    assert [name for name in result if result[name] != expected[name] and name not in RUN_RECORDS] == []


def test_a_full_disk_stops_evaluation_and_keeps_finished_cases(synthetic, tmp_path, monkeypatch):
    _, dataset, run = synthetic
    output = tmp_path / "out"
    real_save, calls = nibabel.save, []

    def save_until_full(image, path):
        calls.append(path)
        if full and len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, path)

    monkeypatch.setattr(nibabel, "save", save_until_full)
    options = Options(pictures="none", metrics=["dice"], progress=False)
    full = True
    with pytest.raises(OSError, match="No space left on device"):
        evaluate(run, dataset, output, split="all", options=options, predict=label_reader)
    assert len(list((output / "cases").glob("*.json"))) == 3 and not list(output.rglob(".*.tmp*"))
    full, calls[:] = False, []
    summary = evaluate(run, dataset, output, split="all", options=options, predict=label_reader)
    assert summary["num_cases"] == 8 and not summary["failures"] and len(calls) == 5  # 3 cases reused


def test_an_unwritable_results_folder_is_refused(model_run, tmp_path, capsys):
    run, dataset = model_run
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = evaluation.main(["--run", str(run), "--data", str(dataset), "--output", str(blocker / "out")])
    assert code == 2 and "cannot write into" in capsys.readouterr().err


def written_twice(entry, values, tmp_path) -> tuple[list, list]:
    first = [p.read_bytes() for p in write_mask(values, entry, tmp_path / "first")]
    time.sleep(1.1)  # past the second: a clock value written into a file would now differ
    second = [p.read_bytes() for p in write_mask(values, entry, tmp_path / "second")]
    return first, second


@pytest.mark.parametrize(
    ("source", "options"),
    [
        ("pyradiomics/breast1_image.nrrd", {"label": "pyradiomics/breast1_label.nrrd"}),
        ("sts_layout/lab_petct_vox_5.00mm.h5", {}),
        ("dcmqi/ct-3slice", {"label": "dcmqi/liver_spine_seg.nrrd"}),
    ],
)
def test_masks_in_every_source_format_are_written_byte_identically(tmp_path, source, options):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is not in this checkout")
    from builders import entry_and_values

    options = {key: str(SHARED_DATA / value) for key, value in options.items()}
    entry, values = entry_and_values(readers.discover(SHARED_DATA / source, "auto", options))
    first, second = written_twice(entry, values, tmp_path)
    assert len(first) == 2 and first == second  # masks/<id>.nii.gz and the source format's copy


def test_a_rerun_redoes_the_cases_whose_input_or_model_changed(synthetic, tmp_path):
    _, dataset, template = synthetic
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((template / "config.json").read_text())
    (run / "model.keras").write_bytes(b"first model")  # only its stamp matters: predict stands in for it
    options = Options(pictures="none", metrics=["dice"], progress=False)
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return label_reader(batch)

    evaluate(run, dataset, tmp_path / "out", split="all", options=options, predict=counting)
    evaluate(run, dataset, tmp_path / "out", split="all", options=options, predict=counting)
    first = len(calls)
    assert first > 0 and len(calls) == first  # the rerun reused every case
    case = json.loads((dataset / "manifest.json").read_text())["cases"][0]
    source = Path(PreparedDataset(dataset).spec(case["id"]).image[0])
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # the source was replaced
    calls.clear()
    evaluate(run, dataset, tmp_path / "out", split="all", options=options, predict=counting)
    assert 0 < len(calls) < first  # that case alone was predicted again
    (run / "model.keras").write_bytes(b"a retrained model")
    calls.clear()
    evaluate(run, dataset, tmp_path / "out", split="all", options=options, predict=counting)
    assert len(calls) == first  # a new model redoes every case
