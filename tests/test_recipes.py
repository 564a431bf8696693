"""The recipes of README.md's "Recipes" section: one config per classic workflow in ``configs/``, each run end to end
with its three README commands as written, on small real data, with short budgets.

Each recipe runs in a fresh folder where ``../shared/data`` is the shared data and ``configs/`` the repository's,
after its input has been built there from real volumes (:mod:`builders`): PNG slices and BraTS folders from MSD
Hippocampus cases, MSD folders of slabs of the TotalSegmentator CT; the sarcoma recipe reads the shared HDF5 file
itself. ``python SCRIPT.py ARGS`` runs through the script's ``main`` in this process, and only budgets are added
(flags given last win): one epoch of two steps of batch 2, fewer exported patches, no test-time mirroring.
"""

import csv
import importlib
import json
import math
import re
import shlex

import builders
import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import ROOT, SHARED_DATA

import train
from utils.train.config import check_settings

SHORT_BUDGETS = {
    "data_gen.py": [],
    "train.py": ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--no-tensorboard"],
    "evaluation.py": ["--no-tta", "--pictures", "none", "--quiet"],
}
HIPPOCAMPUS = SHARED_DATA / "msd_hippocampus"
TOTALSEGMENTATOR = SHARED_DATA / "totalsegmentator"

# Per recipe: the input its commands read, built in the working folder, and what it adds to the short budgets.
INPUTS = {
    "configs/sarcoma_hdf5_2d.yaml": lambda work: None,  # ../shared/data/sts_layout, as written
    "configs/png_slices_2d.yaml": lambda work: builders.hippocampus_png(work / "sts_png", HIPPOCAMPUS, prefix="STS"),
    "configs/pancreas_3d_patches.yaml": lambda work: builders.ct_slabs_msd(
        work / "Task07_Pancreas", TOTALSEGMENTATOR, {7: 1}, {"1": "pancreas"}
    ),
    "configs/liver_spleen_2d.yaml": lambda work: builders.ct_slabs_msd(
        work / "Task03_Liver", TOTALSEGMENTATOR, {5: 1, 1: 2}, {"1": "liver", "2": "spleen"}
    ),
    "configs/brats_resunet.yaml": lambda work: builders.brats_from_hippocampus(
        work / "BraTS2020_TrainingData", HIPPOCAMPUS
    ),
}
EXTRA = {
    "configs/pancreas_3d_patches.yaml": {
        "data_gen.py": ["--patches-per-case", "4"],
        "train.py": ["--tensorboard"],
    },
    "configs/liver_spleen_2d.yaml": {"evaluation.py": ["--pictures", "all"]},
}


def readme_recipes() -> dict[str, list[str]]:
    """``{config path: [its three commands]}`` from the ``### `` subsections of README.md's ``## Recipes``."""
    section = (ROOT / "README.md").read_text().split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    recipes = {}
    for part in section.split("\n### ")[1:]:
        config = re.search(r"`(configs/[\w.]+\.yaml)`", part.splitlines()[0]).group(1)
        block = re.search(r"```bash\n(.*?)```", part, re.S).group(1)
        recipes[config] = [line.strip() for line in block.splitlines() if line.strip()]
    return recipes


def history_of(run) -> list[dict]:
    with open(run / "history.csv") as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


