"""Tests for utils.metrics: hand-computed cases, the empty-class rule, agreement with MONAI and SimpleITK, and the
streaming Keras dice metrics.

The MONAI tests need the test extras (requirements-dev.txt) and are skipped without them.
"""

import math
import time
import warnings

import keras
import numpy as np
import pytest
from keras import ops
from scipy import ndimage

from utils import metrics
from utils.metrics import compute_case_metrics

NAN = float("nan")


def metric_values(pred, truth, label=1, spacing=None, **kwargs) -> dict:
    pred, truth = np.asarray(pred), np.asarray(truth)
    spacing = spacing or (1.0,) * pred.ndim
    return compute_case_metrics(pred, truth, [label], spacing, **kwargs)[label]


def assert_values(actual: dict, expected: dict):
    for name, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(actual[name]), (name, actual[name])
        else:
            assert actual[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, actual[name])


def blank(shape=(6, 8)):
    return np.zeros(shape, dtype=np.uint8)


def test_perfect_overlap():
    truth = blank()
    truth[1:4, 2:6] = 1
    assert_values(
        metric_values(truth.copy(), truth, spacing=(2.0, 0.5)),
        {
            "dice": 1.0,
            "iou": 1.0,
            "hd95": 0.0,
            "assd": 0.0,
            "nsd": 1.0,
            "precision": 1.0,
            "sensitivity": 1.0,
            "volume_truth_ml": 12 * 2.0 * 0.5 / 1000,
            "volume_pred_ml": 12 * 2.0 * 0.5 / 1000,
        },
    )


def test_disjoint_single_voxels_at_a_known_distance():
    truth, pred = blank(), blank()
    truth[0, 0] = 1
    pred[0, 3] = 1  # 3 columns of 2 mm apart
    assert_values(
        metric_values(pred, truth, spacing=(1.0, 2.0)),
        {"dice": 0.0, "iou": 0.0, "hd95": 6.0, "assd": 6.0, "nsd": 0.0, "precision": 0.0, "sensitivity": 0.0},
    )
    assert metric_values(pred, truth, spacing=(1.0, 2.0), nsd_tolerance=6.0)["nsd"] == 1.0


def test_half_overlap():
    truth, pred = blank(), blank()
    truth[1:3, 0:4] = 1  # 8 voxels
    pred[1:3, 2:6] = 1  # 8 voxels, 4 shared; every voxel is on the surface, at 2, 1, 0, 0 mm from the other
    assert_values(
        metric_values(pred, truth),
        {"dice": 0.5, "iou": 1 / 3, "precision": 0.5, "sensitivity": 0.5, "hd95": 2.0, "assd": 0.75},
    )


def test_one_voxel_found():
    truth = np.zeros((3, 4, 5), dtype=np.uint8)
    truth[1, 2, 3] = 2
    values = metric_values(truth.copy(), truth, label=2, spacing=(3.0, 0.5, 0.5))
    assert_values(values, {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "volume_truth_ml": 0.75 / 1000})


def test_empty_truth():
    pred = blank()
    pred[2, 2] = 1
    assert_values(
        metric_values(pred, blank()),
        {
            "dice": 0.0,
            "iou": 0.0,
            "precision": 0.0,
            "sensitivity": NAN,
            "hd95": NAN,
            "assd": NAN,
            "nsd": 0.0,
            "volume_truth_ml": 0.0,
            "volume_pred_ml": 0.001,
        },
    )


def test_empty_prediction():
    truth = blank()
    truth[2, 2:4] = 1
    assert_values(
        metric_values(blank(), truth),
        {
            "dice": 0.0,
            "iou": 0.0,
            "precision": NAN,
            "sensitivity": 0.0,
            "hd95": NAN,
            "assd": NAN,
            "nsd": 0.0,
            "volume_truth_ml": 0.002,
            "volume_pred_ml": 0.0,
        },
    )


def test_both_empty_is_nan_except_volumes():
    other = blank()
    other[0, 0] = 2  # another class is present, the scored one is not
    values = metric_values(other, other, label=1)
    assert all(math.isnan(values[name]) for name in ("dice", "iou", "hd95", "assd", "nsd", "precision", "sensitivity"))
    assert values["volume_truth_ml"] == 0.0 and values["volume_pred_ml"] == 0.0


