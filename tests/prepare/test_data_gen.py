"""data_gen.py end to end: every format gives a prepared dataset whose labels invert exactly to the source."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from builders import hippocampus_png, hippocampus_subset, make_brats, make_msd, make_png
from conftest import SAMPLE, SHARED_DATA

import data_gen
from utils import fileio
from utils.formats import CaseSpec, load_case
from utils.geometry import GeometryRecord
from utils.prepare.exports import (
    grid_starts,
    plan_slice_size,
    random_starts,
    restore_slices,
    slice_window,
    slice_windows,
)
from utils.prepared import PreparedDataset
from utils.preprocessing import restore_label

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data folder {SHARED_DATA} is not in this checkout"
)


def run(output, *flags) -> int:
    return data_gen.main([*map(str, flags), "--output", str(output)])


def check_inverts(output, exact=True):
    """Each prepared label, restored, equals the source label (and the manifest holds the source geometry); each
    case's spec and geometry record read back typed and write the same JSON, keys in the same order."""
    dataset = PreparedDataset(output)
    for case_id, entry in dataset.cases.items():
        spec, geometry = dataset.spec(case_id), dataset.geometry(case_id)
        stored = {"id": case_id, "patient": entry["patient"], **entry["source"]}
        for key in ("image", "label", "masks", "unreadable"):  # stored relative to the input root, read as full paths
            if isinstance(stored.get(key), list):
                stored[key] = [dataset.source_path(path) for path in stored[key]]
            elif stored.get(key):
                stored[key] = dataset.source_path(stored[key])
        assert json.dumps(spec.to_json()) == json.dumps(stored) and CaseSpec.from_json(spec.to_json()) == spec
        assert json.dumps(geometry.to_json()) == json.dumps(entry["geometry"])
        assert GeometryRecord.from_json(geometry.to_json()) == geometry
        source = load_case(spec)
        assert geometry.source_shape == list(source.image.shape[:3])
        assert np.allclose(geometry.source_affine, source.affine)
        assert dataset.image(case_id).shape[:3] == tuple(geometry.shape)
        if source.label is not None:
            restored = restore_label(np.asarray(dataset.label(case_id)), geometry)
            assert np.array_equal(restored, source.label) if exact else restored.shape == source.label.shape
    return dataset


@pytest.fixture(scope="module")
def sample_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("sample") / "hippocampus"
    code = run(
        output, "--input", SAMPLE, "--spacing", "original", "--workers", 2, "--split", 0.6, 0.2, 0.2,
        "--export", "volumes", "slices", "patches", "--slice-size", 48, 48, "--slice-filter", "foreground",
        "--patch-size", 16, 32, 32, "--patch-ratio", 1, 1.5, "--patches-per-case", 5,
    )  # fmt: skip
    assert code == 0
    return output


def test_sample_dataset_files_and_splits(sample_output):
    manifest = json.loads((sample_output / "manifest.json").read_text())
    splits = json.loads((sample_output / "splits.json").read_text())
    fingerprint = json.loads((sample_output / "fingerprint.json").read_text())
    assert len(manifest["cases"]) == 40 and manifest["label_values"] == [0, 1, 2]
    assert manifest["preprocessing"]["label_values"] == [0, 1, 2] and manifest["source"]["format"] == "msd"
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 8, 8]
    assert sorted(sum(splits.values(), [])) == sorted(c["id"] for c in manifest["cases"])
    assert fingerprint["median_spacing"] == [1.0, 1.0, 1.0] and set(fingerprint["intensity"]["0"]) >= {"dataset_mean"}
    check_inverts(sample_output)


def test_slice_export_keeps_foreground_slices_for_training_only(sample_output):
    dataset = PreparedDataset(sample_output)
    images = np.load(sample_output / "slices" / "train_images.npy", mmap_mode="r")
    labels = np.load(sample_output / "slices" / "train_labels.npy", mmap_mode="r")
    rows = json.loads((sample_output / "slices" / "train_index.json").read_text())["rows"]
    expected = sum(int(np.asarray(dataset.label(i)).any(axis=(1, 2)).sum()) for i in dataset.split("train"))
    assert images.shape == (expected, 48, 48, 1) and labels.shape == (expected, 48, 48) and len(rows) == expected
    assert all(np.asarray(dataset.label(case_id))[z].any() for case_id, z, *_ in rows)
    assert labels.reshape(expected, -1).any(axis=1).mean() > 0.95  # resizing to 48 x 48 may drop a lone voxel
    test_rows = json.loads((sample_output / "slices" / "test_index.json").read_text())["rows"]
    assert len(test_rows) == sum(dataset.image(i).shape[0] for i in dataset.split("test"))
    case_id, z, *_ = rows[3]
    source = np.asarray(dataset.label(case_id))[z]
    assert (labels[3] > 0).sum() == pytest.approx((source > 0).sum() * 48 * 48 / source.size, rel=0.25)


