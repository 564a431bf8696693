"""The callbacks of a training run: whole-volume validation, the learning-rate schedule, TensorBoard pictures, and
the recorder that writes checkpoints, ``state.json``, ``history.csv`` and ``curves.png`` after each epoch and applies
the time limit and early stopping.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from utils import fileio
from utils.inference import predict_volume
from utils.metrics import mean_foreground_dice
from utils.plots import plot_curves, side_by_side
from utils.prepared import PreparedDataset
from utils.runs import TrainingConfig, save_model
from utils.train.config import STATE_FILE
from utils.train.distribute import Distribution

log = logging.getLogger(__name__)


class Validation(keras.callbacks.Callback):
    """After each epoch, predict every validation volume whole (:func:`utils.inference.predict_volume`) and log
    ``val_dice`` (mean foreground dice over cases) and ``val_dice_<k>`` per class. Keeps, for the first
    ``num_examples`` cases, the axial slice with the most foreground as ``(image, truth, prediction)``. ``distributed``:
    the model lives under a distribution strategy, so it is called eagerly (:func:`utils.inference.model_predictor`)."""

    def __init__(
        self,
        dataset: PreparedDataset,
        case_ids: Sequence[str],
        config: TrainingConfig,
        num_examples: int = 0,
        distributed: bool = False,
    ):
        super().__init__()
        self.dataset, self.case_ids, self.config = dataset, list(case_ids), config
        self.num_examples, self.distributed = num_examples, distributed
        self.examples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def evaluate(self) -> dict:
        num_classes = self.config.num_classes
        means, per_class = [], []
        for i, case_id in enumerate(self.case_ids):
            image, truth = self.dataset.image(case_id), np.asarray(self.dataset.label(case_id))
            probabilities = predict_volume(
                self.model,
                image,
                self.config.patch_size,
                num_classes,
                overlap=self.config.val_overlap,
                batch_size=self.config.batch_size,
                distributed=self.distributed,
            )
            pred = np.argmax(probabilities, -1)
            mean, classes = mean_foreground_dice(pred, truth, num_classes)
            means.append(mean)
            per_class.append(classes)
            if i < self.num_examples:
                z = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(axis=1)))
                self.examples[case_id] = (np.asarray(image[z]), truth[z], pred[z])
        logs = {"val_dice": float(np.nanmean(means)) if np.isfinite(means).any() else float("nan")}
        for k, values in enumerate(np.array(per_class, dtype=float).T, start=1):
            logs[f"val_dice_{k}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        return logs

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.case_ids:
            logs.update(self.evaluate())


def monitored_score(logs: dict) -> float:
    """The score that picks the best model: ``val_dice``, else the training foreground dice."""
    if "val_dice" in logs:
        return float(logs["val_dice"])
    for key, value in logs.items():
        if key.endswith("fg_dice") and not key.startswith("val_"):
            return float(value)
    return float("nan")


class LearningRate(keras.callbacks.Callback):
    """The learning rate of every step: warm-up, then ``poly`` ``(1 - p) ** 0.9`` (nnU-Net), ``cosine``
    ``(1 + cos(pi p)) / 2``, ``plateau`` (times ``plateau_factor`` after ``plateau_patience`` epochs without a better
    score) or ``none``.

    The progress ``p`` is the larger of the fraction of epochs done and, under a time limit, the fraction of the time
    used. Within an epoch the time is extrapolated from the time at its start and the previous epoch's step time, so
    every host of a distributed run computes the same rate, and the rate is a function of ``state`` and the step.
    ``state`` (plateau scale, best score, epochs without improvement, last step time) goes to ``state.json``.
    """

    def __init__(
        self, config: TrainingConfig, base_lr: float, clock: Callable[[], float], distribution: Distribution, state
    ):
        super().__init__()
        self.config, self.base_lr, self.clock, self.distribution = config, base_lr, clock, distribution
        self.limit = float(config.time_limit) * 60 if config.time_limit else None
        self.state = {"scale": 1.0, "best": float("nan"), "wait": 0, "step_time": 0.0, **(state or {})}
        self.epoch, self.epoch_start = 0, 0.0

    def progress(self, batch: int) -> float:
        steps = self.config.steps_per_epoch
        done = (self.epoch + batch / steps) / self.config.epochs
        if self.limit:
            done = max(done, (self.epoch_start + batch * self.state["step_time"]) / self.limit)
        return float(min(done, 1.0))

    def rate(self, batch: int) -> float:
        schedule, progress = self.config.schedule, self.progress(batch)
        if schedule == "poly":
            factor = (1 - progress) ** self.config.poly_exponent
        elif schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = self.state["scale"]
        warmup = self.config.warmup_epochs
        epochs_done = self.epoch + (batch + 1) / self.config.steps_per_epoch
        if warmup > 0 and epochs_done < warmup:
            factor *= epochs_done / warmup
        return max(self.base_lr * factor, self.config.min_lr)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_start = self.distribution.agree(self.clock())

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.rate(batch)

    def on_epoch_end(self, epoch, logs=None):
        steps = self.config.steps_per_epoch
        train_time = self.distribution.agree(self.clock()) - self.epoch_start
        self.state["step_time"] = float(train_time / steps)
        if logs is None:
            return
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.config.schedule == "plateau":
            score = monitored_score(logs)
            if np.isfinite(score) and not (score <= self.state["best"]):
                self.state.update(best=float(score), wait=0)
            else:
                self.state["wait"] += 1
                if self.state["wait"] >= self.config.plateau_patience:
                    self.state.update(scale=self.state["scale"] * self.config.plateau_factor, wait=0)
                    log.info("plateau: learning rate now %.3g", self.base_lr * self.state["scale"])


class TensorBoard(keras.callbacks.Callback):
    """Scalars (every logged value and the learning rate) and ``image | truth | prediction`` pictures of the
    validation slices, each epoch, into ``tensorboard/`` (see :func:`utils.train.distribute.summary_writer`)."""

    def __init__(self, writer, validation: Validation):
        super().__init__()
        self.writer, self.validation = writer, validation

    def on_epoch_end(self, epoch, logs=None):
        scalars = {("val/" if k.startswith("val_") else "train/") + k: v for k, v in (logs or {}).items()}
        self.writer.scalars(scalars, step=epoch)
        pictures = {f"val_slices/{case}": side_by_side(*views) for case, views in self.validation.examples.items()}
        if pictures:
            self.writer.images(pictures, step=epoch)

    def on_train_end(self, logs=None):
        self.writer.close()


class RunRecorder(keras.callbacks.Callback):
    """After each epoch: checkpoints (best and last), ``state.json``, ``history.csv``, ``curves.png`` (chief host
    only), then early stopping (``patience`` epochs without a better score).

    The time limit is kept to the step: after every step, training stops when one more step (this epoch's mean step
    time) and the end of an epoch (validation, pictures and checkpoints, as long as the last one took) would not fit
    in the time left. The epoch is then cut there; it is validated and saved like any other, and ``history.csv``
    records how many steps it had. Every host takes the same decision."""

    def __init__(
        self,
        run_dir: Path,
        history: list[dict],
        state: dict,
        clock,
        config: TrainingConfig,
        schedule: LearningRate,
        distribution: Distribution,
    ):
        super().__init__()
        self.run_dir, self.history, self.state = run_dir, history, state
        self.clock, self.config, self.schedule, self.distribution = clock, config, schedule, distribution
        self.limit = float(config.time_limit) * 60 if config.time_limit else None
        self.epoch_start = self.last_step_end = 0.0
        self.steps_done = 0

    @property
    def best(self) -> float:
        return float(self.state["best"])

    def on_epoch_begin(self, epoch, logs=None):
        now = self.clock()
        if self.steps_done:  # how long the end of the previous epoch took: validation, pictures, checkpoints
            self.state["epoch_end_s"] = now - self.last_step_end
        self.epoch_start = self.last_step_end = now
        self.steps_done = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done = batch + 1
        self.last_step_end = self.clock()
        if self.limit and self._out_of_time(self.last_step_end, float(self.state.get("epoch_end_s", 0.0))):
            log.info(
                "time limit: epoch %d cut after %d of %d steps (%.1f min)",
                len(self.history) + 1,
                self.steps_done,
                self.config.steps_per_epoch,
                self.last_step_end / 60,
            )
            self.model.stop_training = True

    def _out_of_time(self, now: float, epoch_end: float) -> bool:
        """Whether one more step (this epoch's mean) and an epoch end (``epoch_end`` seconds) would overrun the
        limit; the chief decides for all hosts."""
        step = (self.last_step_end - self.epoch_start) / max(self.steps_done, 1)
        return self.distribution.agree(now) + step + epoch_end > self.limit

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        score = monitored_score(logs)
        improved = np.isfinite(score) and (not np.isfinite(self.best) or score > self.best)
        chief = self.distribution.is_chief
        if improved:
            self.state.update(best=float(score), best_epoch=epoch)
            if chief:
                save_model(self.model, self.run_dir / "model.keras")
        elapsed = self.distribution.agree(self.clock())
        row = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}, "steps": self.steps_done}
        row["time_s"] = round(elapsed, 1)
        self.history.append(row)
        self.state.update(epoch=epoch + 1, elapsed_s=elapsed, schedule=self.schedule.state)
        if chief:
            save_model(self.model, self.run_dir / "last.keras")
            write_history(self.run_dir / "history.csv", self.history)
            fileio.write_json(self.run_dir / STATE_FILE, self.state)
            plot_curves(self.history, self.run_dir / "curves.png")
        now = self.clock()
        epoch_end = max(float(self.state.get("epoch_end_s", 0.0)), now - self.last_step_end)
        if self.limit and not self.model.stop_training and self._out_of_time(now, epoch_end):
            log.info("time limit reached after epoch %d (%.1f min)", epoch + 1, elapsed / 60)
            self.model.stop_training = True
        patience = self.config.early_stopping
        if patience > 0 and epoch - int(self.state.get("best_epoch", epoch)) >= patience:
            log.info("early stopping: no better score for %d epochs", patience)
            self.model.stop_training = True


def write_history(path: Path, history: list[dict]) -> None:
    """Write the per-epoch log as CSV (columns: the union of every epoch's keys)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    fileio.write_text(path, buffer.getvalue())


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = [
            {k: (float(v) if v not in ("", None) else float("nan")) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]
    for row in rows:
        if "epoch" in row:
            row["epoch"] = int(row["epoch"])
    return rows