def test_regions_are_unions_of_labels_and_metrics_can_be_chosen():
    truth, pred = blank(), blank()
    truth[1, 0:4] = [1, 2, 4, 4]
    pred[1, 0:4] = [2, 1, 4, 0]
    result = compute_case_metrics(
        pred, truth, [1, 2, 4], (1.0, 1.0), metrics=("dice", "iou"), regions={"whole_tumour": [1, 2, 4]}
    )
    assert set(result) == {1, 2, 4, "whole_tumour"}
    assert set(result["whole_tumour"]) == {"dice", "iou"}
    assert result[1]["dice"] == 0.0 and result[4]["dice"] == pytest.approx(2 / 3)
    assert result["whole_tumour"]["dice"] == pytest.approx(2 * 3 / 7)


def test_helpers():
    assert math.isnan(metrics.dice_score(blank(), blank()))
    first, second = blank(), blank()
    first[0, :4], second[0, 2:6] = 1, 1
    assert metrics.dice_score(first, second) == 0.5
    assert metrics.iou_score(first, second) == pytest.approx(1 / 3)
    to_second, to_first = metrics.surface_distances(first, second, (1.0, 1.0))
    assert sorted(to_second) == [0, 0, 1, 2] and sorted(to_first) == [0, 0, 1, 2]


def test_finite_mean_leaves_out_what_was_not_scored():
    assert metrics.finite_mean([0.5, NAN, None, 1.0]) == 0.75
    assert math.isnan(metrics.finite_mean([NAN, None])) and math.isnan(metrics.finite_mean([]))


def test_foreground_dice_of_a_case_leaves_out_classes_empty_in_both():
    """Validation during training: class 2 is in neither map (NaN, not in the mean), class 3 only predicted (0)."""
    truth, pred = blank(), blank()
    truth[0, :4], pred[0, 2:6], pred[5, 7] = 1, 1, 3
    mean, per_class = metrics.mean_foreground_dice(pred, truth, 4)
    assert per_class[0] == metrics.dice_score(pred == 1, truth == 1) == 0.5
    assert math.isnan(per_class[1]) and per_class[2] == 0.0 and mean == 0.25
    assert math.isnan(metrics.mean_foreground_dice(blank(), blank(), 3)[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pred": np.zeros((4, 4)), "truth": np.zeros((4, 5))}, "must match"),
        ({"spacing": (1.0,)}, "spacing must hold 2"),
        ({"spacing": (1.0, 0.0)}, "positive"),
        ({"metrics": ("dice", "hausdorff")}, "hausdorff"),
        ({"nsd_tolerance": 0.0}, "nsd_tolerance"),
    ],
)
def test_bad_input_is_rejected(kwargs, message):
    arguments = {"pred": blank((4, 4)), "truth": blank((4, 4)), "labels": [1], "spacing": (1.0, 1.0)}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_case_metrics(**arguments)


def test_large_ct_with_a_small_tumour_is_fast_and_cropping_changes_nothing():
    truth = np.zeros((300, 512, 512), dtype=np.uint8)
    truth[140:152, 300:318, 200:215] = 1
    truth[144:148, 305:310, 205:209] = 2
    pred = np.zeros_like(truth)
    pred[141:153, 302:319, 199:214] = 1
    pred[145:149, 306:312, 205:208] = 2
    spacing = (2.5, 0.7, 0.7)
    start = time.perf_counter()
    full = compute_case_metrics(pred, truth, [1, 2], spacing)
    elapsed = time.perf_counter() - start
    window = (slice(130, 160), slice(290, 330), slice(190, 225))
    cropped = compute_case_metrics(pred[window], truth[window], [1, 2], spacing)
    for label in (1, 2):
        for name, value in cropped[label].items():
            assert full[label][name] == pytest.approx(value, rel=1e-12), (label, name)
    assert elapsed < 10.0  # about 0.3 s on one core; the whole-image distance transforms would take minutes


