"""Pretrained 2D encoders under unet2d (utils/backbones.py, model.unet's backbone): every backbone builds, trains a
step and reloads; the input adapter's starting weights; weights from a file; the wrong-size error; freezing the encoder
for the first epochs (utils/train/callbacks.py, EncoderFreeze) across a save and reload; train.py's flags end to end.
No test downloads anything: the backbones are built with random weights or from a file a test saves."""

import json

import keras
import numpy as np
import pytest

import model as model_zoo
import train
from utils import backbones
from utils.losses import get_loss
from utils.runs import load_model, save_model
from utils.settings import BACKBONE_NAMES
from utils.train import planning
from utils.train.callbacks import EncoderFreeze

SHAPE = (64, 64, 2)  # two channels, so that the adapter mixes them; 64 = 2 x the encoders' stride
TINY_DECODER = {"filters": 4, "convs_per_level": 1, "norm": "instance"}


def batch(seed=0, size=2, shape=SHAPE):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(size, *shape)).astype("float32")
    labels = (images[..., :1] > 0.5).astype("float32")
    return images, np.concatenate([1 - labels, labels], axis=-1)


def build(backbone, seed=0, shape=SHAPE, **options):
    keras.utils.set_random_seed(seed)
    return model_zoo.build_model("unet2d", shape, 2, backbone=backbone, **{**TINY_DECODER, **options})


def compile_small(net, run_eagerly=True):
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=get_loss("dice_ce"), run_eagerly=run_eagerly)
    return net


def predict(net, images):
    return keras.ops.convert_to_numpy(net(images, training=False))


def encoder_weights(net):
    return [np.array(w) for w in backbones.encoder_of(net).get_weights()]


def all_equal(first, second):
    return len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_the_settings_list_every_backbone():
    assert tuple(backbones.BACKBONES) == BACKBONE_NAMES