def test_patch_export_sizes_and_ratio(sample_output):
    images = np.load(sample_output / "patches" / "val_images.npy", mmap_mode="r")
    labels = np.load(sample_output / "patches" / "val_labels.npy", mmap_mode="r")
    assert images.shape == (8 * 5, 16, 32, 32, 1) and labels.shape == (8 * 5, 16, 32, 32)
    record = json.loads((sample_output / "patches" / "export.json").read_text())
    assert record["counts"] == {"train": 120, "val": 40, "test": 40} and record["settings"]["patch_ratio"] == [1, 1.5]


def test_rerun_skips_finished_work(sample_output, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in sample_output.rglob("*.npy")}
    code = run(
        sample_output, "--input", SAMPLE, "--spacing", "original", "--split", 0.6, 0.2, 0.2,
        "--export", "volumes", "slices", "patches", "--slice-size", 48, 48, "--slice-filter", "foreground",
        "--patch-size", 16, 32, 32, "--patch-ratio", 1, 1.5, "--patches-per-case", 5,
    )  # fmt: skip
    assert code == 0 and {p: p.stat().st_mtime_ns for p in sample_output.rglob("*.npy")} == stamps


def test_cache_keys_keep_the_recipe_of_existing_datasets():
    """Prepared datasets already on disk hold keys of this recipe: a new one would make their rerun redo every case."""
    spec = {"id": "case_01", "image": [Path("a/b.nii.gz")], "label": None}
    key = fileio.digest(spec, {"a/b.nii.gz": [12, 3]}, np.int64(3), (1.5, "x"), "prepare-v1")
    assert key == "ceccb6862e7a513a0ee55b0dcadeb183076a8eac"


def copy_of_manifest(sample_output, folder, edit) -> dict:
    """A prepared dataset folder holding the sample's manifest (changed by ``edit``) and splits, without volumes."""
    manifest = json.loads((sample_output / "manifest.json").read_text())
    edit(manifest)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "splits.json").write_text((sample_output / "splits.json").read_text())
    return manifest


@pytest.mark.parametrize(("version", "age"), [(0, "an older"), (None, "an older"), (2, "a newer")])
def test_a_manifest_of_another_version_is_refused_in_one_line(sample_output, tmp_path, version, age):
    folder = tmp_path / "old"
    manifest = copy_of_manifest(sample_output, folder, lambda m: m.update(version=version))
    with pytest.raises(ValueError) as error:
        PreparedDataset(folder)
    assert str(error.value) == (
        f"{folder / 'manifest.json'}: prepared with {age} version of data_gen.py (manifest version {version}, this "
        f"toolkit reads 1); rerun data_gen.py --input {manifest['source']['path']} --output {folder}"
    )


def test_a_damaged_case_entry_is_refused_naming_the_key(sample_output, tmp_path):
    def damage(manifest):
        manifest["cases"][0]["source"]["colour"] = "red"
        del manifest["cases"][1]["geometry"]["crop_box"]
        manifest["cases"][2]["source"]["image"] = "one.nii.gz"

    folder = tmp_path / "damaged"
    first, second, third = (c["id"] for c in copy_of_manifest(sample_output, folder, damage)["cases"][:3])
    dataset = PreparedDataset(folder)
    with pytest.raises(ValueError, match=rf"manifest\.json: case '{first}': unknown key 'colour' \(known keys: id, "):
        dataset.spec(first)
    with pytest.raises(ValueError, match=rf"manifest\.json: case '{second}': geometry: missing key 'crop_box'$"):
        dataset.geometry(second)
    with pytest.raises(ValueError, match=rf"case '{third}': key 'image' must be list\[str\], got 'one\.nii\.gz'"):
        dataset.spec(third)
    assert dataset.spec(second).id == second  # the other cases still read
    assert dataset.geometry(first).shape == dataset.cases[first]["geometry"]["shape"]