def random_label_maps(rng):
    """A smooth random truth with 1 to 4 foreground classes and a perturbed prediction; classes sometimes empty."""
    ndim = int(rng.choice([2, 3]))
    shape = tuple(int(size) for size in (rng.integers(20, 48, size=2) if ndim == 2 else rng.integers(8, 20, size=3)))
    num_labels = int(rng.integers(1, 5))
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
    noisy = field + ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5) * rng.uniform(0.0, 0.6)
    cuts = np.quantile(field, np.linspace(0.45, 0.95, num_labels))
    truth = np.digitize(field, cuts).astype(np.uint8)
    pred = np.digitize(noisy, cuts).astype(np.uint8)
    for label_map in (truth, pred):
        if rng.random() < 0.2:
            label_map[label_map == rng.integers(1, num_labels + 1)] = 0
    spacing = tuple(float(value) for value in rng.uniform(0.4, 3.0, size=ndim))
    return pred, truth, list(range(1, num_labels + 1)), spacing


def one_hot_batch(torch, label_map, num_classes):
    return torch.from_numpy(np.moveaxis(np.eye(num_classes, dtype=np.float32)[label_map], -1, 0)[None])


def test_surface_metrics_equal_monai_on_random_cases(torch):
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(31)
    compared = {"both": 0, "one_empty": 0}
    for case in range(100):
        pred, truth, labels, spacing = random_label_maps(rng)
        tolerance = float(rng.choice([0.5, 1.0, 2.0, 3.7]))
        ours = compute_case_metrics(pred, truth, labels, spacing, nsd_tolerance=tolerance)
        y_pred = one_hot_batch(torch, pred, len(labels) + 1)
        y_true = one_hot_batch(torch, truth, len(labels) + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd95 = monai_metrics.compute_hausdorff_distance(y_pred, y_true, percentile=95, spacing=spacing)[0]
            assd = monai_metrics.compute_average_surface_distance(y_pred, y_true, symmetric=True, spacing=spacing)[0]
            nsd = monai_metrics.compute_surface_dice(
                y_pred, y_true, class_thresholds=[tolerance] * len(labels), spacing=spacing
            )[0]
        for index, label in enumerate(labels):
            in_pred, in_truth = bool((pred == label).any()), bool((truth == label).any())
            values = ours[label]
            if in_pred and in_truth:
                compared["both"] += 1
                assert values["hd95"] == pytest.approx(float(hd95[index]), rel=1e-3, abs=1e-3), (case, label)
                assert values["assd"] == pytest.approx(float(assd[index]), rel=1e-3, abs=1e-3), (case, label)
                assert values["nsd"] == pytest.approx(float(nsd[index]), rel=1e-3, abs=1e-3), (case, label)
            elif in_pred or in_truth:  # our documented departure: NaN where MONAI gives inf (hd95: inf or NaN)
                compared["one_empty"] += 1
                assert not math.isfinite(float(hd95[index])) and math.isnan(values["hd95"])
                assert math.isinf(float(assd[index])) and math.isnan(values["assd"])
                assert values["nsd"] == float(nsd[index]) == 0.0
    assert compared["both"] >= 150 and compared["one_empty"] >= 5


def test_dice_and_iou_equal_simpleitk_on_random_cases():
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(32)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    for _ in range(100):
        pred, truth, labels, spacing = random_label_maps(rng)
        ours = compute_case_metrics(pred, truth, labels, spacing, metrics=("dice", "iou"))
        overlap.Execute(sitk.GetImageFromArray(truth), sitk.GetImageFromArray(pred))
        for label in labels:
            if not ((pred == label).any() or (truth == label).any()):
                assert math.isnan(ours[label]["dice"]) and math.isnan(ours[label]["iou"])
                continue
            assert ours[label]["dice"] == pytest.approx(overlap.GetDiceCoefficient(label), rel=1e-9, abs=1e-12)
            assert ours[label]["iou"] == pytest.approx(overlap.GetJaccardCoefficient(label), rel=1e-9, abs=1e-12)


def numpy_epoch_dice(truth_batches, pred_batches, num_classes):
    """Dice per class from counts summed over all batches (argmax against argmax)."""
    intersection = np.zeros(num_classes)
    total = np.zeros(num_classes)
    for y_true, y_pred in zip(truth_batches, pred_batches, strict=True):
        truth = np.eye(num_classes)[y_true.argmax(-1)]
        pred = np.eye(num_classes)[y_pred.argmax(-1)]
        axes = tuple(range(truth.ndim - 1))
        intersection += (truth * pred).sum(axes)
        total += truth.sum(axes) + pred.sum(axes)
    with np.errstate(invalid="ignore"):
        return 2 * intersection / total


def test_streaming_dice_accumulates_counts_over_batches():
    rng = np.random.default_rng(4)
    num_classes = 4
    truth_batches, pred_batches = [], []
    fg_dice, class_dice = metrics.MeanForegroundDice(num_classes), metrics.ClassDice(2, num_classes)
    for _ in range(3):
        labels = rng.choice(3, size=(2, 5, 6, 4))  # class 3 never appears in the truth...
        y_true = np.eye(num_classes, dtype="float32")[labels]
        y_pred = rng.dirichlet(np.ones(num_classes) * 0.5, size=labels.shape).astype("float32")
        y_pred[..., 3] = 0.0  # ...nor in the prediction, so it is left out of the mean
        truth_batches.append(y_true)
        pred_batches.append(y_pred)
        for metric in (fg_dice, class_dice):
            metric.update_state(ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred))
    expected = numpy_epoch_dice(truth_batches, pred_batches, num_classes)
    assert math.isnan(expected[3])
    assert float(ops.convert_to_numpy(fg_dice.result())) == pytest.approx(np.mean(expected[1:3]), rel=1e-6)
    assert float(ops.convert_to_numpy(class_dice.result())) == pytest.approx(expected[2], rel=1e-6)
    assert class_dice.name == "dice_2" and fg_dice.name == "fg_dice"
    fg_dice.reset_state()
    assert math.isnan(float(ops.convert_to_numpy(fg_dice.result())))