@pytest.mark.parametrize(
    "backbone", [b if b == "efficientnetb0" else pytest.param(b, marks=pytest.mark.slow) for b in BACKBONE_NAMES]
)
def test_every_backbone_builds_reloads_and_trains_a_step(backbone, tmp_path):
    shape = (32, 32, 2)  # the smallest input the encoders take
    net = build(backbone, shape=shape)
    strides = backbones.BACKBONES[backbone].strides
    features = backbones.encoder_of(net).outputs
    assert [tuple(f.shape[1:3]) for f in features] == [(32 // s, 32 // s) for s in strides]
    assert net.output.shape[1:] == (32, 32, 2)
    images, labels = batch(shape=shape)
    save_model(net, tmp_path / "model.keras")  # the architecture's round trip (the optimizer's: the freeze test)
    reloaded = load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(predict(reloaded, images), predict(net, images), atol=1e-5)
    before = encoder_weights(net)
    loss = float(compile_small(net).train_on_batch(images, labels))
    assert np.isfinite(loss)
    assert not all_equal(before, encoder_weights(net))  # the encoder trains with the decoder


def test_the_input_adapter_starts_as_the_imagenet_input_of_each_backbone():
    kernel, bias = backbones.adapter_weights("densenet121", 1)  # torch convention: one channel repeated
    np.testing.assert_array_equal(kernel, np.ones((1, 1, 1, 3)))
    np.testing.assert_array_equal(bias, np.zeros(3))
    kernel, bias = backbones.adapter_weights("resnet50", 3)  # caffe: RGB to BGR, x 255 std, mean already removed
    expected = np.zeros((3, 3))
    expected[0, 2], expected[1, 1], expected[2, 0] = 58.395, 57.12, 57.375
    np.testing.assert_allclose(kernel[0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(bias, np.zeros(3))
    kernel, bias = backbones.adapter_weights("resnet50", 4)  # four channels averaged into each of B, G, R
    np.testing.assert_allclose(kernel[0, 0], np.tile([57.375, 57.12, 58.395], (4, 1)) / 4, rtol=1e-6)
    kernel, bias = backbones.adapter_weights("efficientnetb0", 2)  # torch convention: the two averaged
    np.testing.assert_array_equal(kernel[0, 0], np.full((2, 3), 0.5))
    net = build("efficientnetb0", shape=(64, 64, 2))  # the built model holds the same numbers
    np.testing.assert_array_equal(net.get_layer("input_adapter").get_weights()[0], kernel)
    assert not any(isinstance(layer, keras.layers.Normalization) for layer in backbones.encoder_of(net).layers)


@pytest.mark.parametrize(
    ("shape", "options", "error", "message"),
    [
        ((100, 64, 1), {"backbone": "resnet50"}, ValueError, r"input size 100x64 is not a multiple of 32.*128 64"),
        ((16, 16, 1), {"backbone": "densenet121"}, ValueError, r"16x16 is not a multiple of 32.*32 32"),
        ((64, 64, 1), {"backbone": "vgg16"}, ValueError, "unknown backbone 'vgg16'"),
        ((64, 64, 1), {"encoder_weights": "imagenet"}, ValueError, "needs a backbone"),
        ((64, 64, 1), {"backbone": "resnet50", "encoder_weights": "no/such.weights.h5"}, FileNotFoundError, "such"),
    ],
)
def test_bad_backbone_options_get_one_clear_line(shape, options, error, message):
    with pytest.raises(error, match=message) as caught:
        model_zoo.build_model("unet2d", shape, 2, **options)
    assert "\n" not in str(caught.value)


def test_a_3d_unet_refuses_a_backbone():
    with pytest.raises(ValueError, match="2D encoder"):
        model_zoo.build_model("unet3d", (32, 32, 32, 1), 2, backbone="resnet50")


def test_convnext_runs_its_grouped_convolutions_as_depthwise_ones_with_the_same_outputs():
    keras.utils.set_random_seed(0)
    encoder = backbones.build_encoder("convnext_tiny", (32, 32))
    layers = backbones.leaf_layers(encoder)
    assert sum(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in layers) == 18  # 3 + 3 + 9 + 3 blocks
    assert not any(isinstance(layer, keras.layers.Conv2D) and layer.groups > 1 for layer in layers)
    reference = keras.applications.ConvNeXtTiny(include_top=False, weights=None, input_shape=(32, 32, 3),
                                                include_preprocessing=False)  # fmt: skip
    with_weights = [[layer for layer in backbones.leaf_layers(m) if layer.weights] for m in (encoder, reference)]
    for ours, theirs in zip(*with_weights, strict=True):  # the same layers in order; 18 kernels reshaped
        theirs.set_weights([w.reshape(v.shape) for w, v in zip(ours.get_weights(), theirs.get_weights(), strict=True)])
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(reference(images))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(encoder(images)[-1]), expected, rtol=1e-4, atol=1e-4)


def test_encoder_weights_from_a_file_are_loaded_and_change_the_output(tmp_path):
    donor = build("efficientnetb0", seed=1)
    path = tmp_path / "encoder.weights.h5"
    backbones.encoder_of(donor).save_weights(path)
    plain = build("efficientnetb0", seed=2)
    loaded = build("efficientnetb0", seed=2, encoder_weights=str(path))
    assert all_equal(encoder_weights(loaded), encoder_weights(donor))
    assert not all_equal(encoder_weights(plain), encoder_weights(donor))
    decoder = [layer.name for layer in loaded.layers if layer.name.startswith("dec")]
    for name in decoder:  # the same seed: only the encoder differs
        assert all_equal(loaded.get_layer(name).get_weights(), plain.get_layer(name).get_weights()), name
    images, _ = batch()
    difference = np.abs(predict(loaded, images) - predict(plain, images)).max()
    assert difference > 1e-3
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="garbage.weights.h5: not a weights file of EfficientNetB0"):
        build("efficientnetb0", encoder_weights=str(garbage))


def test_the_planner_rounds_to_the_encoder_stride_and_counts_the_encoder():
    fingerprint = {"median_shape": [36, 50, 35], "median_spacing": [1.0, 1.0, 1.0]}
    plan = planning.plan("unet2d", fingerprint, 1, 3, {"backbone": "efficientnetb0", **TINY_DECODER}, recipe="gpu")
    assert plan["patch_size"] == [64, 64] and "depth" not in plan["model_args"]
    assert plan["plan"]["downsampling_factor"] == 32
    assert plan["plan"]["parameters"] > 4_000_000  # EfficientNetB0 without its top has 4.05 M
    encoder = backbones.encoder_of(build("efficientnetb0", shape=(224, 224, 1)))
    # the published 0.39 G multiply-adds of EfficientNetB0 at 224 x 224 (Tan & Le 2019), less its 1.3 M classifier
    assert planning.count_multiply_adds(encoder) == pytest.approx(0.39e9, rel=0.05)


class Probe(keras.callbacks.Callback):
    """Records at each epoch's start whether the encoder trains, and its weights at each epoch's end."""

    def __init__(self):
        super().__init__()
        self.trainable, self.weights = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.trainable.append(backbones.encoder_of(self.model).trainable)

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(encoder_weights(self.model))


def fit(net, epochs, initial_epoch=0, freeze=1):
    probe = Probe()
    images, labels = batch(size=4)
    net.fit(images, labels, batch_size=2, epochs=epochs, initial_epoch=initial_epoch, verbose=0, shuffle=False,
            callbacks=[EncoderFreeze(freeze), probe])  # fmt: skip
    return probe


def test_the_encoder_stays_fixed_while_frozen_then_trains_across_a_save_and_reload(tmp_path):
    net = compile_small(build("efficientnetb0"))  # eager; graph mode: test_train_records_the_backbone_...
    start = encoder_weights(net)
    adapter = net.get_layer("input_adapter").get_weights()[0].copy()
    probe = fit(net, epochs=1)
    assert probe.trainable == [False]
    assert all_equal(probe.weights[0], start)  # kernels, batch-norm scales and running statistics alike
    assert not np.array_equal(net.get_layer("input_adapter").get_weights()[0], adapter)  # the rest learns
    path = tmp_path / "last.keras"
    save_model(net, path)
    reloaded = load_model(path)
    assert backbones.encoder_of(reloaded).trainable is False  # --resume continues frozen ...
    saved_state = [np.array(v) for v in net.optimizer.variables]
    assert all_equal([np.array(v) for v in reloaded.optimizer.variables], saved_state)  # ... with its optimizer
    probe = fit(reloaded, epochs=3, initial_epoch=1, freeze=2)
    assert probe.trainable == [False, True]
    assert all_equal(probe.weights[0], start)
    assert not all_equal(probe.weights[1], start)
    assert len(reloaded.optimizer.variables) > len(saved_state)  # the new optimizer covers the encoder too


@pytest.mark.slow
def test_train_records_the_backbone_freezes_and_resumes(prepared_sample, tmp_path):
    run = tmp_path / "run"
    flags = ["--data", str(prepared_sample), "--output", str(run), "--model", "unet2d", "--backbone", "efficientnetb0",
             "--freeze-encoder-epochs", "1", "--model-args", json.dumps(TINY_DECODER), "--patch-size", "64", "64",
             "--batch-size", "2", "--steps-per-epoch", "2", "--no-tensorboard"]  # fmt: skip
    assert train.main([*flags, "--epochs", "1"]) == 0
    config = json.loads((run / "config.json").read_text())
    recorded = [config[key] for key in ("backbone", "encoder_weights", "freeze_encoder_epochs")]
    assert recorded == ["efficientnetb0", None, 1]
    assert not {"backbone", "depth", "stem_stride"} & set(config["model_args"])  # the encoder fixes them
    frozen = load_model(run / "last.keras")
    assert backbones.encoder_of(frozen).trainable is False
    assert train.main(["--data", str(prepared_sample), "--output", str(run), "--resume", "--epochs", "2"]) == 0
    resumed = load_model(run / "last.keras")
    assert backbones.encoder_of(resumed).trainable is True
    assert not all_equal(encoder_weights(resumed), encoder_weights(frozen))
    assert [row.split(",")[0] for row in (run / "history.csv").read_text().splitlines()[1:]] == ["0", "1"]


def test_train_refuses_encoder_flags_without_a_backbone_or_with_another_model(prepared_sample, tmp_path, capsys):
    base = ["--data", str(prepared_sample), "--output", str(tmp_path / "run")]
    assert train.main([*base, "--model", "unet2d", "--freeze-encoder-epochs", "2"]) == 2
    assert "--freeze-encoder-epochs 2 needs --backbone" in capsys.readouterr().err
    assert train.main([*base, "--model", "unet3d", "--backbone", "resnet50"]) == 2
    assert "pretrained encoders serve unet2d only, not unet3d" in capsys.readouterr().err
    assert train.main([*base, "--model", "unet2d", "--backbone", "resnet50", "--encoder-weights", "none.h5"]) == 2
    assert "none.h5: --encoder-weights file not found" in capsys.readouterr().err


def mixed_precision_model(backbone):
    """A bfloat16 model with deep supervision (the GPU recipe's shape) and its exported float32 inference network."""
    from utils.bundle import inference_network
    from utils.runs import TrainingConfig

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        net = build(backbone, deep_supervision=True)
    finally:
        keras.config.set_dtype_policy("float32")
    config = TrainingConfig(model="unet2d", num_channels=SHAPE[-1], num_classes=2)
    return net, inference_network(net, config)


def test_the_exported_network_of_a_mixed_precision_backbone_model_is_float32_throughout():
    net, network = mixed_precision_model("convnext_tiny")  # nested models, and operations (x + y) in the encoder
    encoder = backbones.encoder_of(network)
    assert {layer.dtype_policy.name for layer in encoder.layers if isinstance(layer, keras.layers.Layer)} == {"float32"}
    images, _ = batch()
    probabilities = predict(network, images)
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 64, 64, 2)
    mixed = keras.ops.convert_to_numpy(net(images, training=False)[0])  # the main output, from bfloat16 layers
    np.testing.assert_allclose(probabilities, mixed, atol=0.1)


@pytest.mark.slow
def test_a_model_on_a_backbone_exports_to_onnx_with_the_same_probabilities(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from utils.bundle import export_onnx

    net, network = mixed_precision_model("efficientnetb0")  # its own rescaling constants are not in the encoder
    export_onnx(network, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images, _ = batch()
    (probabilities,) = session.run(None, {session.get_inputs()[0].name: images})
    np.testing.assert_allclose(probabilities, predict(network, images), atol=1e-4)