def test_random_patches_follow_the_ratio():
    label = np.zeros((10, 40, 40), np.uint8)
    label[4:6, 18:22, 18:22] = 1
    rng = np.random.default_rng(0)
    starts = random_starts(label, (4, 8, 8), 10, (1, 1.5), rng)
    with_foreground = [label[z : z + 4, y : y + 8, x : x + 8].any() for z, y, x in starts]
    assert sum(with_foreground[:4]) == 4 and len(starts) == 10
    assert all(0 <= z <= 6 and 0 <= y <= 32 and 0 <= x <= 32 for z, y, x in starts)
    assert all(
        label[z : z + 4, y : y + 8, x : x + 8].any() for z, y, x in random_starts(label, (4, 8, 8), 6, (1, 0), rng)
    )


def test_grid_patches_cover_the_volume():
    starts = grid_starts((10, 20, 7), (4, 8, 7))
    assert len(starts) == 3 * 3 * 1 and (6, 12, 0) in starts and (0, 0, 0) in starts


def test_splits_are_per_patient_and_seeded(tmp_path):
    root = make_png(tmp_path / "png", patients=[(f"{p:03d}", (1, 2)) for p in range(10)])
    outputs = []
    for seed in (0, 0, 1):
        output = tmp_path / f"out{len(outputs)}"
        flags = ("--patient-pattern", r"STS_(\d+)_", "--split", 0.6, 0.2, 0.2, "--seed", seed, "--spacing", "original")
        assert run(output, "--input", root, *flags) == 0
        outputs.append(json.loads((output / "splits.json").read_text()))
        manifest = json.loads((output / "manifest.json").read_text())
        patient = {c["id"]: c["patient"] for c in manifest["cases"]}
        groups = [{patient[i] for i in outputs[-1][s]} for s in ("train", "val", "test")]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
        assert [len(g) for g in groups] == [6, 2, 2] and len(manifest["cases"]) == 20
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_a_bad_case_fails_alone(tmp_path, capsys):
    root = make_msd(tmp_path / "ds", labels=((0, 1), (1, 2), (0, 2)))
    (root / "imagesTr" / "case_1.nii.gz").write_bytes(b"not a nifti file")
    output = tmp_path / "out"
    assert run(output, "--input", root, "--spacing", "original") == 1
    error = capsys.readouterr().err
    assert "1 case(s) failed" in error and "case_1.nii.gz: cannot read NIfTI file" in error
    manifest = json.loads((output / "manifest.json").read_text())
    assert [c["id"] for c in manifest["cases"]] == ["case_0", "case_2"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label-map", "4-3"], "--label-map takes SRC:DST pairs"),
        (["--export", "slices", "patches"], "--export patches needs --patch-size"),
        (["--downsample", "0"], "downsample must be a positive integer"),
        (["--format", "hdf5"], "no HDF5 file"),
    ],
)
def test_bad_flags_exit_with_a_message(tmp_path, capsys, flags, message):
    assert run(tmp_path / "out", "--input", SAMPLE, *flags) == 2
    assert message in capsys.readouterr().err


@needs_shared
def test_nrrd_pairs_with_remapped_labels(tmp_path):
    output = tmp_path / "pyradiomics"
    flags = ["--image-pattern", "prostate*subvolume.nrrd", "breast1_image.nrrd", "--label-pattern"]
    flags += ["prostate*subvolume-label.nrrd", "breast1_label.nrrd", "--spacing", "original"]
    assert run(output, "--input", SHARED_DATA / "pyradiomics", *flags) == 0
    dataset = check_inverts(output)
    assert dataset.manifest["label_values"] == [0, 1, 7, 8, 9] and dataset.num_classes == 5
    entry = dataset.cases["prostate_phantom"]
    assert entry["writer"]["kind"] == "sitk" and entry["writer"]["label_values"] == [0, 1, 7, 8, 9]