def test_streaming_dice_with_one_sigmoid_channel():
    y_true = np.array([1, 1, 0, 0], dtype="float32").reshape(1, 2, 2, 1)
    y_pred = np.array([0.9, 0.2, 0.7, 0.1], dtype="float32").reshape(1, 2, 2, 1)
    metric = metrics.MeanForegroundDice(num_classes=1)
    metric.update_state(ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred))
    assert float(ops.convert_to_numpy(metric.result())) == pytest.approx(2 * 1 / (2 + 2))


def test_streaming_dice_in_fit_history_and_saved_model(tmp_path):
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Conv2D(3, 3, padding="same", activation="softmax", name="out")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="adam",
        loss="categorical_crossentropy",
        metrics=[metrics.MeanForegroundDice(3), metrics.ClassDice(1, 3), metrics.ClassDice(2, 3)],
    )
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    labels = np.eye(3, dtype="float32")[rng.integers(0, 3, size=(4, 8, 8))]
    history = model.fit(images, labels, batch_size=2, epochs=1, verbose=0, validation_data=(images, labels))
    assert {"fg_dice", "dice_1", "dice_2", "val_fg_dice"} <= set(history.history)
    scores = model.evaluate(images, labels, batch_size=2, verbose=0, return_dict=True)
    expected = numpy_epoch_dice([labels], [model.predict(images, verbose=0)], 3)
    assert scores["fg_dice"] == pytest.approx(np.mean(expected[1:]), rel=1e-5)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.evaluate(images, labels, verbose=0, return_dict=True)["fg_dice"] == pytest.approx(
        scores["fg_dice"], rel=1e-5
    )