def test_every_config_is_a_readme_recipe_of_three_commands():
    recipes = readme_recipes()
    assert sorted(recipes) == sorted(f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(recipes) == sorted(INPUTS)
    for config, commands in recipes.items():
        scripts = [shlex.split(command)[1] for command in commands]
        assert scripts == ["data_gen.py", "train.py", "evaluation.py"], config
        assert f"--config {config} " in commands[1], config
        settings = train.load_config_file(str(ROOT / config))
        check_settings(settings)  # known keys, allowed values
        written = [line.removeprefix("#").strip() for line in (ROOT / config).read_text().splitlines()]
        assert all(command in written for command in commands), f"{config}'s comment and README.md differ"


def run_recipe(config: str, tmp_path, monkeypatch) -> dict[str, str]:
    """Build the recipe's input, run its three commands; returns ``{script: its --output}``."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    (work / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    INPUTS[config](work)
    monkeypatch.chdir(work)
    outputs = {}
    for command in readme_recipes()[config]:
        words = shlex.split(command)
        script = words[1]
        main = importlib.import_module(script.removesuffix(".py")).main
        args = words[2:] + SHORT_BUDGETS[script] + EXTRA.get(config, {}).get(script, [])
        assert main(args) == 0, command
        outputs[script] = work / words[words.index("--output") + 1]
    check_outputs(config, outputs)
    return outputs


def check_outputs(config: str, outputs: dict) -> None:
    """What every recipe leaves: a prepared dataset, a run trained as the config says, finite scores."""
    data, run, results = outputs["data_gen.py"], outputs["train.py"], outputs["evaluation.py"]
    assert (data / "manifest.json").is_file() and (data / "splits.json").is_file()
    recorded = json.loads((run / "config.json").read_text())
    for key, value in yaml.safe_load((ROOT / config).read_text()).items():
        assert recorded[key] == value, f"{config}: {key} is {recorded[key]!r} in config.json"
    history = history_of(run)
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    summary = json.loads((results / "summary.json").read_text())
    assert not summary.get("failures"), summary.get("failures")
    with open(results / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(0.0 <= float(row["dice"]) <= 1.0 for row in rows if row["dice"] not in ("", "nan"))


@pytest.mark.slow
def test_sarcoma_hdf5_recipe_and_its_four_architectures(tmp_path, monkeypatch):
    from utils.prepared import PreparedDataset
    from utils.train.config import resolve_config

    outputs = run_recipe("configs/sarcoma_hdf5_2d.yaml", tmp_path, monkeypatch)
    data = outputs["data_gen.py"]
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["preprocessing"]["window"] == [-135.0, 250.0]
    assert manifest["label_values"] == [0, 1] and len(manifest["cases"]) == 2  # STS_101 and STS_102, binarised
    assert np.load(data / "slices" / "train_images.npy", mmap_mode="r").shape[0] > 0
    settings = train.load_config_file(str(ROOT / "configs/sarcoma_hdf5_2d.yaml"))
    for name in ("unet2d", "fcn2d", "twopath2d"):  # the other three: planned for these slices (each also trains
        # end to end in tests/train/test_training.py)
        config = resolve_config({**settings, "model": name, "data": str(data), "output": "x"}, PreparedDataset(data))
        assert (config.model, config.source, len(config.patch_size)) == (name, "slices", 2)
        assert config.batch_size >= 1 and config.loss == "dice_ce"


@pytest.mark.slow
def test_png_recipe_logs_iou_and_fscore_each_epoch(tmp_path, monkeypatch):
    outputs = run_recipe("configs/png_slices_2d.yaml", tmp_path, monkeypatch)
    run = outputs["train.py"]
    (epoch,) = history_of(run)
    for key in ("fg_iou", "fg_fscore", "val_iou", "val_fscore"):
        assert 0.0 <= epoch[key] <= 1.0, key
    # F1 of argmax masks is the dice; IoU = dice / (2 - dice) holds per class, so the mean IoU is at most that.
    assert epoch["fg_fscore"] == pytest.approx(epoch["fg_dice"], abs=1e-6)
    assert epoch["val_fscore"] == pytest.approx(epoch["val_dice"], abs=1e-6)
    assert epoch["fg_iou"] <= epoch["fg_dice"] / (2 - epoch["fg_dice"]) + 1e-6
    assert (run / "curves.png").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["augment"] == "strong"


@pytest.mark.slow
def test_pancreas_recipe_trains_on_windowed_equalised_patches(tmp_path, monkeypatch):
    from utils.train.distribute import read_events

    outputs = run_recipe("configs/pancreas_3d_patches.yaml", tmp_path, monkeypatch)
    data = outputs["data_gen.py"]
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["preprocessing"]["window"] == [-100.0, 240.0]
    assert manifest["preprocessing"]["equalize"] == "hist"
    patches = np.load(data / "patches" / "train_images.npy", mmap_mode="r")
    assert patches.shape[1:] == (32, 96, 96, 1) and 0.0 <= patches.min() and patches.max() <= 1.0
    labels = np.load(data / "patches" / "train_labels.npy")  # one training slab, 4 patches: 1 : 1.5 puts
    assert len(labels) == 4 and sum(bool((patch > 0).any()) for patch in labels) >= 2  # round(4 / 2.5) on pancreas
    events = read_events(outputs["train.py"] / "tensorboard")
    assert any(tag.startswith("val_slices/") and plugin == "images" for tag, plugin, _ in events), events


@pytest.mark.slow
def test_liver_spleen_recipe_downsamples_and_draws_overlays(tmp_path, monkeypatch):
    outputs = run_recipe("configs/liver_spleen_2d.yaml", tmp_path, monkeypatch)
    manifest = json.loads((outputs["data_gen.py"] / "manifest.json").read_text())
    assert manifest["preprocessing"]["downsample"] == 2
    assert manifest["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    results = outputs["evaluation.py"]
    (case,) = json.loads((outputs["data_gen.py"] / "splits.json").read_text())["test"]
    source = nib.load(tmp_path / "work" / "Task03_Liver" / "imagesTr" / f"{case}.nii.gz")
    assert nib.load(results / "masks" / f"{case}.nii.gz").shape == source.shape  # back at full resolution
    assert (results / "overlays" / f"{case}.png").is_file() and (results / "overlays" / f"{case}.gif").is_file()


@pytest.mark.slow
def test_brats_recipe_scores_the_regions(tmp_path, monkeypatch):
    outputs = run_recipe("configs/brats_resunet.yaml", tmp_path, monkeypatch)
    manifest = json.loads((outputs["data_gen.py"] / "manifest.json").read_text())
    assert len(manifest["channels"]) == 4 and manifest["label_values"] == [0, 1, 2, 4]
    with open(outputs["evaluation.py"] / "metrics.csv") as handle:
        scored = {row["label"] for row in csv.DictReader(handle)}
    assert {"whole_tumour", "tumour_core", "enhancing_tumour"} <= scored, scored
