"""Validation after each epoch logs the IoU and F-score that ``--metrics`` asks for, with the dice's rules; a caller's
own callbacks given to ``train()`` see the validation scores and add columns to ``history.csv``.

A constant network (class 1 everywhere) on the synthetic dataset makes every count follow from the labels: class 1
has no false negatives and class 2 no prediction, so the scores can be written down by hand.
"""

import keras
import numpy as np
import pytest

from utils.metrics import finite_mean
from utils.prepared import PreparedDataset
from utils.runs import TrainingConfig
from utils.train.callbacks import Validation

NAN = float("nan")


def everything_is_class_1(patch):
    inputs = keras.Input((*patch, 1))
    bias = keras.initializers.Constant([0.0, 5.0, 0.0])
    outputs = keras.layers.Conv3D(3, 1, activation="softmax", kernel_initializer="zeros", bias_initializer=bias)(inputs)
    return keras.Model(inputs, outputs)


def validation(dataset, mode):
    config = TrainingConfig(
        model="unet3d", patch_size=[8, 16, 16], batch_size=2, steps_per_epoch=5, num_classes=3, num_channels=1
    )
    config.validation, config.metrics = mode, ["iou", "fscore"]
    callback = Validation(dataset, dataset.split("val"), config)
    callback.set_model(everything_is_class_1(config.patch_size))
    return callback.evaluate()


def test_whole_volumes_give_each_case_its_mean_over_classes(synthetic):
    dataset = PreparedDataset(synthetic[1])
    logs = validation(dataset, "volumes")
    iou, dice = [], []
    for case in dataset.split("val"):
        truth = np.asarray(dataset.label(case))
        voxels, core, rim = truth.size, np.sum(truth == 1), np.sum(truth == 2)
        absent = NAN if rim == 0 else 0.0  # class 2: never predicted; both empty is left out of the mean
        iou.append(finite_mean([core / voxels, absent]))  # class 1: TP |T1|, union every voxel
        dice.append(finite_mean([2 * core / (voxels + core), absent]))
    assert logs["val_iou"] == pytest.approx(np.mean(iou), rel=1e-9)
    assert logs["val_fscore"] == pytest.approx(np.mean(dice), rel=1e-9) == pytest.approx(logs["val_dice"])


def test_validation_patches_sum_the_counts_before_the_ratio(synthetic):
    logs = validation(PreparedDataset(synthetic[1]), "patches")
    per_class = [logs["val_dice_1"], logs["val_dice_2"]]
    assert per_class[1] == 0.0  # class 2 is in the patches (half of them centred on foreground) but never predicted
    # with the counts summed, IoU = dice / (2 - dice) holds exactly for every class
    assert logs["val_iou"] == pytest.approx(finite_mean([d / (2 - d) for d in per_class]), rel=1e-9)
    assert logs["val_fscore"] == pytest.approx(logs["val_dice"], rel=1e-12)


class EpochRecorder(keras.callbacks.Callback):
    """A caller's callback: keeps the logs it sees, adds its own column and saves the weights of every epoch."""

    def __init__(self, folder):
        super().__init__()
        self.folder, self.seen = folder, []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(dict(logs))
        logs["val_dice_twice"] = 2 * logs["val_dice"]
        self.model.save_weights(self.folder / f"epoch_{epoch + 1}.weights.h5")


def test_a_callers_callbacks_see_validation_and_write_to_the_history(prepared_sample, tmp_path):
    from utils.runs import load_model
    from utils.train.callbacks import read_history
    from utils.train.loop import train

    run, recorder = tmp_path / "run", EpochRecorder(tmp_path)
    settings = {"data": str(prepared_sample), "output": str(run), "patch_size": [16, 16, 16], "batch_size": 2}
    settings.update(steps_per_epoch=2, epochs=2, tensorboard=False)
    train(settings, callbacks=[recorder])
    history = read_history(run / "history.csv")
    assert [row["val_dice"] for row in history] == pytest.approx([logs["val_dice"] for logs in recorder.seen])
    assert [row["val_dice_twice"] for row in history] == pytest.approx([2 * row["val_dice"] for row in history])
    last = load_model(run / "last.keras")
    saved = keras.models.clone_model(last)
    saved.load_weights(tmp_path / "epoch_2.weights.h5")
    for mine, theirs in zip(saved.get_weights(), last.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
