"""Preprocessing: each step by hand-checked values, and prepare_case → restore_label giving back the source label."""

import json

import numpy as np
import pytest
from conftest import SAMPLE, SHARED_DATA

from utils import formats as readers
from utils import geometry, preprocessing
from utils.formats import CaseData
from utils.formats.base import axis_aligned_affine
from utils.geometry import GeometryRecord
from utils.prepare.fingerprint import aggregate_fingerprint, case_fingerprint, sum_of_squares
from utils.preprocessing import (
    PreprocessSettings,
    count_values,
    normalize_image,
    prepare_case,
    resample_label,
    restore_label,
)

RAW = PreprocessSettings(spacing="original", normalize="none")


def volume_ml(label: np.ndarray, spacing, num_classes: int) -> np.ndarray:
    return np.bincount(label.ravel().astype(np.int64), minlength=num_classes)[1:] * float(np.prod(spacing)) / 1000


@pytest.fixture(scope="module")
def sample_case():
    return readers.load_case(readers.discover(SAMPLE).cases[0], {0, 1, 2})


def lps_case() -> CaseData:
    """A case stored LPS-style: array axes (z, y, x) point to (S, P, L), with an anisotropic spacing and an offset."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(6, 9, 11, 2)).astype(np.float32)
    label = np.zeros((6, 9, 11), np.uint8)
    label[1:4, 2:5, 3:9] = 1
    label[4, 6:8, 1:3] = 2
    affine = geometry.affine_from_sitk((0.8, 0.7, 2.5), (10.0, -20.0, 30.0), np.eye(3).ravel())
    return CaseData("lps", image, label, affine, {"kind": "sitk"})


def test_identity_round_trip_on_the_sample(sample_case):
    image, label, record = prepare_case(sample_case, RAW, None, ["MRI"])
    assert image.shape == sample_case.image.shape and record.crop_box == [[0, n] for n in label.shape]
    assert np.array_equal(image, sample_case.image) and np.array_equal(label, sample_case.label)
    assert np.array_equal(restore_label(label, record), sample_case.label)
    assert record.source_affine == sample_case.affine.tolist() and record.spacing == [1.0, 1.0, 1.0]


def test_lps_case_is_reoriented_exactly_and_restored():
    case = lps_case()
    assert geometry.axcodes(case.affine) == ("S", "P", "L")
    image, label, record = prepare_case(case, RAW, None, ["a", "b"])
    assert geometry.axcodes(np.asarray(record.affine)) == ("S", "A", "R")
    assert np.array_equal(image, case.image[:, ::-1, ::-1]) and np.array_equal(label, case.label[:, ::-1, ::-1])
    assert record.source_axcodes == ["S", "P", "L"] and record.spacing == pytest.approx([2.5, 0.7, 0.8])
    assert np.array_equal(restore_label(label, record), case.label)
    world = np.asarray(record.affine) @ [0, 0, 0, 1]  # prepared voxel (0, 0, 0) is source voxel (0, 8, 10)
    assert np.allclose(world, case.affine @ [0, 8, 10, 1])


def test_foreground_crop_with_margin_is_recorded_and_undone():
    case = lps_case()
    settings = PreprocessSettings(spacing="original", normalize="none", crop="foreground", crop_margin=1)
    image, label, record = prepare_case(case, settings, None, ["a", "b"])
    # foreground after flipping y and x: z 1..4, y 1..6 (flipped 2..7), x 2..9 (flipped 1..8), grown by 1
    assert record.crop_box == [[0, 6], [0, 8], [1, 11]] and label.shape == (6, 8, 10)
    assert np.array_equal(restore_label(label, record), case.label)
    assert np.array_equal(volume_ml(label, record.spacing, 3), volume_ml(case.label, case.spacing, 3))


def test_upsampling_round_trip_is_exact(sample_case):
    settings = PreprocessSettings(spacing=[0.5, 0.5, 0.5], normalize="none")
    image, label, record = prepare_case(sample_case, settings, None, ["MRI"])
    assert label.shape == tuple(2 * n for n in sample_case.label.shape) and image.shape[:3] == label.shape
    assert np.allclose(volume_ml(label, record.spacing, 3), volume_ml(sample_case.label, sample_case.spacing, 3))
    assert np.array_equal(restore_label(label, record), sample_case.label)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real test data folder {SHARED_DATA} is not in this checkout")
def test_resampled_liver_keeps_its_volume_within_one_percent():
    source = readers.discover(SHARED_DATA / "sts_layout" / "lab_petct_vox_5.00mm.h5")
    case = readers.load_case(source.cases[1], {0, 1})  # STS_102: 8263 liver voxels at 5 mm
    image, label, record = prepare_case(
        case, PreprocessSettings(spacing=[3.0, 3.0, 3.0], normalize="none"), None, ["CT"]
    )
    assert record.shape == [30, 102, 122] and record.spacing == pytest.approx([3.0, 2.99, 2.992], abs=1e-3)
    source_ml, prepared_ml = volume_ml(case.label, case.spacing, 2), volume_ml(label, record.spacing, 2)
    assert prepared_ml == pytest.approx(source_ml, rel=0.01)
    assert np.array_equal(restore_label(label, record), case.label)


@pytest.mark.parametrize("shape", [(7, 17, 13), (20, 40, 33), (9, 31, 31)])
def test_resampled_labels_keep_each_class_volume(shape):
    label = np.zeros((12, 30, 25), np.uint8)
    label[2:9, 5:20, 4:15] = 1
    label[5:7, 22:27, 18:23] = 2
    label[10, 1, 1] = 3  # one voxel: kept as at least one voxel
    out = resample_label(label, shape)
    scale = np.prod(shape) / label.size
    counts = np.bincount(out.ravel(), minlength=4)
    assert out.shape == shape and out.dtype == label.dtype
    assert counts[1] == round(7 * 15 * 11 * scale) and counts[2] == round(2 * 5 * 5 * scale) and counts[3] >= 1
    nearest = geometry.resize_volume(label, shape, 0)
    assert np.mean(out == nearest) > 0.97  # only boundary voxels move


def test_downsampling_averages_2x2_blocks_and_restores_the_grid():
    rng = np.random.default_rng(2)
    label = (rng.random((3, 8, 10)) > 0.7).astype(np.uint8)
    case = CaseData("d", rng.normal(size=(3, 8, 10, 1)).astype(np.float32), label, axis_aligned_affine([2, 1, 1]))
    settings = PreprocessSettings(spacing="original", normalize="none", downsample=2)
    image, prepared, record = prepare_case(case, settings, None, ["MR"])
    assert image.shape == (3, 4, 5, 1) and record.downsample == 2 and record.spacing == [2.0, 2.0, 2.0]
    blocks = case.image[..., 0].reshape(3, 4, 2, 5, 2).mean(axis=(2, 4))
    assert np.allclose(image[..., 0], blocks, atol=1e-6)
    assert prepared.sum() == round(label.sum() / 4)  # nearest voxels, then the class volume is kept
    assert np.array_equal(restore_label(prepared, record), np.repeat(np.repeat(prepared, 2, axis=1), 2, axis=2))


def test_bspline_and_linear_resampling_differ_but_agree_on_labels(sample_case):
    results = [
        prepare_case(sample_case, PreprocessSettings(spacing=[0.7] * 3, normalize="none", image_order=o), None, ["MRI"])
        for o in (1, 3)
    ]
    assert not np.allclose(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])


def test_probability_predictions_are_restored_by_argmax():
    case = lps_case()
    _, label, record = prepare_case(case, PreprocessSettings(spacing=[2.5, 0.35, 0.4], normalize="none"), None, ["a"])
    probabilities = np.eye(3, dtype=np.float32)[label]
    assert np.array_equal(restore_label(probabilities, record), case.label)


def channel(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(1, 1, -1, 1)


@pytest.mark.parametrize(
    ("settings", "values", "expected"),
    [
        (dict(normalize="zscore"), [1, 2, 3, 4], (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25)),
        (dict(normalize="minmax"), [2, 4, 6], [0.0, 0.5, 1.0]),
        (dict(normalize="minmax", window=[0, 10]), [-5, 5, 20], [0.0, 0.5, 1.0]),
        (dict(normalize="none", window=[-135, 250]), [-1000, 0, 300], [-135, 0, 250]),
        (dict(normalize="none", clip_percentiles=[0, 50]), [0, 1, 2, 3, 4], [0, 1, 2, 2, 2]),
        (dict(normalize="zscore_nonzero"), [0, 2, 4, 0], [0.0, -1.0, 1.0, 0.0]),
        (dict(normalize="zscore_dataset"), [10, 12], [0.0, 1.0]),
        (dict(normalize="ct"), [-2000, 50, 3000], [-1.0, 0.0, 1.0]),
        (dict(normalize="auto"), [-2000, 50, 3000], [-1.0, 0.0, 1.0]),
        (dict(normalize="none", equalize="hist"), [0, 0, 5, 100], [0.5, 0.5, 0.75, 1.0]),
    ],
)
def test_normalisation_values(settings, values, expected):
    stats = {"0": {"dataset_mean": 10.0, "dataset_std": 2.0, "mean": 50.0, "std": 100.0}}
    stats["0"].update(percentile_00_5=-50.0, percentile_99_5=150.0)
    out = normalize_image(channel(values), PreprocessSettings(**settings), {"intensity": stats}, ["CT"])
    assert out.ravel() == pytest.approx(np.asarray(expected, dtype=float), abs=1e-5)


def test_clahe_stays_in_unit_range_and_keeps_order(sample_case):
    out = normalize_image(sample_case.image, PreprocessSettings(equalize="clahe"), None, ["MRI"])
    assert out.min() >= 0 and out.max() <= 1
    flat_in, flat_out = sample_case.image[5, ..., 0].ravel(), out[5, ..., 0].ravel()
    assert np.corrcoef(flat_in, flat_out)[0, 1] > 0.8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(normalize="ct", equalize="hist"), "cannot follow equalize"),
        (dict(downsample=0), "downsample must be a positive integer"),
        (dict(equalize="gamma"), "equalize must be one of"),
        (dict(image_order=2), "image_order must be 0, 1 or 3"),
        (dict(window=[5, 1]), "LOW < HIGH"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessSettings(**kwargs)


def test_dataset_zscore_needs_fingerprint_statistics():
    with pytest.raises(ValueError, match="zscore_dataset needs the dataset's mean and std"):
        normalize_image(channel([1, 2]), PreprocessSettings(normalize="zscore_dataset"), {"intensity": {}}, ["MR"])


def test_fingerprint_values_by_hand():
    first = CaseData(
        "a",
        channel([1, 2, 3, 4]).reshape(1, 2, 2, 1),
        np.array([[[0, 1], [1, 2]]], np.uint8),
        axis_aligned_affine([2, 1, 1]),
    )
    second = CaseData(
        "b", channel([5, 6]).reshape(1, 1, 2, 1), np.array([[[0, 0]]], np.uint8), axis_aligned_affine([4, 1, 1])
    )
    records = [case_fingerprint(first, 3), case_fingerprint(second, 3)]
    assert records[0]["class_voxels"] == [1, 2, 1] and records[0]["channels"][0]["foreground_sample"] == [2, 3, 4]
    fingerprint = aggregate_fingerprint(records, {"0": "MR"}, {"0": "background", "1": "a", "2": "b"})
    assert fingerprint["median_spacing"] == [3.0, 1.0, 1.0] and fingerprint["num_cases"] == 2
    intensity = fingerprint["intensity"]["0"]
    assert intensity["mean"] == pytest.approx(3.0) and intensity["std"] == pytest.approx(np.std([2, 3, 4]))
    assert intensity["dataset_mean"] == pytest.approx(3.5) and intensity["dataset_std"] == pytest.approx(
        np.std(range(1, 7))
    )
    assert intensity["min"] == 1 and intensity["max"] == 6
    assert fingerprint["class_fraction"] == pytest.approx({"0": 0.5, "1": 2 / 6, "2": 1 / 6})
    assert fingerprint["cases_with_class"] == {"0": 2, "1": 1, "2": 1}


@pytest.mark.parametrize("settings", [RAW, PreprocessSettings(spacing=[2.0, 1.5, 0.8], crop="foreground")])
def test_the_geometry_record_round_trips_through_json(sample_case, settings):
    _, _, record = prepare_case(sample_case, settings, None, ["MRI"])
    data = json.loads(json.dumps(record.to_json()))
    assert data == record.to_json() and GeometryRecord.from_json(data) == record
    assert list(data) == [
        "source_shape", "source_affine", "source_spacing", "source_axcodes", "oriented_shape", "crop_box",
        "cropped_shape", "shape", "spacing", "target_spacing", "downsample", "affine",
    ]  # fmt: skip


def test_the_geometry_record_refuses_unknown_missing_and_malformed_keys(sample_case):
    data = prepare_case(sample_case, RAW, None, ["MRI"])[2].to_json()
    with pytest.raises(ValueError, match=r"^geometry record: unknown key 'crop' \(known keys: source_shape, "):
        GeometryRecord.from_json({**data, "crop": [[0, 1]] * 3})
    with pytest.raises(ValueError, match=r"^case 7: missing key 'source_axcodes'$"):
        GeometryRecord.from_json({k: v for k, v in data.items() if k != "source_axcodes"}, "case 7")
    with pytest.raises(ValueError, match=r"key 'crop_box' must be 3x2 integers, got \[\[0, 35\]\]"):
        GeometryRecord.from_json({**data, "crop_box": [[0, 35]]})
    with pytest.raises(ValueError, match=r"key 'affine' must be 4x4 numbers"):
        GeometryRecord.from_json({**data, "affine": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]})
    with pytest.raises(ValueError, match=r"key 'downsample' must be a positive integer, got 0"):
        GeometryRecord.from_json({**data, "downsample": 0})


def blob_label(shape, seed) -> np.ndarray:
    """Three smooth classes of different sizes (what a CT's organs and lesions look like to the label resampler)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for value, level in ((1, 0.49), (2, 0.53), (3, 0.56)):
        label[ndimage.gaussian_filter(rng.random(shape), 2) > level] = value
    return label


@pytest.mark.parametrize(("shape", "new_shape"), [((23, 31, 29), (17, 40, 22)), ((12, 40, 40), (12, 27, 53))])
@pytest.mark.parametrize(("slab_voxels", "interior"), [(64, 0.999), (1000, 0.0), (2**21, 0.5)])
def test_label_volume_correction_slab_by_slab_equals_the_whole_box(
    monkeypatch, shape, new_shape, slab_voxels, interior
):
    label = blob_label(shape, sum(shape))
    monkeypatch.setattr(preprocessing, "_FRACTION_VOXELS", 2**40)  # the whole box in one slab,
    monkeypatch.setattr(preprocessing, "_INTERIOR", 2.0)  # every voxel of a class ranked
    whole = resample_label(label, new_shape)
    monkeypatch.setattr(preprocessing, "_FRACTION_VOXELS", slab_voxels)
    monkeypatch.setattr(preprocessing, "_INTERIOR", interior)  # 0.0: the border holds nothing, every voxel ranked
    assert np.array_equal(resample_label(label, new_shape), whole)
    scale = np.prod(new_shape) / np.prod(shape)
    expected = [max(1, round(n * scale)) for n in np.bincount(label.ravel())[1:]]
    assert np.bincount(whole.ravel(), minlength=4)[1:].tolist() == expected


@pytest.mark.parametrize("block", [1, 5, 2**20])
def test_class_counts_in_blocks_equal_bincount(block):
    label = blob_label((9, 10, 11), 3)
    assert count_values(label, 2, block).tolist() == np.bincount(label.ravel(), minlength=2).tolist()
    assert count_values(label, 6, block).tolist() == np.bincount(label.ravel(), minlength=6).tolist()
    assert count_values(label[:0], 3, block).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "settings",
    [
        dict(normalize="zscore"),
        dict(normalize="ct"),
        dict(normalize="ct", window=[-100, 200]),
        dict(normalize="minmax"),
        dict(normalize="zscore_dataset"),
        dict(normalize="zscore", clip_percentiles=[1, 99]),
        dict(normalize="zscore_nonzero"),
        dict(normalize="none", equalize="hist"),
    ],
)
def test_normalising_in_place_gives_the_same_bytes(settings):
    rng = np.random.default_rng(2)
    image = (rng.normal(size=(5, 6, 7, 2)) * 300).astype(np.float32)
    image[0, 0] = 0
    stats = {"dataset_mean": 10.0, "dataset_std": 2.0, "mean": 50.0, "std": 100.0}
    stats.update(percentile_00_5=-250.0, percentile_99_5=350.0)
    fingerprint = {"intensity": {"0": stats, "1": stats}}
    expected = normalize_image(image, PreprocessSettings(**settings), fingerprint, ["CT", "CT"])
    source = image.copy()
    out = normalize_image(source, PreprocessSettings(**settings), fingerprint, ["CT", "CT"], in_place=True)
    assert out is source and out.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    "settings",
    [PreprocessSettings(spacing=[2.0, 0.5, 1.1], normalize="zscore"), PreprocessSettings(spacing="original")],
)
def test_a_released_integer_case_is_prepared_like_its_float32_copy(settings):
    case = lps_case()  # its axes are flipped in place when released
    case.image = np.rint(case.image * 400).astype(np.int16)
    expected = prepare_case(
        CaseData("lps", case.image.astype(np.float32), case.label.copy(), case.affine), settings, None, ["a", "b"]
    )
    image, label, record = prepare_case(case, settings, None, ["a", "b"], release=True)
    assert case.image is None and case.label is None
    assert image.dtype == np.float32 and image.tobytes() == expected[0].tobytes()
    assert np.array_equal(label, expected[1]) and record == expected[2]


@pytest.mark.parametrize("size", [1, 7, 129, 1000, 100_003])
def test_sum_of_squares_is_numpys_to_the_last_bit(size):
    values = (np.random.default_rng(size).normal(size=(size, 2)) * 1000).astype(np.float32)
    for data in (values[:, 0], values.reshape(-1)):  # one channel of two (strided), and contiguous
        assert sum_of_squares(data, block=128) == np.square(data, dtype=np.float64).sum()


def test_the_fingerprint_of_an_integer_image_equals_its_float32_copy():
    image = np.random.default_rng(4).integers(-1024, 3000, size=(6, 30, 40, 1)).astype(np.int16)
    label = blob_label((6, 30, 40), 5)
    as_float = case_fingerprint(CaseData("a", image.astype(np.float32), label, np.eye(4)), 4)
    assert json.dumps(case_fingerprint(CaseData("a", image, label, np.eye(4)), 4)) == json.dumps(as_float)
