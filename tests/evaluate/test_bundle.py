"""Export bundles (evaluation.py --run RUN --export BUNDLE): a tiny trained run is exported, its training dataset and
run folder are deleted and the bundle is moved, and it still predicts new images, with Keras and with onnxruntime,
giving the same probabilities (within 1e-4) and the same masks; the SavedModel's serving signature gives the Keras
model's probabilities; bundle.json reads back; the errors are one line each."""

import csv
import json
import shutil
import subprocess
import sys

import keras
import nibabel as nib
import numpy as np
import pytest
from builders import LABELS, write_msd
from conftest import ROOT

import evaluation
import model as model_zoo
import train
from utils.bundle import BUNDLE_FILE, BundleRecord, inference_network, is_bundle, open_run, read_bundle
from utils.evaluate.export import score_lines
from utils.evaluate.options import Options
from utils.evaluate.pipeline import Predictor
from utils.inference import predict_volume
from utils.runs import TrainingConfig

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

PATCH = [8, 16, 16]
TINY = '{"filters": 4, "depth": 2}'
QUIET = ["--no-tta", "--pictures", "none", "--quiet", "--metrics", "dice"]


@pytest.fixture(scope="module")
def bundle(synthetic, tmp_path_factory):
    """A unet3d trained two steps on a copy of the synthetic dataset, exported, then the dataset copy and the run
    deleted and the bundle moved to another folder: ``(bundle folder, raw MSD folder)``."""
    raw, dataset, _ = synthetic
    root = tmp_path_factory.mktemp("bundle")
    data, run = root / "data", root / "runs" / "tiny"
    shutil.copytree(dataset, data)
    argv = ["--data", str(data), "--output", str(run), "--model", "unet3d", "--model-args", TINY]
    argv += ["--patch-size", *map(str, PATCH), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2"]
    assert train.main([*argv, "--no-tensorboard", "--seed", "3"]) == 0
    assert evaluation.main(["--run", str(run), "--export", str(root / "bundles" / "tiny")]) == 0
    shutil.rmtree(data)
    shutil.rmtree(run)
    moved = root / "elsewhere" / "tiny"
    shutil.move(root / "bundles" / "tiny", moved)
    return moved, raw


@pytest.mark.slow
def test_a_bundle_holds_every_format_and_its_record(bundle):
    folder, _ = bundle
    for name in ("model.keras", "model.onnx", "saved_model/saved_model.pb", "config.json", "MODEL_CARD.md"):
        assert (folder / name).is_file(), name
    record = read_bundle(folder)
    assert BundleRecord.from_json(json.loads((folder / BUNDLE_FILE).read_text())) == record
    assert record.patch_size == PATCH and record.input_shape == [None, *PATCH, 1]
    assert record.labels == LABELS and record.label_values == [0, 1, 2] and record.num_classes == 3
    assert record.preprocessing["spacing"] == "original" and record.preprocessing["crop"] == "nonzero"
    assert record.orientation == ["S", "A", "R"] and record.checks["onnx_max_difference"] <= 1e-4
    card = (folder / "MODEL_CARD.md").read_text()
    for words in ("## Intended use", "## Data", "Test dice: not measured", "Crop: nonzero", "1 epoch(s) of up to 2"):
        assert words in card, words
    with open(folder / "history.csv") as handle:
        val_dice = float(next(csv.DictReader(handle))["val_dice"])
    assert f"Validation dice (mean foreground, best epoch 1): {val_dice:.4f}" in card
    assert (folder / "dataset" / "manifest.json").is_file()
    assert json.loads((folder / "dataset" / "manifest.json").read_text())["cases"] == []


@pytest.mark.slow
def test_keras_onnx_and_saved_model_give_the_same_probabilities(bundle):
    folder, _ = bundle
    config, model, _ = open_run(folder, "keras")
    _, none, onnx = open_run(folder, "onnx")
    assert none is None and callable(onnx)
    image = np.random.default_rng(1).uniform(0, 250, size=(16, 20, 12, 1)).astype(np.float32)
    by_keras = predict_volume(model, image, config.patch_size, 3, batch_size=3)
    by_onnx = predict_volume(None, image, config.patch_size, 3, batch_size=3, predict=onnx)
    assert by_keras.shape == (16, 20, 12, 3)
    np.testing.assert_allclose(by_onnx, by_keras, rtol=0, atol=1e-4)
    np.testing.assert_allclose(by_keras.sum(-1), 1.0, atol=1e-5)
    windows = np.random.default_rng(2).normal(size=(2, *PATCH, 1)).astype(np.float32)
    served = keras.layers.TFSMLayer(str(folder / "saved_model"), call_endpoint="serving_default")(windows)
    served = next(iter(served.values())) if isinstance(served, dict) else served
    np.testing.assert_allclose(np.asarray(served), model.predict_on_batch(windows), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_bundle_predicts_the_same_masks_with_keras_and_onnx_without_the_training_data(bundle, tmp_path):
    folder, raw = bundle
    new = write_msd(tmp_path / "new", cases=2, unlabelled=1)
    masks = {}
    for engine in ("keras", "onnx"):
        out = tmp_path / engine
        argv = ["--run", str(folder), "--input", str(new), "--output", str(out), "--engine", engine, *QUIET]
        assert evaluation.main(argv) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["num_cases"] == 3 and summary["num_scored"] == 2 and summary["settings"]["engine"] == engine
        masks[engine] = {p.name: np.asarray(nib.load(p).dataobj) for p in sorted((out / "masks").glob("*.nii.gz"))}
    assert sorted(masks["keras"]) == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    for name, mask in masks["keras"].items():
        assert mask.shape == nib.load(new / "imagesTr" / "case_000.nii.gz").shape
        np.testing.assert_array_equal(masks["onnx"][name], mask)


def test_onnx_needs_a_bundle_and_a_bundle_is_not_exported_again(synthetic, tmp_path, capsys):
    _, _, run = synthetic
    with pytest.raises(ValueError, match="--engine onnx predicts from a bundle; write one with evaluation.py"):
        open_run(run, "onnx")
    fake = tmp_path / "bundle"
    fake.mkdir()
    (fake / BUNDLE_FILE).write_text("{}")
    assert is_bundle(fake) and not is_bundle(run)
    code = evaluation.main(["--run", str(fake), "--export", str(tmp_path / "again")])
    assert code == 2 and "is a bundle already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.main(["--run", str(run), "--export", str(tmp_path / "b"), "--output", str(tmp_path / "r")])
    assert "--export writes a bundle from --run alone" in capsys.readouterr().err
    (tmp_path / "cv" / "fold_0").mkdir(parents=True)
    shutil.copy(run / "config.json", tmp_path / "cv" / "fold_0" / "config.json")
    assert evaluation.main(["--run", str(tmp_path / "cv"), "--export", str(tmp_path / "cv_bundle")]) == 2
    assert "a run of 1 folds; a bundle holds one network: export one fold" in capsys.readouterr().err


def test_bundle_records_of_another_version_or_incomplete_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"bundle.json: bundle format 99, this toolkit reads up to 1"):
        BundleRecord.from_json({"format_version": 99}, tmp_path / BUNDLE_FILE)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        BundleRecord.from_json({"format_version": 1, "extra": 1})
    with pytest.raises(ValueError, match="not a complete bundle record"):
        BundleRecord.from_json({"format_version": 1, "name": "x"})
    with pytest.raises(FileNotFoundError, match="no complete bundle"):
        read_bundle(tmp_path)


def test_the_exported_network_of_a_mixed_precision_deep_supervision_model_is_float32_with_one_output():
    shape, options = (16, 16, 1), {"filters": 4, "depth": 3, "deep_supervision": True}
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = model_zoo.build_model("unet2d", shape, 3, **options)
    finally:
        keras.config.set_dtype_policy("float32")
    reference = model_zoo.build_model("unet2d", shape, 3, **options)
    reference.set_weights(mixed.get_weights())
    config = TrainingConfig(model="unet2d", model_args=options, patch_size=[16, 16], num_classes=3, num_channels=1)
    exported = inference_network(mixed, config)
    assert {layer.dtype_policy.name for layer in exported.layers} == {"float32"} and len(exported.outputs) == 1
    batch = np.random.default_rng(3).normal(size=(2, *shape)).astype(np.float32)
    expected = reference.predict_on_batch(batch)[0]
    np.testing.assert_allclose(exported.predict_on_batch(batch), expected, rtol=0, atol=1e-6)


def test_a_two_path_network_is_exported_as_its_whole_slice_rebuild():
    keras.utils.set_random_seed(0)
    options = {"local_filters": 4, "global_filters": 4, "padding": "valid"}
    trained = model_zoo.build_model("twopath2d", (40, 40, 1), 3, **options)
    config = TrainingConfig(model="twopath2d", model_args=options, patch_size=[40, 40], num_classes=3, num_channels=1)
    exported = inference_network(trained, config)
    assert tuple(exported.inputs[0].shape) == (None, None, None, 1)
    volume = np.random.default_rng(4).normal(size=(2, 30, 46, 1)).astype(np.float32)
    quiet = Options(progress=False)
    by_model = Predictor(trained, config).probabilities(volume, quiet)
    by_engine = Predictor(None, config, exported.predict_on_batch).probabilities(volume, quiet)
    assert by_engine.shape == (2, 30, 46, 3)
    np.testing.assert_allclose(by_engine, by_model, rtol=0, atol=1e-6)


def test_the_model_card_quotes_the_test_scores_of_an_evaluation():
    config = TrainingConfig(best_val_dice=None)
    summary = {
        "num_scored": 6,
        "settings": {"split": "test"},
        "foreground_mean": {"dice": 0.8125},
        "classes": {
            "1": {"name": "anterior", "dice": {"mean": 0.8}},
            "2": {"name": "posterior", "dice": {"mean": 0.825}},
        },
    }
    lines = score_lines(config, {"best": 0.79, "best_epoch": 4}, summary)
    assert lines == [
        "- Validation dice (mean foreground, best epoch 5): 0.7900",
        "- Test dice (test split, 6 cases): foreground mean 0.8125",
        "  - anterior (value 1): 0.8000",
        "  - posterior (value 2): 0.8250",
    ]
    assert score_lines(config, {"best": float("-inf")}, None)[0] == "- Validation dice: not recorded"


USER_BUILDER = """
import keras
from keras import layers


@keras.saving.register_keras_serializable(package="bundle_test")
class Shift(layers.Layer):
    def __init__(self, offset=0.0, **kwargs):
        super().__init__(**kwargs)
        self.offset = offset

    def call(self, x):
        return x + self.offset

    def get_config(self):
        return {**super().get_config(), "offset": self.offset}


def build_net(name, input_shape, num_classes, **kwargs):
    inputs = keras.Input(input_shape)
    x = layers.Conv3D(4, 3, padding="same", activation="relu")(Shift(0.5)(inputs))
    return keras.Model(inputs, layers.Conv3D(num_classes, 1, activation="softmax")(x), name=name)
"""


@pytest.mark.slow
def test_a_users_builder_travels_with_the_bundle(synthetic, tmp_path):
    _, _, template = synthetic
    source = tmp_path / "mine" / "my_net.py"
    source.parent.mkdir()
    source.write_text(USER_BUILDER)
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads((template / "config.json").read_text())
    config.update(model="my_net.py:build_net", model_source=str(source), patch_size=PATCH)
    (run / "config.json").write_text(json.dumps(config))
    model_zoo.build_model("my_net.py:build_net", (*PATCH, 1), 3, source=str(source)).save(run / "model.keras")
    bundle = tmp_path / "bundle"
    assert evaluation.main(["--run", str(run), "--export", str(bundle)]) == 0
    assert read_bundle(bundle).files["builder"] == "builder/my_net.py"
    shutil.rmtree(source.parent)
    probe = f"from utils.bundle import open_run; print(open_run({str(bundle)!r})[1].output_shape)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"(None, {', '.join(map(str, PATCH))}, 3)"
