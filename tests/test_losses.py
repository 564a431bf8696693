"""Tests for utils.losses: hand-computed values, agreement with MONAI and PyTorch, saving and loading.

Backend-agnostic: tensors go in with `keras.ops.convert_to_tensor` and come out with `keras.ops.convert_to_numpy`,
so the file also runs under KERAS_BACKEND=torch or jax. The reference tests need the test extras
(requirements-dev.txt: torch, monai) and are skipped without them.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops
from tables import LOSS_OPTIONS

from utils import losses

SHAPES = [(2, 6, 5, 3), (2, 4, 5, 3, 3)]


@pytest.fixture(scope="module")
def monai_losses():
    return pytest.importorskip("monai.losses")


def tensor(array):
    return ops.convert_to_tensor(np.asarray(array, dtype="float32"))


def to_numpy(value) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(value), dtype="float64")


def one_hot(labels, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype="float32")[np.asarray(labels)]


def loss_value(name: str, y_true, y_pred, **options) -> float:
    return float(to_numpy(losses.get_loss(name, **options)(tensor(y_true), tensor(y_pred))))


def binary_pair(truth_foreground, pred_foreground):
    """Two-class one-hot arrays of shape (1, 1, N, 2) from foreground index lists over N = 8 voxels."""
    truth, pred = np.zeros(8, dtype=int), np.zeros(8, dtype=int)
    truth[list(truth_foreground)] = 1
    pred[list(pred_foreground)] = 1
    return one_hot(truth, 2)[None, None], one_hot(pred, 2)[None, None]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_perfect_prediction_scores_zero_even_with_an_absent_class(name, shape):
    labels = np.random.default_rng(0).integers(0, shape[-1] - 1, size=shape[:-1])  # the last class is absent
    y_true = one_hot(labels, shape[-1])
    value = loss_value(name, y_true, y_true, **LOSS_OPTIONS[name])
    assert 0.0 <= value < 1e-5


@pytest.mark.parametrize(
    ("truth", "pred", "expected"),
    [
        ([0, 1], [2, 3], 1.0),  # disjoint
        ([0, 1, 2, 3], [2, 3, 4, 5], 0.5),  # half overlap: 2 * 2 / (4 + 4)
        ([5], [5], 0.0),  # one voxel, found
        ([5], [6], 1.0),  # one voxel, missed
        ([0, 1, 2], [], 1.0),  # empty prediction
        ([], [0, 1], 1.0),  # empty truth
        ([], [], 0.0),  # both empty: smoothing gives 0 loss, not NaN
    ],
)
def test_foreground_dice_and_tversky_by_hand(truth, pred, expected):
    y_true, y_pred = binary_pair(truth, pred)
    for name, options in [("dice", {}), ("tversky", {"alpha": 0.3, "beta": 0.7})]:
        value = loss_value(name, y_true, y_pred, include_background=False, **options)
        assert value == pytest.approx(expected, abs=1e-4), name  # the smoothing terms move it by ~1e-5


@pytest.mark.parametrize(
    ("truth", "pred", "expected"),
    [
        ([0, 1], [2, 3], 1.0),
        ([0, 1, 2, 3], [2, 3, 4, 5], 0.5),
        ([5], [5], 0.0),
        ([0, 1, 2], [], 1.0),
        ([], [], 0.0),
    ],
)
def test_generalized_dice_by_hand(truth, pred, expected):
    y_true, y_pred = binary_pair(truth, pred)
    for w_type in ("square", "simple", "uniform"):
        value = loss_value("gdl", y_true, y_pred, include_background=False, w_type=w_type)
        assert value == pytest.approx(expected, abs=1e-4), w_type


def test_generalized_dice_on_empty_truth_follows_monai():
    y_true, y_pred = binary_pair([], [0, 1])
    # volume weights: no class present, so every weight is 0 and the loss is 0 whatever the prediction
    assert loss_value("gdl", y_true, y_pred, include_background=False) == pytest.approx(0.0, abs=1e-6)
    # uniform weights: plain dice over the classes, so the false positives cost the full loss
    value = loss_value("gdl", y_true, y_pred, include_background=False, w_type="uniform")
    assert value == pytest.approx(1.0, abs=1e-4)


def test_half_overlap_tversky_weighs_false_negatives():
    y_true, y_pred = binary_pair([0, 1, 2, 3], [2, 3])  # TP 2, FP 0, FN 2
    value = loss_value("tversky", y_true, y_pred, include_background=False, alpha=0.3, beta=0.7)
    assert value == pytest.approx(1 - 2 / (2 + 0.7 * 2), abs=1e-5)


def test_dice_with_background_averages_the_two_classes():
    y_true, y_pred = binary_pair([0, 1, 2, 3], [2, 3, 4, 5])  # background is half overlapping too
    assert loss_value("dice", y_true, y_pred) == pytest.approx(0.5, abs=1e-6)
    y_true, y_pred = binary_pair([0, 1], [2, 3])  # foreground dice 0, background 2 * 4 / (6 + 6)
    assert loss_value("dice", y_true, y_pred) == pytest.approx((1.0 + (1 - 8 / 12)) / 2, abs=1e-5)


def test_cross_entropy_and_focal_by_hand():
    y_true = one_hot([[0, 1, 2, 1]], 3)[None]
    uniform = np.full(y_true.shape, 1 / 3, dtype="float32")
    assert loss_value("ce", y_true, uniform) == pytest.approx(math.log(3), rel=1e-6)
    focal = loss_value("focal", y_true, uniform, gamma=2.0)
    assert focal == pytest.approx((2 / 3) ** 2 * math.log(3), rel=1e-6)
    weighted = loss_value("weighted_ce", y_true, uniform, class_weights=[1.0, 5.0, 2.0])
    assert weighted == pytest.approx((1 + 5 + 2 + 5) / 4 * math.log(3), rel=1e-6)
    assert loss_value("focal", y_true, uniform, gamma=0.0) == pytest.approx(math.log(3), rel=1e-6)


@pytest.mark.parametrize(("name", "overlap"), [("gdl_ce", "gdl"), ("dice_ce", "dice")])
def test_dice_ce_losses_weigh_their_cross_entropy_term_by_class(name, overlap):
    y_true = one_hot([[0, 1, 2, 1]], 3)[None]
    uniform = np.full(y_true.shape, 1 / 3, dtype="float32")
    weighted_ce = (1 + 5 + 2 + 5) / 4 * math.log(3)  # the weights of the four voxels' classes, averaged over voxels
    dice_term = loss_value(overlap, y_true, uniform)
    value = loss_value(name, y_true, uniform, class_weights=[1.0, 5.0, 2.0], lambda_ce=0.5)
    assert value == pytest.approx(dice_term + 0.5 * weighted_ce, rel=1e-6)
    assert loss_value(name, y_true, uniform, class_weights=[1.0, 1.0, 1.0]) == pytest.approx(
        loss_value(name, y_true, uniform), rel=1e-6
    )
    restored = keras.losses.deserialize(keras.losses.serialize(losses.get_loss(name, class_weights=[1, 5, 2])))
    assert restored.get_config()["class_weights"] == [1.0, 5.0, 2.0]


def test_single_sigmoid_channel_by_hand():
    y_true = np.array([1, 0, 1, 0], dtype="float32").reshape(1, 2, 2, 1)
    y_pred = np.array([0.8, 0.3, 0.6, 0.1], dtype="float32").reshape(1, 2, 2, 1)
    dice = 1 - 2 * (0.8 + 0.6) / (2 + 1.8)
    assert loss_value("dice", y_true, y_pred) == pytest.approx(dice, abs=1e-5)
    bce = -np.mean(np.log([0.8, 0.7, 0.6, 0.9]))
    assert loss_value("ce", y_true, y_pred) == pytest.approx(bce, rel=1e-5)
    focal = -np.mean(np.array([0.2, 0.3, 0.4, 0.1]) ** 2 * np.log([0.8, 0.7, 0.6, 0.9]))
    assert loss_value("focal", y_true, y_pred) == pytest.approx(focal, rel=1e-5)
    assert loss_value("dice_ce", y_true, y_pred) == pytest.approx(dice + bce, rel=1e-5)


def numpy_focal(y_true, y_pred, gamma, class_weights=None):
    """Softmax focal loss of Lin et al., by hand: mean over voxels of -sum_c w_c (1 - p_c)^g t_c log p_c."""
    weights = np.ones(y_true.shape[-1]) if class_weights is None else np.asarray(class_weights)
    terms = -weights * (1 - y_pred) ** gamma * y_true * np.log(y_pred)
    return terms.sum(-1).reshape(len(y_true), -1).mean(-1)


def random_case(rng, spatial_dims=None, num_classes=None, batch_size=None, logit_scale=1.5):
    """Random logits and a one-hot target (channels first for MONAI) where some classes are absent."""
    spatial_dims = spatial_dims or int(rng.choice([2, 3]))
    num_classes = num_classes or int(rng.integers(2, 6))
    batch_size = batch_size or int(rng.integers(1, 4))
    size_range = (4, 13) if spatial_dims == 2 else (3, 8)
    spatial = tuple(int(size) for size in rng.integers(*size_range, size=spatial_dims))
    present = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
    labels = rng.choice(present, size=(batch_size, *spatial))
    if rng.random() < 0.3:
        labels[0] = present[0]  # the first sample holds only one class
    logits = (rng.normal(size=(batch_size, num_classes, *spatial)) * logit_scale).astype("float32")
    target = np.moveaxis(one_hot(labels, num_classes), -1, 1)
    return logits, target


def channels_last(array):
    return np.moveaxis(np.asarray(array), 1, -1)


SETTINGS = [
    {"include_background": include_background, "batch": batch}
    for include_background in (True, False)
    for batch in (True, False)
]


def test_dice_gdl_dice_ce_tversky_equal_monai_on_random_cases(torch, monai_losses):
    """120 seeded cases, each under the four settings of include_background x batch, four losses each."""
    rng = np.random.default_rng(20240501)
    checked = 0
    for case in range(120):
        logits, target = random_case(rng)
        probabilities = torch.softmax(torch.from_numpy(logits), 1)
        y_true, y_pred = tensor(channels_last(target)), tensor(channels_last(probabilities.numpy()))
        logits_t, target_t = torch.from_numpy(logits), torch.from_numpy(target)
        squared_pred = bool(rng.random() < 0.3)
        w_type = str(rng.choice(["square", "simple", "uniform"]))
        alpha = float(rng.choice([0.3, 0.5, 0.7]))
        lambda_dice, lambda_ce = float(rng.choice([1.0, 0.5])), float(rng.choice([1.0, 2.0]))
        for common in SETTINGS:
            pairs = [
                (
                    monai_losses.DiceLoss(softmax=True, squared_pred=squared_pred, **common),
                    losses.dice_loss(y_true, y_pred, squared_pred=squared_pred, **common),
                ),
                (
                    monai_losses.GeneralizedDiceLoss(softmax=True, w_type=w_type, **common),
                    losses.generalized_dice_loss(y_true, y_pred, w_type=w_type, **common),
                ),
                (
                    monai_losses.DiceCELoss(softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce, **common),
                    losses.dice_ce_loss(y_true, y_pred, lambda_dice=lambda_dice, lambda_ce=lambda_ce, **common),
                ),
                (
                    monai_losses.TverskyLoss(softmax=True, alpha=alpha, beta=1 - alpha, **common),
                    losses.tversky_loss(y_true, y_pred, alpha=alpha, beta=1 - alpha, **common),
                ),
            ]
            for reference, ours in pairs:
                expected = float(reference(logits_t, target_t))
                actual = float(np.mean(to_numpy(ours)))
                assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6), (case, type(reference).__name__, common)
                checked += 1
    assert checked == 120 * 4 * 4


def test_focal_equals_hand_implementation_and_monai_times_channels(torch, monai_losses):
    rng = np.random.default_rng(7)
    for _ in range(20):
        logits, target = random_case(rng)
        gamma = float(rng.choice([0.0, 1.0, 2.0, 3.5]))
        class_weights = list(rng.uniform(0.5, 3.0, size=target.shape[1])) if rng.random() < 0.5 else None
        probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
        y_true, y_pred = channels_last(target), channels_last(probabilities)
        ours = to_numpy(losses.focal_loss(tensor(y_true), tensor(y_pred), gamma, class_weights))
        np.testing.assert_allclose(ours, numpy_focal(y_true, y_pred, gamma, class_weights), rtol=1e-5)
        monai = monai_losses.FocalLoss(use_softmax=True, gamma=gamma)(
            torch.from_numpy(logits), torch.from_numpy(target)
        )
        unweighted = to_numpy(losses.focal_loss(tensor(y_true), tensor(y_pred), gamma)).mean()
        assert unweighted == pytest.approx(float(monai) * target.shape[1], rel=1e-5)


def test_cross_entropy_equals_torch_on_logits(torch):
    rng = np.random.default_rng(3)
    for _ in range(10):
        logits, target = random_case(rng)
        class_weights = rng.uniform(0.5, 5.0, size=target.shape[1]).astype("float32")
        probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
        y_true, y_pred = tensor(channels_last(target)), tensor(channels_last(probabilities))
        for weights in (None, class_weights):
            reference = torch.nn.CrossEntropyLoss(weight=None if weights is None else torch.from_numpy(weights))
            expected = float(reference(torch.from_numpy(logits), torch.from_numpy(target)))
            actual = to_numpy(losses.cross_entropy_loss(y_true, y_pred, weights)).mean()
            assert actual == pytest.approx(expected, rel=1e-5)


def test_single_sigmoid_channel_equals_monai_and_torch(torch, monai_losses):
    rng = np.random.default_rng(11)
    for _ in range(10):
        logits, target = random_case(rng, num_classes=2)
        logits, target = logits[:, :1], target[:, 1:]
        logits_t, target_t = torch.from_numpy(logits), torch.from_numpy(target)
        y_true, y_pred = tensor(channels_last(target)), tensor(channels_last(torch.sigmoid(logits_t).numpy()))
        for batch in (True, False):
            expected = float(monai_losses.DiceLoss(sigmoid=True, batch=batch)(logits_t, target_t))
            assert to_numpy(losses.dice_loss(y_true, y_pred, batch=batch)).mean() == pytest.approx(expected, rel=1e-5)
        bce = float(torch.nn.BCEWithLogitsLoss()(logits_t, target_t))
        assert to_numpy(losses.cross_entropy_loss(y_true, y_pred)).mean() == pytest.approx(bce, rel=1e-5)
        focal = float(monai_losses.FocalLoss(gamma=2.0)(logits_t, target_t))
        assert to_numpy(losses.focal_loss(y_true, y_pred, 2.0)).mean() == pytest.approx(focal, rel=1e-5)


@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_no_nan_when_only_background_is_present(name):
    y_true = one_hot(np.zeros((2, 4, 4), dtype=int), 3)
    y_pred = np.full(y_true.shape, 1 / 3, dtype="float32")
    options = dict(LOSS_OPTIONS[name])
    if name in ("dice", "gdl", "dice_ce", "gdl_ce", "tversky", "dice_focal"):
        options["include_background"] = False
    values = to_numpy(losses.LOSSES[name](**options, reduction="none")(tensor(y_true), tensor(y_pred)))
    assert values.shape == (2,)
    assert np.all(np.isfinite(values))


def test_gradients_are_finite_for_absent_classes():
    y_true = tensor(one_hot(np.zeros((1, 4, 4), dtype=int), 3))
    logits = np.zeros((1, 4, 4, 3), dtype="float32")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(logits)
        with tf.GradientTape() as tape:
            value = losses.GeneralizedDiceCELoss(include_background=False)(y_true, tf.nn.softmax(variable))
        gradient = tape.gradient(value, variable).numpy()
    elif backend == "torch":
        import torch

        variable = torch.tensor(logits, requires_grad=True)
        value = losses.GeneralizedDiceCELoss(include_background=False)(y_true, torch.softmax(variable, -1))
        value.backward()
        gradient = variable.grad.numpy()
    else:
        pytest.skip(f"gradient check written for tensorflow and torch, not {backend}")
    assert np.all(np.isfinite(gradient))


def test_batch_option_repeats_one_value_per_sample():
    rng = np.random.default_rng(1)
    y_true = one_hot(rng.integers(0, 3, size=(3, 5, 5)), 3)
    y_pred = rng.dirichlet(np.ones(3), size=(3, 5, 5)).astype("float32")
    values = to_numpy(losses.dice_loss(tensor(y_true), tensor(y_pred), batch=True))
    assert values.shape == (3,)
    np.testing.assert_allclose(values, values[0])


def test_get_loss_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="valid names: dice, gdl, dice_ce"):
        losses.get_loss("dicey")
    with pytest.raises(ValueError, match="alpha"):
        losses.get_loss("dice", alpha=0.3)
    with pytest.raises(ValueError, match="w_type"):
        losses.get_loss("gdl", w_type="cubic")
    with pytest.raises(ValueError, match="class_weights"):
        losses.get_loss("weighted_ce")
    with pytest.raises(ValueError, match="4 values but y_pred has 3 channels"):
        losses.get_loss("weighted_ce", class_weights=[1, 5, 2, 4])(
            tensor(one_hot([[0, 1]], 3)), tensor(one_hot([[0, 1]], 3))
        )
    with pytest.raises(ValueError, match="one-hot"):
        losses.get_loss("dice")(tensor(np.zeros((1, 4, 4, 1))), tensor(np.zeros((1, 4, 4, 3))))


@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_serialization_round_trip(name):
    loss = losses.get_loss(name, **LOSS_OPTIONS[name])
    config = keras.saving.serialize_keras_object(loss)
    assert config["registered_name"].startswith("medseg>")
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()


def tiny_model(deep_supervision: bool = False):
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="enc1_conv1")(inputs)
    full = keras.layers.Conv2D(3, 1, activation="softmax", name="out_full")(features)
    if not deep_supervision:
        return keras.Model(inputs, full)
    pooled = keras.layers.MaxPooling2D(name="enc2_pool")(features)
    half = keras.layers.Conv2D(3, 1, activation="softmax", name="out_half")(pooled)
    return keras.Model(inputs, [full, half])


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_saved_model_loads_its_loss_without_custom_objects(tmp_path):
    model = tiny_model()
    model.compile(optimizer="adam", loss=losses.get_loss("dice_ce", include_background=False, lambda_ce=0.5))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, losses.DiceCELoss)
    assert restored.loss.get_config() == model.loss.get_config()


def test_deep_supervision_weights_and_target_downsampling():
    assert losses.deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    labels = np.arange(64).reshape(1, 8, 8) % 3
    y_true = tensor(one_hot(labels, 3))
    down = to_numpy(losses.downsample_target(y_true, (4, 4)))
    np.testing.assert_array_equal(down, one_hot(labels[:, ::2, ::2], 3))
    with pytest.raises(ValueError, match="whole multiple"):
        losses.downsample_target(y_true, (3, 3))


def test_deep_supervision_loss_is_the_weighted_sum_of_levels():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, size=(2, 8, 8, 4))
    y_true = one_hot(labels, 3)
    predictions = [rng.dirichlet(np.ones(3), size=(2, 8 // f, 8 // f, 4 // f)).astype("float32") for f in (1, 2, 4)]
    wrapper = losses.DeepSupervisionLoss("dice_ce", loss_kwargs={"include_background": False})
    value = float(to_numpy(wrapper(tensor(y_true), [tensor(p) for p in predictions])))
    base = losses.get_loss("dice_ce", include_background=False)
    levels = [
        float(to_numpy(base(tensor(y_true[:, ::f, ::f, ::f]), tensor(p))))
        for f, p in zip((1, 2, 4), predictions, strict=True)
    ]
    assert value == pytest.approx(4 / 7 * levels[0] + 2 / 7 * levels[1] + 1 / 7 * levels[2], rel=1e-5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(wrapper))
    assert float(to_numpy(restored(tensor(y_true), [tensor(p) for p in predictions]))) == pytest.approx(value)


def test_deep_supervision_in_fit_with_one_full_resolution_target():
    model = tiny_model(deep_supervision=True)
    model.compile(optimizer="adam", **losses.deep_supervision_compile_args("dice_ce", 2, include_background=False))
    rng = np.random.default_rng(2)
    images = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    labels = one_hot(rng.integers(0, 3, size=(4, 8, 8)), 3)
    history = model.fit(images, (labels, labels), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_label_maps_give_the_loss_of_their_one_hot(name):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 3, size=(2, 5, 4, 3)).astype("uint8")
    y_pred = rng.dirichlet(np.ones(3), size=labels.shape).astype("float32")
    from_labels = loss_value(name, labels, y_pred, **LOSS_OPTIONS[name])
    assert from_labels == pytest.approx(loss_value(name, one_hot(labels, 3), y_pred, **LOSS_OPTIONS[name]), rel=1e-6)


def test_label_maps_with_one_sigmoid_channel_and_deep_supervision():
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 2, size=(2, 8, 8)).astype("uint8")
    sigmoid = rng.uniform(size=(2, 8, 8, 1)).astype("float32")
    assert loss_value("dice_ce", labels, sigmoid) == pytest.approx(loss_value("dice_ce", labels[..., None], sigmoid))
    predictions = [rng.dirichlet(np.ones(2), size=(2, 8 // f, 8 // f)).astype("float32") for f in (1, 2)]
    wrapper = losses.DeepSupervisionLoss("dice_ce")
    from_labels = float(to_numpy(wrapper(ops.convert_to_tensor(labels), [tensor(p) for p in predictions])))
    from_one_hot = float(to_numpy(wrapper(tensor(one_hot(labels, 2)), [tensor(p) for p in predictions])))
    assert from_labels == pytest.approx(from_one_hot, rel=1e-6)
    with pytest.raises(ValueError, match="label map"):
        losses.dice_loss(tensor(np.zeros((2, 8))), tensor(predictions[0]))
