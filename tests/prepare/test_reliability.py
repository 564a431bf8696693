"""Reliability of data_gen.py: killed anywhere it resumes to the same bytes; bad input gets a clear error and the
other cases finish; an unwritable or full disk stops with a clear error without losing finished cases."""

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from builders import kill_when, tree_bytes
from conftest import ROOT, SAMPLE, SHARED_DATA

import data_gen


def start_data_gen(output: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        str(ROOT / "data_gen.py"),
        "--input",
        str(SAMPLE),
        "--output",
        str(output),
        "--workers",
        "1",
    ]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def reference_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "out"
    process = start_data_gen(output)
    assert process.wait() == 0, process.stderr.read().decode()
    return tree_bytes(output)


def volumes(output: Path) -> int:
    folder = output / "volumes"
    return len(list(folder.glob("*.npy"))) if folder.is_dir() else 0


@pytest.mark.parametrize(
    "moment",
    [
        pytest.param(
            lambda out: (out / ".cache").is_dir() and len(list((out / ".cache").iterdir())) >= 5,
            id="during-fingerprint",
        ),
        pytest.param(lambda out: volumes(out) >= 3, id="early-prepare"),
        pytest.param(lambda out: volumes(out) >= 41, id="mid-prepare"),
        pytest.param(lambda out: volumes(out) >= 70, id="late-prepare"),
    ],
)
def test_killed_data_gen_resumes_to_identical_bytes(tmp_path, reference_output, moment):
    output = tmp_path / "out"
    killed = kill_when(start_data_gen(output), lambda: moment(output))
    assert killed, "data_gen.py finished before the kill point"
    leftovers = [p for p in output.rglob("*") if p.is_file() and ".tmp" not in p.name]
    for path in leftovers:  # every file under a final name is complete: its bytes equal the reference's
        relative = str(path.relative_to(output))
        if relative in reference_output and not relative.startswith(".cache"):
            assert path.read_bytes() == reference_output[relative], relative
    rerun = start_data_gen(output)
    assert rerun.wait() == 0, rerun.stderr.read().decode()
    result = tree_bytes(output)
    assert sorted(result) == sorted(reference_output)
    assert all(result[k] == reference_output[k] for k in result)


def make_msd(root: Path, cases: int = 3) -> Path:
    """A small MSD folder with ``cases`` copies of sample cases; returns its root."""
    meta = json.loads((SAMPLE / "dataset.json").read_text())
    meta["training"] = meta["training"][:cases]
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for entry in meta["training"]:
        for key in ("image", "label"):
            shutil.copy(SAMPLE / entry[key], root / entry[key])
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def first_case(root: Path) -> tuple[Path, Path]:
    entry = json.loads((root / "dataset.json").read_text())["training"][0]
    return root / entry["image"], root / entry["label"]


def save_like(path: Path, data: np.ndarray, affine=None, reference: Path | None = None):
    affine = nib.load(reference).affine if reference is not None else (np.eye(4) if affine is None else affine)
    nib.save(nib.Nifti1Image(data, affine), path)


def damage_truncate(root):
    image, _ = first_case(root)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return image.name, "cannot read NIfTI"


def damage_garbage(root):
    image, _ = first_case(root)
    image.write_bytes(gzip.compress(os.urandom(2000)))
    return image.name, "cannot read NIfTI"


def damage_nan(root):
    image, _ = first_case(root)
    data = np.asanyarray(nib.load(image).dataobj).astype(np.float32)
    data[1, 2, 3] = np.nan
    save_like(image, data, reference=image)
    return image.name, "NaN or Inf"


def damage_all_zero(root):
    image, _ = first_case(root)
    save_like(image, np.zeros(nib.load(image).shape, np.float32), reference=image)
    return image.name, "all zero"


def damage_2d(root):
    image, _ = first_case(root)
    save_like(image, np.ones((20, 30), np.float32))
    return image.name, "expected a 3D"


def damage_4d(root):
    image, _ = first_case(root)
    data = np.asanyarray(nib.load(image).dataobj).astype(np.float32)
    save_like(image, np.stack([data, data], axis=-1), reference=image)
    return image.name, "2 channel"


def damage_label_values(root):
    _, label = first_case(root)
    data = np.asanyarray(nib.load(label).dataobj).astype(np.uint8)
    data[0, 0, 0] = 7
    save_like(label, data, reference=label)
    return label.name, "not among the dataset's labels"


def damage_shape(root):
    _, label = first_case(root)
    data = np.asanyarray(nib.load(label).dataobj)
    save_like(label, data[:-2], reference=label)
    return label.name, "shape"