def test_streaming_dice_takes_label_maps():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=(2, 6, 5, 4)).astype("uint8")
    y_pred = rng.dirichlet(np.ones(3), size=labels.shape).astype("float32")
    from_labels, from_one_hot = metrics.MeanForegroundDice(3), metrics.MeanForegroundDice(3)
    from_labels.update_state(ops.convert_to_tensor(labels), ops.convert_to_tensor(y_pred))
    from_one_hot.update_state(ops.convert_to_tensor(np.eye(3, dtype="float32")[labels]), ops.convert_to_tensor(y_pred))
    expected = np.mean(numpy_epoch_dice([np.eye(3)[labels]], [y_pred], 3)[1:])
    assert float(ops.convert_to_numpy(from_labels.result())) == pytest.approx(expected, rel=1e-6)
    assert float(ops.convert_to_numpy(from_one_hot.result())) == pytest.approx(expected, rel=1e-6)


# truth [0, 1, 1, 2, 2] against argmax [1, 1, 0, 2, 0]: class 1 TP 1, |P| 2, |T| 2; class 2 TP 1, |P| 1, |T| 2.
HAND_TRUTH, HAND_PRED = np.array([0, 1, 1, 2, 2]), np.array([1, 1, 0, 2, 0])
HAND_SCORES = {  # per class 1, 2
    "dice": (1 / 2, 2 / 3),
    "iou": (1 / 3, 1 / 2),
    "fscore": (1 / 2, 2 / 3),  # F1
    "f2": (5 / (4 * 2 + 2), 5 / (4 * 2 + 1)),  # (1 + 4) TP / (4 |T| + |P|)
}


def soft(labels, num_classes=3):
    """Probabilities whose argmax is ``labels``."""
    return (0.1 + 0.7 * np.eye(num_classes)[labels]).astype("float32")


def test_streaming_iou_and_fscore_by_hand_over_two_batches():
    metric_list = metrics.training_metrics(3, ["iou", "fscore"]) + [metrics.MeanForegroundFScore(3, beta=2.0)]
    assert [m.name for m in metric_list] == ["fg_dice", "fg_iou", "fg_fscore", "fg_fscore"]
    for part in (slice(0, 3), slice(3, 5)):  # counts add up across the batches of an epoch
        truth = HAND_TRUTH[None, None, part].astype("uint8")  # a label map (B, H, W), as the samplers yield
        for metric in metric_list:
            metric.update_state(ops.convert_to_tensor(truth), ops.convert_to_tensor(soft(HAND_PRED[None, None, part])))
    results = [float(ops.convert_to_numpy(m.result())) for m in metric_list]
    expected = [np.mean(HAND_SCORES[name]) for name in ("dice", "iou", "fscore", "f2")]
    assert results == pytest.approx(expected, rel=1e-6)
    counts = metrics.confusion_counts(HAND_PRED, HAND_TRUTH, 3)
    assert counts[:, 1:].tolist() == [[1, 1], [1, 0], [1, 1]]  # TP, FP, FN of classes 1 and 2
    for name, beta in (("dice", 1.0), ("iou", 1.0), ("fscore", 1.0), ("fscore", 2.0)):
        reference = HAND_SCORES["f2" if beta == 2.0 else name]
        assert metrics.score_from_counts(name, counts[:, 1:], beta=beta) == pytest.approx(reference, rel=1e-12)


def test_streaming_iou_and_fscore_follow_the_empty_class_rule():
    iou, fscore = metrics.MeanForegroundIoU(4), metrics.MeanForegroundFScore(4)
    truth = np.array([[[0, 1, 1, 0]]], dtype="uint8")  # class 2 in neither map, class 3 predicted only
    pred = soft(np.array([[[3, 1, 0, 0]]]), 4)
    for metric in (iou, fscore):
        metric.update_state(ops.convert_to_tensor(truth), ops.convert_to_tensor(pred))
    # class 1: IoU 1/2, F1 2/3; class 2 left out; class 3: 0
    assert float(ops.convert_to_numpy(iou.result())) == pytest.approx((1 / 2 + 0) / 2, rel=1e-6)
    assert float(ops.convert_to_numpy(fscore.result())) == pytest.approx((2 / 3 + 0) / 2, rel=1e-6)
    counts = metrics.confusion_counts(np.array([3, 1, 0, 0]), truth.ravel(), 4)
    assert np.isnan(metrics.score_from_counts("iou", counts)[2])
    iou.reset_state()
    assert math.isnan(float(ops.convert_to_numpy(iou.result())))
    sigmoid = metrics.MeanForegroundIoU(1)  # one sigmoid channel, thresholded at 0.5
    sigmoid.update_state(
        ops.convert_to_tensor(np.array([1, 1, 0, 0], "float32").reshape(1, 2, 2, 1)),
        ops.convert_to_tensor(np.array([0.9, 0.2, 0.7, 0.1], "float32").reshape(1, 2, 2, 1)),
    )
    assert float(ops.convert_to_numpy(sigmoid.result())) == pytest.approx(1 / 3)


