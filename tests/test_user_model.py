"""--model FILE.py:FUNCTION: a user's builder trains, is recorded in config.json and reloads in evaluation.py."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

import model as model_zoo
import train
from utils.settings import TRAINING

BUILDER = '''
import keras
from keras import layers


@keras.saving.register_keras_serializable(package="my_models")
class Scale(layers.Layer):
    """A custom layer: the reloaded run needs this file imported (Keras's safe mode)."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def build_tiny(name, input_shape, num_classes, filters=4, **kwargs):
    conv = layers.Conv3D if len(input_shape) == 4 else layers.Conv2D
    inputs = keras.Input(input_shape)
    x = conv(filters, 3, padding="same", activation="relu")(Scale(0.5)(inputs))
    outputs = conv(num_classes, 1, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def wrong_signature(input_shape):
    return None
'''


@pytest.fixture
def builder_file(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(BUILDER)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "my_models.py"


def test_the_setting_takes_names_and_builders_only():
    setting = TRAINING["model"]
    for value in ("unet3d", "my_models.py:build_tiny", "nets/my_models.py:build", "package.module:build_net"):
        setting.check("model", value)
    for value in ("unet4d", "my_models.py", "my_models.py:", "a b.py:f", ":f"):
        with pytest.raises(ValueError, match="FILE.py:FUNCTION"):
            setting.check("model", value)


def test_a_builder_builds_with_build_models_signature(builder_file):
    built = model_zoo.build_model("my_models.py:build_tiny", (8, 8, 8, 1), 3, filters=2)
    assert built.output.shape == (None, 8, 8, 8, 3) and built.name == "build_tiny"
    assert model_zoo.builder_source("my_models.py:build_tiny") == str(builder_file)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("unet4d", ValueError, "unknown model 'unet4d'"),
        ("missing.py:build", FileNotFoundError, "missing.py: builder file of --model missing.py:build not found"),
        ("my_models.py:nothing", ValueError, "defines no function 'nothing'"),
        ("my_models.py:wrong_signature", ValueError, r"does not take \(name, input_shape, num_classes"),
        ("no_such_package.module:build", ValueError, "cannot import module 'no_such_package.module'"),
    ],
)
def test_bad_builders_get_one_clear_line(builder_file, name, error, message):
    with pytest.raises(error, match=message):
        model_zoo.build_model(name, (8, 8, 8, 1), 2)


def test_train_refuses_a_missing_builder_in_one_line(builder_file, prepared_sample, capsys):
    argv = ["--data", str(prepared_sample), "--output", "runs/x", "--model", "gone.py:f", "--patch-size", "8", "8", "8"]
    assert train.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train.py: error: gone.py: builder file of --model gone.py:f not found"
    ]


@pytest.mark.slow
def test_a_users_builder_trains_and_reloads_in_evaluation(builder_file, prepared_sample, tmp_path):
    run = tmp_path / "runs" / "mine"
    argv = ["--data", str(prepared_sample), "--output", str(run), "--model", "my_models.py:build_tiny"]
    argv += ["--model-args", '{"filters": 3}', "--patch-size", "16", "16", "16", "--epochs", "1"]
    argv += ["--steps-per-epoch", "2", "--batch-size", "2", "--no-tensorboard"]
    assert train.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "my_models.py:build_tiny" and config["model_source"] == str(builder_file)
    assert config["model_args"] == {"filters": 3} and config["plan"]["user_builder"] == str(builder_file)
    # Another process in another folder: the builder file is found at the path config.json recorded.
    results = tmp_path / "results"
    command = [sys.executable, str(ROOT / "evaluation.py"), "--run", str(run), "--data", str(prepared_sample)]
    command += ["--output", str(results), "--no-tta", "--pictures", "none", "--quiet", "--metrics", "dice"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((results / "summary.json").read_text())["num_cases"] == 6