def damage_geometry(root):
    _, label = first_case(root)
    reference = nib.load(label)
    affine = reference.affine.copy()
    affine[:3, :3] *= 1.5
    save_like(label, np.asanyarray(reference.dataobj), affine=affine)
    return label.name, "geometry"


def damage_missing_label(root):
    _, label = first_case(root)
    label.unlink()
    return label.name, "does not exist"


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncate,
        damage_garbage,
        damage_nan,
        damage_all_zero,
        damage_2d,
        damage_4d,
        damage_label_values,
        damage_shape,
        damage_geometry,
    ],
)
def test_a_damaged_case_is_named_and_the_others_finish(tmp_path, capsys, damage):
    root = make_msd(tmp_path / "raw")
    file_name, phrase = damage(root)
    output = tmp_path / "out"
    assert data_gen.main(["--input", str(root), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert file_name in err and phrase in err, err
    assert "Traceback" not in err
    manifest = json.loads((output / "manifest.json").read_text())
    assert len(manifest["cases"]) == 2  # the two intact cases were written


def test_a_dataset_json_naming_a_missing_file_fails_that_case_only(tmp_path, capsys):
    root = make_msd(tmp_path / "raw")
    file_name, phrase = damage_missing_label(root)
    assert data_gen.main(["--input", str(root), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if file_name in line)
    assert phrase in line and "dataset.json" in line and "Traceback" not in err
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"]) == 2


def test_an_empty_dataset_is_a_clear_error(tmp_path, capsys):
    root = make_msd(tmp_path / "raw")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = []
    (root / "dataset.json").write_text(json.dumps(meta))
    assert data_gen.main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    assert "lists no cases" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "code"), [("../escape", 1), ("a/b", 1), ("..hidden", 2), ("-flag", 2)])
def test_unsafe_case_ids_are_refused(tmp_path, capsys, name, code):
    """An id that is no safe file name stops the run; a listed file that does not exist fails its case (exit 1)."""
    root = make_msd(tmp_path / "raw", cases=1)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = f"./imagesTr/{name}.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    assert data_gen.main(["--input", str(root), "--output", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert "case id" in err or "does not exist" in err
    assert not (tmp_path / "escape").exists()


def test_unwritable_output_is_refused_before_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert data_gen.main(["--input", str(SAMPLE), "--output", str(blocker / "out")]) == 2
    assert "cannot write into" in capsys.readouterr().err


def test_disk_full_stops_with_a_clear_error_and_keeps_finished_cases(tmp_path, capsys, monkeypatch):
    output = tmp_path / "out"
    real_save = np.save
    calls = {"n": 0}

    def save_until_full(handle, array, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(handle, array, **kwargs)

    monkeypatch.setattr(np, "save", save_until_full)
    assert data_gen.main(["--input", str(SAMPLE), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not [p for p in output.rglob("*.tmp*")]  # no temporary left behind
    finished = sorted(p.name for p in (output / "volumes").glob("*.json"))
    assert len(finished) == 3  # three complete cases (image + label each) survive for the rerun
    monkeypatch.setattr(np, "save", real_save)
    assert data_gen.main(["--input", str(SAMPLE), "--output", str(output)]) == 0


@pytest.mark.skipif(not (SHARED_DATA / "totalsegmentator").is_dir(), reason="needs ../shared/data")
def test_dicom_series_with_a_missing_slice_is_refused(tmp_path, capsys):
    series = tmp_path / "series"
    shutil.copytree(SHARED_DATA / "totalsegmentator" / "example_ct_dicom", series)
    import pydicom

    files = sorted(series.iterdir())
    positions = sorted((float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]), p) for p in files)
    positions[len(positions) // 2][1].unlink()  # a slice in the middle of the stack is gone
    code = data_gen.main(["--input", str(series), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "spacing" in err.lower() or "missing" in err.lower() or "uneven" in err.lower(), err


@pytest.mark.parametrize("content", [b"not a zip archive", b"PK\x03\x04 truncated zip"])
def test_a_model_file_that_is_not_a_keras_model_is_named(prepared_sample, tmp_path, capsys, content):
    import evaluation

    run = tmp_path / "run"
    run.mkdir()
    dataset = json.loads((prepared_sample / "manifest.json").read_text())
    (run / "config.json").write_text(json.dumps({"labels": dataset["labels"], "num_channels": 1}))
    (run / "model.keras").write_bytes(content)
    code = evaluation.main(["--run", str(run), "--data", str(prepared_sample), "--output", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and "model.keras" in err and "not a loadable Keras model" in err
    assert "Traceback" not in err


def make_pairs(root: Path, suffix: str = ".nrrd", cases: int = 3) -> Path:
    """``c<i>_image<suffix>`` + ``c<i>_label<suffix>`` pairs (uncompressed, so a cut lands in the voxels)."""
    import SimpleITK as sitk

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(cases):
        label = np.zeros((6, 8, 10), np.uint8)
        label[2:4, 2:6, 3:7] = 1
        image = (rng.normal(size=label.shape) + 5 * label + 10).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(root / f"c{i}_image{suffix}"), False)
        sitk.WriteImage(sitk.GetImageFromArray(label), str(root / f"c{i}_label{suffix}"), False)
    return root


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def nrrd_truncated(root):
    cut(root / "c1_image.nrrd")
    return "c1_image.nrrd", "cannot read image"


def nrrd_bad_header(root):
    path = root / "c1_image.nrrd"
    path.write_bytes(path.read_bytes().replace(b"sizes: 10 8 6", b"sizes: 10 8"))
    return "c1_image.nrrd", "cannot read image"


def nrrd_not_an_image(root):
    (root / "c1_image.nrrd").write_bytes(os.urandom(1000))
    return "c1_image.nrrd", "not an image file of a known format"


def nrrd_label_truncated(root):
    cut(root / "c2_label.nrrd")
    return "c2_label.nrrd", "cannot read image"


def mha_truncated(root):
    import SimpleITK as sitk

    for path in sorted(root.iterdir()):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path.with_suffix(".mha")), False)
        path.unlink()
    cut(root / "c1_image.mha")
    return "c1_image.mha", "cannot read image"


@pytest.mark.parametrize(
    "damage", [nrrd_truncated, nrrd_bad_header, nrrd_not_an_image, nrrd_label_truncated, mha_truncated]
)
def test_a_damaged_nrrd_or_mha_pair_is_named_and_the_others_finish(tmp_path, capsys, damage):
    root = make_pairs(tmp_path / "raw")
    file_name, phrase = damage(root)
    output = tmp_path / "out"
    assert data_gen.main(["--input", str(root), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    line = next((line for line in err.splitlines() if file_name in line), err)
    assert phrase in line and "Traceback" not in err, err
    assert len(json.loads((output / "manifest.json").read_text())["cases"]) == 2


def make_hdf5_folder(root: Path, files: int = 3) -> Path:
    """``p<i>.h5`` each holding one patient group ``P<i>`` with ``ct`` and ``seg`` volumes."""
    import h5py

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        label = np.zeros((6, 8, 10), np.uint8)
        label[2:4, 2:6, 3:7] = 1
        with h5py.File(root / f"p{i}.h5", "w") as handle:
            handle[f"P{i}/ct"] = (rng.normal(size=label.shape) * 50 + 200 * label).astype(np.float32)
            handle[f"P{i}/seg"] = label
    return root


def hdf5_truncated(root):
    cut(root / "p1.h5")
    return "p1.h5", "HDF5 file is truncated"


def hdf5_not_hdf5(root):
    (root / "p1.h5").write_bytes(os.urandom(4000))
    return "p1.h5", "cannot open HDF5 file"


def hdf5_without_the_keys(root):
    import h5py

    with h5py.File(root / "p1.h5", "a") as handle:
        handle.move("P1/ct", "P1/image")
    return "p1.h5", "no dataset or group 'ct'"


def hdf5_corrupt_voxels(root):
    import h5py

    with h5py.File(root / "p1.h5", "w") as handle:  # a compressed dataset whose stored chunk is then overwritten
        handle.create_dataset("P1/ct", data=np.ones((6, 8, 10), np.float32), compression="gzip")
        handle["P1/seg"] = np.zeros((6, 8, 10), np.uint8)
        offset = handle["P1/ct"].id.get_offset() or handle["P1/ct"].id.get_chunk_info(0).byte_offset
    with open(root / "p1.h5", "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 16)
    return "p1.h5", "cannot read"


@pytest.mark.parametrize("damage", [hdf5_truncated, hdf5_not_hdf5, hdf5_without_the_keys, hdf5_corrupt_voxels])
def test_a_damaged_hdf5_file_is_named_and_the_other_files_finish(tmp_path, capsys, damage):
    root = make_hdf5_folder(tmp_path / "raw")
    file_name, phrase = damage(root)
    output = tmp_path / "out"
    flags = ["--hdf5-image-keys", "ct", "--hdf5-label-key", "seg", "--hdf5-spacing", "2"]
    assert data_gen.main(["--input", str(root), "--output", str(output), *flags]) == 1
    err = capsys.readouterr().err
    line = next((line for line in err.splitlines() if file_name in line), err)
    assert phrase in line and "Traceback" not in err, err
    assert sorted(c["id"] for c in json.loads((output / "manifest.json").read_text())["cases"]) == ["p0_P0", "p2_P2"]


def test_a_single_truncated_hdf5_file_stops_with_its_name(tmp_path, capsys):
    root = make_hdf5_folder(tmp_path / "raw", files=1)
    cut(root / "p0.h5")
    assert data_gen.main(["--input", str(root / "p0.h5"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "p0.h5: HDF5 file is truncated" in err and "Traceback" not in err


def copy_series(source: Path, target: Path, series_uid: str, prefix: str = "") -> None:
    """Copy a DICOM series as a new one: every file gets ``series_uid`` and a new instance UID."""
    import pydicom
    from pydicom.uid import generate_uid

    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(target / f"{prefix}{path.name}")


DCMQI_SERIES = SHARED_DATA / "dcmqi" / "ct-3slice"


def dicom_truncated_slice(folder):
    cut(folder / "02.dcm", keep=0.9)
    return "02.dcm", "damaged DICOM slice"


def dicom_garbage_slice(folder):
    path = folder / "02.dcm"
    path.write_bytes(path.read_bytes()[:132] + os.urandom(4000))
    return "02.dcm", "damaged DICOM file"


def dicom_two_acquisitions_under_one_uid(folder):
    import pydicom
    from pydicom.uid import generate_uid

    scout = pydicom.dcmread(folder / "01.dcm")
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.save_as(folder / "scout.dcm")
    return "b", "mixes slices of different sizes or orientations"


@pytest.mark.skipif(not DCMQI_SERIES.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("damage", [dicom_truncated_slice, dicom_garbage_slice, dicom_two_acquisitions_under_one_uid])
def test_a_damaged_dicom_series_is_named_and_the_other_series_finish(tmp_path, capsys, damage):
    root = tmp_path / "study"
    copy_series(DCMQI_SERIES, root / "a", "1.2.826.0.1.3680043.8.498.1001")
    copy_series(DCMQI_SERIES, root / "b", "1.2.826.0.1.3680043.8.498.1002")
    name, phrase = damage(root / "b")
    output = tmp_path / "out"
    assert data_gen.main(["--input", str(root), "--output", str(output), "--window-preset", "liver"]) == 1
    err = capsys.readouterr().err
    line = next((line for line in err.splitlines() if phrase in line), err)
    assert name in line and "Traceback" not in err, err
    assert [c["id"] for c in json.loads((output / "manifest.json").read_text())["cases"]] == ["a"]


@pytest.mark.skipif(not DCMQI_SERIES.is_dir(), reason="needs ../shared/data")
def test_two_series_mixed_in_one_folder_become_two_cases(tmp_path):
    folder = tmp_path / "mixed"
    copy_series(DCMQI_SERIES, folder, "1.2.826.0.1.3680043.8.498.1001", prefix="first_")
    copy_series(DCMQI_SERIES, folder, "1.2.826.0.1.3680043.8.498.1002", prefix="second_")
    output = tmp_path / "out"
    assert data_gen.main(["--input", str(folder), "--output", str(output), "--window-preset", "liver"]) == 0
    cases = json.loads((output / "manifest.json").read_text())["cases"]
    assert len(cases) == 2 and all(len(c["source"]["image"]) == 3 for c in cases)


def _die_on_job_two(job: int) -> int:
    if job == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return job * 10


def test_a_data_gen_worker_that_dies_is_reported_not_a_traceback():
    from utils.prepare.dataset import _run_parallel

    assert _run_parallel(_die_on_job_two, [(0,), (1,), (3,)], 2, "prepare") == [0, 10, 30]
    with pytest.raises(ChildProcessError, match=r"worker process died in the prepare pass .* rerun the same command"):
        _run_parallel(_die_on_job_two, [(i,) for i in range(5)], 2, "prepare")


def test_a_case_that_fails_leaves_the_other_cases_in_their_splits(tmp_path, capsys):
    root = make_msd(tmp_path / "raw", cases=10)
    fractions = ["--split", "0.6", "0.2", "0.2"]
    assert data_gen.main(["--input", str(root), "--output", str(tmp_path / "whole"), *fractions]) == 0
    damage_garbage(root)
    assert data_gen.main(["--input", str(root), "--output", str(tmp_path / "damaged"), *fractions]) == 1
    whole = json.loads((tmp_path / "whole" / "splits.json").read_text())
    damaged = json.loads((tmp_path / "damaged" / "splits.json").read_text())
    lost = json.loads((root / "dataset.json").read_text())["training"][0]["image"].split("/")[-1].split(".")[0]
    assert lost in sum(whole.values(), []) and lost not in sum(damaged.values(), [])
    assert damaged == {k: [c for c in v if c != lost] for k, v in whole.items()}