@needs_shared
def test_sts_hdf5_with_binarised_labels_and_slices(tmp_path):
    output = tmp_path / "sts"
    flags = ["--binarize", "--spacing", "original", "--window-preset", "soft_tissue", "--export", "slices"]
    flags += ["--split", 0.5, 0.5, 0]
    assert run(output, "--input", SHARED_DATA / "sts_layout" / "lab_petct_vox_5.00mm.h5", *flags) == 0
    dataset = check_inverts(output)
    assert dataset.manifest["channels"] == {"0": "CT"} and dataset.manifest["preprocessing"]["binarize"] is True
    assert dataset.geometry("STS_101").spacing == [5.0, 5.0, 5.0]
    image = dataset.image("STS_101")
    assert image.min() == pytest.approx(0.0) and image.max() == pytest.approx(1.0)  # window then CT = (x - low) / width
    counts = json.loads((output / "slices" / "export.json").read_text())["counts"]
    assert sorted(counts.values()) == [18, 48]


@needs_shared
def test_dicom_with_seg_resampled(tmp_path):
    output = tmp_path / "dcmqi"
    assert run(output, "--input", SHARED_DATA / "dcmqi", "--spacing", 2, 1.5, 1.5, "--window-preset", "liver") == 0
    dataset = check_inverts(output, exact=False)
    entry = dataset.cases["dcmqi"]
    assert dataset.geometry("dcmqi").shape == [1, 277, 277] and entry["writer"]["kind"] == "dicom"
    source = load_case(dataset.spec("dcmqi"))
    restored = restore_label(np.asarray(dataset.label("dcmqi")), dataset.geometry("dcmqi"))
    assert (restored == 1).sum() == pytest.approx((source.label == 1).sum(), rel=0.02)


def test_brats_folders_with_label_map(tmp_path):
    root = make_brats(tmp_path / "brats", cases=("B1", "B2", "B3"))
    output = tmp_path / "out"
    assert (
        run(output, "--input", root, "--label-map", "4:3", "--spacing", "original", "--normalize", "zscore_nonzero")
        == 0
    )
    dataset = check_inverts(output)
    assert dataset.manifest["channels"] == {"0": "FLAIR", "1": "T1", "2": "T1CE", "3": "T2"}
    assert dataset.manifest["label_values"] == [0, 1, 2, 4] and dataset.manifest["preprocessing"]["label_map"] == {
        "4": 3
    }


def test_png_folders_stacked_per_patient(tmp_path):
    root = make_png(tmp_path / "png")
    output = tmp_path / "out"
    flags = ["--patient-pattern", r"STS_(\d+)_(\d+)", "--spacing", "original", "--export", "slices"]
    assert run(output, "--input", root, *flags, "--split", 0.5, 0.5, 0) == 0
    dataset = check_inverts(output)
    assert dataset.manifest["label_values"] == [0, 255] and sorted(dataset.cases) == ["STS_001", "STS_002"]
    counts = json.loads((output / "slices" / "export.json").read_text())["counts"]
    assert sorted(counts.values()) == [1, 3]


def test_unlabelled_single_nifti_file(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.eye(4)), str(path))
    output = tmp_path / "out"
    assert run(output, "--input", path, "--spacing", "original", "--export", "slices") == 0
    dataset = check_inverts(output)
    assert dataset.split("test") == ["scan"] and dataset.cases["scan"]["label"] is None
    assert os.listdir(output / "slices") and not (output / "slices" / "test_labels.npy").exists()


