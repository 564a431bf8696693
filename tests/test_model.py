"""Tests of model.py: every architecture in 2D and 3D on whichever backend KERAS_BACKEND selects.

Sizes are tiny (16 × 16 slices, 16³ patches, 4 filters) so that the file runs in well under a minute on 2 CPU cores.
"""

import keras
import numpy as np
import pytest
from tables import SMALL_MODELS, SPATIAL

import model

BASE_NAMES = ["unet", "resunet", "attention_unet", "dilated", "fcn", "twopath"]


# Adam learning rates for the gradient-step tests; the two-pathway net has no normalisation and needs a small one.
LEARNING_RATE = {"twopath": 5e-4}


def _tiny(name, **overrides):
    """The tiny options of ``name`` (e.g. "unet3d"), with ``overrides``."""
    return {**SMALL_MODELS[name[:-2]], **overrides}


def _batch(spatial, channels, num_classes, batch_size=2, seed=0):
    """A learnable batch: the label of a voxel is the bin of its first channel's value (one-hot, float32)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch_size, *spatial, channels)).astype("float32")
    edges = np.quantile(images[..., 0], np.linspace(0, 1, num_classes + 1)[1:-1])
    labels = np.digitize(images[..., 0], edges)
    return images, np.eye(num_classes, dtype="float32")[labels]


def _predict(net, images):
    outputs = net(images, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [keras.ops.convert_to_numpy(o) for o in outputs]


def _train(net, images, targets, steps=6, loss="categorical_crossentropy", loss_weights=None):
    """Runs ``steps`` gradient steps on one batch (eagerly: tracing costs more than it saves here); returns the
    first and the last training loss."""
    learning_rate = LEARNING_RATE.get(net.name[:-2], 1e-2)
    optimizer = keras.optimizers.Adam(learning_rate)
    net.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, run_eagerly=True)
    losses = [float(np.ravel(net.train_on_batch(images, targets))[0]) for _ in range(steps)]
    assert np.all(np.isfinite(losses)), losses
    return losses[0], losses[-1]


def _cases():
    for name in model.MODELS:
        for channels in (1, 4):
            for num_classes in (2, 4):
                yield pytest.param(name, channels, num_classes, id=f"{name}-c{channels}-k{num_classes}")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.mark.parametrize("name, channels, num_classes", list(_cases()))
def test_shape_training_and_save_load(name, channels, num_classes, tmp_path):
    ndim = int(name[-2])
    spatial = SPATIAL[ndim]
    net = model.build_model(name, (*spatial, channels), num_classes, **_tiny(name))
    assert net.name == name
    assert tuple(net.output.shape) == (None, *spatial, num_classes)
    assert net.output.dtype == "float32"

    images, targets = _batch(spatial, channels, num_classes)
    first, last = _train(net, images, targets)
    assert last < first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f})"

    probabilities = _predict(net, images)[0]
    assert probabilities.shape == (2, *spatial, num_classes)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)

    path = tmp_path / f"{name}.keras"
    net.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(_predict(loaded, images)[0], probabilities, atol=1e-5)


OPTION_CASES = [
    ("unet2d", {"stem_stride": 2}),
    ("unet3d", {"stem_stride": 2, "norm": "instance", "upsample": "interp"}),
    ("unet3d", {"stem_stride": 2, "norm": "instance", "full_res_skip": 4}),
    ("unet2d", {"residual": True, "norm": "group", "upsample": "interp", "activation": "relu"}),
    ("unet3d", {"residual": True, "downsample": "strided", "norm": "none", "dropout": 0.1}),
    ("resunet3d", {"stem_stride": 2, "norm": "instance"}),
    ("attention_unet2d", {"residual": True, "stem_stride": 2, "upsample": "interp"}),
    ("dilated3d", {"norm": "group", "context_filters": 8, "dropout": 0.1}),
    ("fcn2d", {"depth": 4, "head_filters": 8}),
    ("twopath2d", {"cascade": True, "pieces": 3}),
]


@pytest.mark.parametrize("name, options", OPTION_CASES, ids=[f"{n}-{'-'.join(o)}" for n, o in OPTION_CASES])
def test_options_train_and_reload(name, options, tmp_path):
    spatial = SPATIAL[int(name[-2])]
    net = model.build_model(name, (*spatial, 2), 3, **_tiny(name, **options))
    images, targets = _batch(spatial, 2, 3)
    first, last = _train(net, images, targets)
    assert last < first
    net.save(tmp_path / "net.keras")
    loaded = keras.saving.load_model(tmp_path / "net.keras")
    np.testing.assert_allclose(_predict(loaded, images)[0], _predict(net, images)[0], atol=1e-5)


@pytest.mark.parametrize("name", ["unet2d", "resunet3d", "attention_unet2d", "fcn3d", "twopath2d"])
def test_sigmoid_for_one_class(name):
    spatial = SPATIAL[int(name[-2])]
    net = model.build_model(name, (*spatial, 1), 1, output_activation="sigmoid", **_tiny(name))
    assert tuple(net.output.shape) == (None, *spatial, 1)
    images, targets = _batch(spatial, 1, 2)
    first, last = _train(net, images, targets[..., 1:], steps=6, loss="binary_crossentropy")
    assert last < first


@pytest.mark.parametrize(
    "name, stem_stride, expected_scales",
    [
        ("unet2d", 1, [1, 2, 4]),
        ("unet3d", 2, [1, 2, 4, 8]),
        ("resunet2d", 1, [1, 2, 4]),
        ("attention_unet3d", 1, [1, 2, 4]),
    ],
)
def test_deep_supervision_outputs(name, stem_stride, expected_scales, tmp_path):
    ndim = int(name[-2])
    spatial = SPATIAL[ndim]
    net = model.build_model(
        name, (*spatial, 1), 3, **_tiny(name, depth=4, deep_supervision=True, stem_stride=stem_stride)
    )
    assert net.output_names == ["out"] + [f"ds{k.bit_length() - 1}_out" for k in expected_scales[1:]]
    shapes = [tuple(o.shape) for o in net.outputs]
    assert shapes == [(None, *(s // k for s in spatial), 3) for k in expected_scales]
    assert all(o.dtype == "float32" for o in net.outputs)

    images, targets = _batch(spatial, 1, 3)
    pyramid = [targets[(slice(None), *[slice(None, None, k)] * ndim)] for k in expected_scales]
    weights = [0.5**k for k in range(len(net.outputs))]
    first, last = _train(net, images, pyramid, loss=["categorical_crossentropy"] * len(pyramid), loss_weights=weights)
    assert last < first
    net.save(tmp_path / "ds.keras")
    loaded = keras.saving.load_model(tmp_path / "ds.keras")
    for before, after in zip(_predict(net, images), _predict(loaded, images), strict=True):
        np.testing.assert_allclose(after, before, atol=1e-5)


BAD_SIZES = [
    ("unet2d", (17, 16, 1), {}, "17"),
    ("unet3d", (16, 16, 12, 1), {"depth": 4}, "12"),
    ("unet2d", (16, 18, 1), {"stem_stride": 2}, "18"),
    ("resunet3d", (16, 20, 16, 1), {"depth": 4}, "20"),
    ("attention_unet2d", (20, 16, 1), {"depth": 4}, "20"),
    ("attention_unet3d", (16, 16, 15, 1), {}, "15"),
    ("fcn2d", (48, 48, 1), {"depth": None}, "48"),
    ("fcn3d", (16, 16, 20, 1), {"depth": None}, "20"),
    ("twopath2d", (30, 40, 1), {"padding": "valid"}, "30"),
]


@pytest.mark.parametrize("name, shape, options, bad", BAD_SIZES, ids=[f"{c[0]}-{c[3]}" for c in BAD_SIZES])
def test_bad_input_size_raises(name, shape, options, bad):
    with pytest.raises(ValueError, match=bad):
        model.build_model(name, shape, 2, **_tiny(name, **options))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: model.build_model("vnet3d", (16, 16, 16, 1), 2), "unknown model"),
        (lambda: model.build_model("unet3d", (16, 16, 1), 2), "3D"),
        (lambda: model.build_model("twopath2d", (16, 16, 16, 1), 2), "2D"),
        (lambda: model.twopath((40, 40, 40, 1), 2), "2D network"),
        (lambda: model.build_model("unet2d", (16, 16, 1), 2, depht=3), "depht"),
        (lambda: model.build_model("unet2d", (16, 16, 1), 1), "sigmoid"),
        (lambda: model.build_model("unet2d", (16, 16, 1), 2, norm="layer"), "layer"),
        (lambda: model.build_model("unet2d", (16, 16, 1), 2, upsample="pixelshuffle"), "pixelshuffle"),
        (lambda: model.build_model("unet2d", (16, 16, 1), 2, stem_stride=4), "stem_stride"),
        (lambda: model.build_model("unet2d", (16, 16, 1), 2, stem_stride=2, full_res_skip=-1), "full_res_skip"),
        (lambda: model.build_model("unet2d", (16, 16), 2), "channels last"),
        (lambda: model.build_model("unet2d", (16, 16, None), 2), "channel count"),
        (lambda: model.build_model("dilated2d", (16, 16, 1), 2, dilations=(1, 0)), "dilations"),
        (lambda: model.build_model("fcn2d", (16, 16, 1), 2, depth=2), "depth"),
        (lambda: model.build_model("unet2d", (16, 16, 1), 2, depth=2, deep_supervision=True), "deep_supervision"),
        (lambda: model.build_model("unet2d", (16, 16, 1), 2, dropout=1.0), "dropout"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name", list(model.MODELS))
def test_fully_convolutional_with_unknown_spatial_size(name):
    ndim = int(name[-2])
    spatial = (16, 24) if ndim == 2 else (16, 8, 24)
    net = model.build_model(name, (*(None,) * ndim, 2), 3, **_tiny(name))
    images = np.zeros((1, *spatial, 2), dtype="float32")
    assert _predict(net, images)[0].shape == (1, *spatial, 3)


def test_dilated_accepts_any_size():
    net = model.build_model("dilated2d", (17, 13, 1), 2, **_tiny("dilated2d"))
    assert tuple(net.output.shape) == (None, 17, 13, 2)


def test_twopath_valid_labels_the_centre():
    net = model.build_model("twopath2d", (40, 36, 2), 3, padding="valid", **_tiny("twopath2d"))
    assert tuple(net.output.shape) == (None, 8, 4, 3)
    cascade = model.build_model("twopath2d", (72, 70, 2), 3, padding="valid", cascade=True, **_tiny("twopath2d"))
    assert tuple(cascade.output.shape) == (None, 8, 6, 3)


def test_layer_names_are_hierarchical():
    names = {layer.name for layer in model.build_model("unet3d", (16, 16, 16, 1), 2, **_tiny("unet3d")).layers}
    assert {"enc1_conv1", "enc2_pool", "enc2_conv2_norm", "dec1_up", "dec1_concat", "dec1_conv1", "out"} <= names
    names = {layer.name for layer in model.build_model("attention_unet2d", (16, 16, 1), 2, stem_stride=2).layers}
    assert {"dec1_gate_alpha", "dec3_gate_theta", "dec0_up", "out"} <= names
    assert not any(name.startswith(("conv", "dense", "batch_normalization")) for name in names)


@pytest.mark.parametrize("name", ["unet2d", "resunet3d", "dilated2d", "fcn3d", "twopath2d"])
def test_output_is_float32_under_mixed_precision(name):
    spatial = SPATIAL[int(name[-2])]
    try:
        keras.config.set_dtype_policy("mixed_float16")
        net = model.build_model(name, (*spatial, 1), 2, **_tiny(name))
    finally:
        keras.config.set_dtype_policy("float32")
    assert net.output.dtype == "float32"
    assert net.get_layer("out").dtype_policy.compute_dtype == "float32"
    assert any(layer.dtype_policy.compute_dtype == "float16" for layer in net.layers)


def test_stem_stride_has_no_full_resolution_convolution():
    net = model.build_model("unet2d", (16, 16, 1), 2, depth=2, filters=4, stem_stride=2)
    convs = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D)]
    full = [layer.name for layer in convs if layer.output.shape[1] == 16 and layer.kernel_size != (1, 1)]
    assert full == []
    assert net.get_layer("enc1_conv1").strides == (2, 2)
    assert tuple(net.get_layer("dec0_up").output.shape) == (None, 16, 16, 4)


def test_maxout_hand_computed():
    layer = model.Maxout(pieces=2)
    values = np.array([[1.0, 5.0, 3.0, 2.0]], dtype="float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(values)), [[3.0, 5.0]])
    assert model.Maxout.from_config(layer.get_config()).pieces == 2
    with pytest.raises(ValueError, match="pieces=3"):
        model.Maxout(pieces=3)(values)


def test_model_summary_text():
    net = model.build_model("attention_unet2d", (16, 16, 1), 2, **_tiny("attention_unet2d"))
    text = model.model_summary_text(net)
    assert 'Model: "attention_unet2d"' in text
    assert "dec1_gate_alpha" in text and "Total params" in text
    assert f"{net.count_params():,}" in text
    assert "Connected to" in text


def test_default_models_build_for_the_readme_shapes():
    """Default settings fit the hippocampus patch (40, 56, 40) in 3D and 64 × 64 slices in 2D."""
    counts = {}
    for name in model.MODELS:
        shape = (64, 64, 1) if name.endswith("2d") else (40, 56, 40, 1)
        counts[name] = model.build_model(name, shape, 3).count_params()
    assert all(count > 10_000 for count in counts.values()), counts


def test_the_full_resolution_skip_adds_one_image_convolution_to_the_head():
    """unet3d with stem_stride 2 and full_res_skip 4: a 3x3x3 convolution of the one input channel to 4 channels
    (108 weights, no bias before its norm), their instance norm (8), and 4 more inputs to the 1x1 head over 3 classes
    (12)."""
    args = {"filters": 16, "norm": "instance", "stem_stride": 2, "depth": 3}
    plain = model.build_model("unet3d", (8, 16, 16, 1), 3, **args)
    skip = model.build_model("unet3d", (8, 16, 16, 1), 3, full_res_skip=4, **args)
    assert skip.count_params() - plain.count_params() == 27 * 4 + 2 * 4 + 4 * 3
    assert tuple(skip.get_layer("full_res_concat").output.shape) == (None, 8, 16, 16, 16 + 4)
    assert tuple(skip.output.shape) == (None, 8, 16, 16, 3)
    full = model.build_model("unet3d", (8, 16, 16, 1), 3, **{**args, "stem_stride": 1})  # already full resolution
    assert (
        model.build_model("unet3d", (8, 16, 16, 1), 3, full_res_skip=4, **{**args, "stem_stride": 1}).count_params()
        == full.count_params()
    )