def test_training_metrics_refuse_unknown_names_and_bad_beta():
    with pytest.raises(ValueError, match=r"Unknown training metric\(s\) \['hd95'\]; valid names: iou, fscore"):
        metrics.training_metrics(3, ["hd95"])
    with pytest.raises(ValueError, match="beta must be > 0"):
        metrics.MeanForegroundFScore(3, beta=0.0)
    with pytest.raises(ValueError, match="Unknown overlap score 'hd95'"):
        metrics.score_from_counts("hd95", np.zeros((3, 2)))
    from utils.settings import TRAINING_METRIC_NAMES

    assert tuple(metrics.TRAINING_METRICS) == TRAINING_METRIC_NAMES


def test_iou_and_fscore_in_fit_history_and_saved_model(tmp_path):
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Conv2D(3, 3, padding="same", activation="softmax")(inputs)
    model = keras.Model(inputs, outputs)
    chosen = [*metrics.training_metrics(3, ["iou", "fscore"]), metrics.MeanForegroundFScore(3, beta=2.0, name="f2")]
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=chosen)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 3, size=(4, 8, 8)).astype("uint8")
    history = model.fit(images, labels, batch_size=2, epochs=1, verbose=0)
    assert {"fg_dice", "fg_iou", "fg_fscore", "f2"} <= set(history.history)
    scores = model.evaluate(images, labels, batch_size=2, verbose=0, return_dict=True)
    counts = metrics.confusion_counts(np.argmax(model.predict(images, verbose=0), -1), labels, 3)[:, 1:]
    assert scores["fg_iou"] == pytest.approx(np.nanmean(metrics.score_from_counts("iou", counts)), rel=1e-5)
    assert scores["f2"] == pytest.approx(np.nanmean(metrics.score_from_counts("fscore", counts, 2.0)), rel=1e-5)
    assert scores["fg_fscore"] == pytest.approx(scores["fg_dice"], rel=1e-6)
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    again = restored.evaluate(images, labels, batch_size=2, verbose=0, return_dict=True)
    assert {k: again[k] for k in ("fg_iou", "f2")} == pytest.approx({k: scores[k] for k in ("fg_iou", "f2")})


def test_confusion_counts_and_region_masks_agree_when_counted_in_chunks(monkeypatch):
    """Counting a chunk of voxels at a time (bounded memory on large volumes) gives the counts of one pass, and region
    masks built by comparisons give numpy's ``isin`` scores."""
    rng = np.random.default_rng(8)
    pred, truth = rng.integers(0, 4, size=(2, 7, 9, 11), dtype=np.uint8)
    whole = metrics.confusion_counts(pred, truth, 4)
    monkeypatch.setattr(metrics, "_COUNT_CHUNK", 50)  # 693 voxels: 14 chunks, the last one partial
    np.testing.assert_array_equal(metrics.confusion_counts(pred, truth, 4), whole)
    tp = [np.sum((pred == k) & (truth == k)) for k in range(4)]
    assert whole[0].tolist() == tp and whole[1].tolist() == [np.sum(pred == k) - tp[k] for k in range(4)]
    scores = metrics.compute_case_metrics(pred, truth, [1], (1.0, 1.0, 1.0), ("dice",), regions={"some": [1, 3]})
    p, t = np.isin(pred, [1, 3]), np.isin(truth, [1, 3])
    assert scores["some"]["dice"] == pytest.approx(2 * np.sum(p & t) / (p.sum() + t.sum()))
