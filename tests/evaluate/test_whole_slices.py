"""The classic 2D workflows on real, uneven data: slices of different sizes exported with no resizing flag, trained
(the U-Net on whole slices, the two-path CNN on patches of its receptive field) and evaluated, with masks on the
source grid; the two-path CNN predicts whole slices fully convolutionally, exactly as tiles of its training model."""

import json

import keras
import nibabel as nib
import numpy as np
import pytest
from builders import hippocampus_png, hippocampus_subset
from conftest import SHARED_DATA
from PIL import Image

import data_gen
import evaluation
import model as model_zoo
import train
from utils.evaluate.options import Options
from utils.evaluate.pipeline import Predictor
from utils.inference import model_margin, model_predictor, predict_volume
from utils.runs import TrainingConfig
from utils.settings import TRAINING

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data folder {SHARED_DATA} is not in this checkout"
)
SMALL_TWOPATH = {"local_filters": 4, "global_filters": 4}


def two_path_predictor(patch=(40, 40), classes=3):
    keras.utils.set_random_seed(0)
    options = {**SMALL_TWOPATH, "padding": "valid"}
    trained = model_zoo.build_model("twopath2d", (*patch, 1), classes, **options)
    config = TrainingConfig(
        model="twopath2d", model_args=options, patch_size=list(patch), num_classes=classes, num_channels=1
    )
    return trained, Predictor(trained, config)


def test_whole_slices_equal_tiles_of_the_valid_network():
    trained, predictor = two_path_predictor()
    assert model_margin(trained) == 16 and trained.outputs[0].shape[1:3] == (8, 8)
    image = np.random.default_rng(0).normal(size=(3, 50, 45, 1)).astype(np.float32)
    tiles = predict_volume(trained, image, [40, 40], 3)  # the training model, output tiles with their margin
    whole = predictor.probabilities(image, Options(overlap=0.5, tta=False))  # whole slices, same padding
    assert whole.shape == tiles.shape == (3, 50, 45, 3)
    np.testing.assert_allclose(whole, tiles, atol=1e-5)
    # callers that want a window's size get the network padded like a same-padded one
    batch = image[:2, :40, :40]
    np.testing.assert_allclose(model_predictor(trained)(batch), predictor.whole_slice_model()(batch), atol=1e-5)
    keras.backend.clear_session()


def run(*argv) -> int:
    return {"data_gen": data_gen.main, "train": train.main, "evaluation": evaluation.main}[argv[0]](
        list(map(str, argv[1:]))
    )


def train_and_evaluate(data, folder, *flags):
    """Train briefly with ``flags``, evaluate the test split; return the config and the results folder."""
    short = ["--epochs", 1, "--steps-per-epoch", 2, "--no-tensorboard"]
    assert run("train", "--data", data, "--output", folder / "run", *short, *flags) == 0
    results = folder / "results"
    assert run("evaluation", "--run", folder / "run", "--data", data, "--output", results, "--pictures", "none") == 0
    return json.loads((folder / "run" / "config.json").read_text()), results


@pytest.fixture(scope="module")
def uneven_png(tmp_path_factory):
    """A PNG folder made from four real MSD Hippocampus cases (slice sizes differ between patients), prepared with
    --export slices and no resizing flag: 2 train, 1 val, 1 test patient."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is not in this checkout")
    root = tmp_path_factory.mktemp("png")
    written = hippocampus_png(root / "png", SHARED_DATA / "msd_hippocampus")
    flags = ["--patient-pattern", r"HIP_(\d+)_(\d+)", "--spacing", "original", "--export", "slices"]
    assert run("data_gen", "--input", root / "png", "--output", root / "data", *flags, "--split", 0.5, 0.25, 0.25) == 0
    return root, written


@needs_shared
def test_an_uneven_png_folder_trains_a_unet_on_slices_and_gets_masks_on_its_grid(uneven_png, tmp_path):
    root, written = uneven_png
    config, results = train_and_evaluate(root / "data", tmp_path, "--model", "unet2d", "--source", "slices")
    rows = np.load(root / "data" / "slices" / "train_images.npy", mmap_mode="r").shape[1:3]
    assert config["plan"]["target_shape"] == list(map(float, rows)) and config["source"] == "slices"
    assert config["plan"]["speed"]["estimated_step_s"] > 0
    (case,) = json.loads((root / "data" / "splits.json").read_text())["test"]
    truth = written[case.removeprefix("HIP_")]
    names = sorted((results / "masks").glob(f"{case}_*.png"), key=lambda p: int(p.stem.split("_")[2]))
    assert len(names) == truth.shape[0] and all(Image.open(p).size == truth.shape[:0:-1] for p in names)
    assert nib.load(results / "masks" / f"{case}.nii.gz").shape[:2] == truth.shape[1:][::-1]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["num_scored"] == 1 and not summary.get("failures")


@pytest.fixture(scope="module")
def uneven_hippocampus(tmp_path_factory):
    """Six real MSD Hippocampus cases of different in-plane sizes prepared with --export slices and no resizing
    flag: 3 train, 1 val, 2 test cases."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is not in this checkout")
    folder = tmp_path_factory.mktemp("hippocampus")
    raw = hippocampus_subset(folder / "raw", SHARED_DATA / "msd_hippocampus")
    flags = ["--export", "slices", "--split", 0.5, 0.17, 0.33]
    assert run("data_gen", "--input", raw, "--output", folder / "data", *flags) == 0
    return folder


@needs_shared
@pytest.mark.parametrize("source", ["slices", "volumes"])
def test_the_two_path_network_trains_on_patches_and_predicts_whole_slices(uneven_hippocampus, tmp_path, source):
    folder, data = uneven_hippocampus, uneven_hippocampus / "data"
    flags = ["--model", "twopath2d", "--source", source, "--model-args", json.dumps(SMALL_TWOPATH)]
    config, results = train_and_evaluate(data, tmp_path, *flags)
    assert config["model_args"]["padding"] == "valid" and config["patch_size"] == [64, 64]
    assert "receptive field 33x33" in config["plan"]["trained_on"]
    assert config["lr"] == pytest.approx(0.1 * TRAINING["lr"].default)  # no normalisation layers: a tenth
    for case in json.loads((data / "splits.json").read_text())["test"]:
        source_label = nib.load(folder / "raw" / "labelsTr" / f"{case}.nii.gz")
        mask = nib.load(results / "masks" / f"{case}.nii.gz")
        assert mask.shape == source_label.shape and np.allclose(mask.affine, source_label.affine)
    assert json.loads((results / "summary.json").read_text())["num_scored"] == 2