@pytest.fixture(scope="module")
def uneven_hippocampus(tmp_path_factory):
    """Six real MSD Hippocampus cases, whose in-plane sizes differ, prepared with --export slices and no other flag
    (3 train, 1 val, 2 test cases)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is not in this checkout")
    root = tmp_path_factory.mktemp("uneven")
    raw = hippocampus_subset(root / "raw", SHARED_DATA / "msd_hippocampus")
    output = root / "data"
    assert run(output, "--input", raw, "--export", "slices", "--split", 0.5, 0.17, 0.33) == 0
    return output


def read_slices(output, split):
    index = json.loads((output / "slices" / f"{split}_index.json").read_text())
    images = np.load(output / "slices" / f"{split}_images.npy")
    labels = np.load(output / "slices" / f"{split}_labels.npy")
    return index, images, labels


def test_uneven_slices_are_padded_to_one_planned_size_and_undone_onto_the_source_grid(uneven_hippocampus):
    dataset = check_inverts(uneven_hippocampus)
    shapes = {case_id: dataset.image(case_id).shape[1:3] for case_id in dataset.cases}
    assert len(set(shapes.values())) > 1
    size = plan_slice_size(list(shapes.values()))
    assert size == tuple(np.max(list(shapes.values()), axis=0))  # no outlier: every slice is padded, none cropped
    for split in ("train", "val", "test"):
        index, images, labels = read_slices(uneven_hippocampus, split)
        assert index["size"] == list(size) and index["fit"] == "pad" and images.shape == (len(index["rows"]), *size, 1)
        for case_id, _, top, left, height, width in index["rows"]:
            h, w = shapes[case_id]
            assert (top, left, height, width) == (-((size[0] - h) // 2), -((size[1] - w) // 2), *size)
    index, images, labels = read_slices(uneven_hippocampus, "test")
    for case_id in dataset.split("test"):
        volume_shape = dataset.image(case_id).shape[:3]
        restored = restore_slices(labels, index["rows"], case_id, volume_shape)
        np.testing.assert_array_equal(restored, dataset.label(case_id))
        np.testing.assert_array_equal(
            restore_slices(images, index["rows"], case_id, volume_shape), dataset.image(case_id)
        )
        source = load_case(dataset.spec(case_id))
        np.testing.assert_array_equal(restore_label(restored, dataset.geometry(case_id)), source.label)


@needs_shared
def test_slices_larger_than_the_planned_size_are_cropped_around_the_foreground_or_tiled(uneven_hippocampus):
    dataset = PreparedDataset(uneven_hippocampus)
    assert plan_slice_size([(40, 50)] * 5 + [(100, 30)]) == (40, 50)  # the outlier is cut, not padded to
    case_id = dataset.split("train")[0]
    image, label = np.asarray(dataset.image(case_id)), np.asarray(dataset.label(case_id))
    size = (20, 24)
    assert all(n > s for n, s in zip(label.shape[1:], size, strict=True))
    tiled, cropped = [], 0
    for z in range(label.shape[0]):
        for top, left in slice_windows(label.shape[1:], size, tile=True):
            tiled.append([case_id, z, top, left, *size])
        rows, cols = np.nonzero(label[z])
        if rows.size and np.ptp(rows) < size[0] and np.ptp(cols) < size[1]:
            box = ((rows.min(), rows.max() + 1), (cols.min(), cols.max() + 1))
            ((top, left),) = slice_windows(label.shape[1:], size, box)
            kept = slice_window(label[z], top, left, *size)
            assert (kept > 0).sum() == (label[z] > 0).sum()  # the crop holds the slice's whole foreground
            cropped += 1
    assert cropped > 3
    cut = np.stack([slice_window(image[z], top, left, h, w) for _, z, top, left, h, w in tiled])
    np.testing.assert_array_equal(restore_slices(cut, tiled, case_id, image.shape[:3]), image)
    labels = np.stack([slice_window(label[z], top, left, h, w) for _, z, top, left, h, w in tiled])
    np.testing.assert_array_equal(restore_slices(labels, tiled, case_id, label.shape), label)
    with pytest.raises(ValueError, match="not the index of these rows"):
        restore_slices(labels[:-1], tiled, case_id, label.shape)


@needs_shared
def test_an_uneven_png_folder_exports_slices_that_undo_onto_its_masks(tmp_path):
    written = hippocampus_png(tmp_path / "png", SHARED_DATA / "msd_hippocampus")
    assert len({label.shape[1:] for label in written.values()}) > 1
    output = tmp_path / "out"
    flags = ["--patient-pattern", r"HIP_(\d+)_(\d+)", "--spacing", "original", "--export", "slices"]
    assert run(output, "--input", tmp_path / "png", *flags, "--split", 0.5, 0.25, 0.25) == 0
    dataset = check_inverts(output)
    assert dataset.manifest["label_values"] == [0, 1, 2]
    index, images, labels = read_slices(output, "test")
    (case_id,) = dataset.split("test")
    restored = restore_slices(labels, index["rows"], case_id, dataset.image(case_id).shape[:3])
    mask = restore_label(restored, dataset.geometry(case_id))
    np.testing.assert_array_equal(mask, written[case_id.removeprefix("HIP_")])


def test_data_gen_loads_no_deep_learning_or_other_format_library():
    """What ``import data_gen`` loads is what every data_gen.py process holds in memory: no TensorFlow (hundreds of
    MiB), and the other formats' readers (SimpleITK, h5py) and skimage only when a case needs them."""
    heavy = ("tensorflow", "keras", "torch", "jax", "SimpleITK", "h5py", "skimage.transform")
    code = f"import sys, data_gen; print([m for m in {heavy!r} if m in sys.modules])"
    root = Path(data_gen.__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
