"""The callbacks of a training run: whole-volume validation, the learning-rate schedule, TensorBoard pictures, and
the recorder that writes checkpoints, ``state.json``, ``history.csv`` and ``curves.png`` after each epoch and applies
the time limit and early stopping.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np

from utils import fileio
from utils.backbones import encoder_of
from utils.inference import model_predictor, predict_labels
from utils.metrics import confusion_counts, finite_mean, mean_foreground_dice, score_from_counts
from utils.plots import plot_curves, side_by_side
from utils.prepared import PreparedDataset
from utils.runs import TrainingConfig, save_model
from utils.train.config import STATE_FILE
from utils.train.distribute import Distribution
from utils.train.sampling import PatchSampler

log = logging.getLogger(__name__)


VALIDATION_SHARE = 0.2  # validation may cost at most this share of an epoch's training work (``auto``)


def validation_mode(config: TrainingConfig, dataset: PreparedDataset, case_ids: Sequence[str]) -> str:
    """``volumes`` or ``patches``: the configured ``validation``, or for ``auto`` whole volumes when predicting them
    costs at most :data:`VALIDATION_SHARE` of an epoch's training work, else patches.

    The work is counted in samples through the network: a training step is about three forward passes per sample
    (forward and backward), a whole volume is one pass per sliding window. MSD Hippocampus (one window per case) is
    validated on whole volumes; a hundred 512 x 512 x 200 CT cases, hundreds of windows each, on patches.
    """
    if config.validation != "auto":
        return config.validation
    patch = np.asarray(config.patch_size)
    step = np.maximum(np.floor(patch * (1 - config.val_overlap)), 1)
    windows = 0
    for case_id in case_ids:
        shape = dataset.image(case_id).shape[:3]  # (Z, Y, X)
        planes, extent = (shape[0], shape[1:]) if len(patch) == 2 else (1, shape)  # a 2D model sees every slice
        windows += planes * int(np.prod(np.ceil(np.maximum(np.asarray(extent) - patch, 0) / step) + 1))
    training = config.steps_per_epoch * config.batch_size * 3
    return "volumes" if windows <= VALIDATION_SHARE * training else "patches"


class Validation(keras.callbacks.Callback):
    """After each epoch, score the validation cases and log ``val_dice`` (mean foreground dice) and ``val_dice_<k>``
    per class, and ``val_iou`` / ``val_fscore`` (foreground means, as the dice) when ``metrics`` names them.

    ``volumes``: every validation volume is predicted whole (:func:`utils.inference.predict_volume`) and the dice is
    averaged over cases. ``patches`` (large datasets, as nnU-Net does during training): the same seeded patches of the
    validation cases every epoch (``ceil(steps_per_epoch / 5)`` batches, half of them centred on foreground), with
    true and false positives and negatives summed over all patches before the dice is taken; ``evaluation.py`` then
    scores whole volumes. Keeps, for the first ``num_examples`` cases (patches), the axial slice with the most
    foreground as ``(image, truth, prediction)``. ``distributed``: the model lives under a distribution strategy, so
    it is called eagerly (:func:`utils.inference.model_predictor`)."""

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
        self.mode = validation_mode(config, dataset, self.case_ids) if self.case_ids else "volumes"

    def evaluate(self) -> dict:
        return self.evaluate_volumes() if self.mode == "volumes" else self.evaluate_patches()

    def evaluate_patches(self) -> dict:
        num_classes, batches = self.config.num_classes, -(-self.config.steps_per_epoch // 5)
        sampler = PatchSampler(
            self.dataset.image,
            self.dataset.label,
            self.case_ids,
            self.config.patch_size,
            num_classes,
            batch_size=self.config.batch_size,
            steps_per_epoch=batches,
            foreground_ratio=0.5,
            seed=self.config.seed + 7919,
        )
        predict = model_predictor(self.model, distributed=self.distributed)
        counts = np.zeros((3, num_classes))  # true positives, false positives, false negatives per class
        for step in range(batches):
            images, truth = sampler.batch(0, step)
            pred = np.argmax(predict(images), -1)
            for k in range(1, num_classes):
                p, t = pred == k, truth == k
                counts[:, k] += [np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)]
            for i in range(min(self.num_examples - len(self.examples), len(images))):
                z = int(np.argmax((truth[i] > 0).reshape(truth.shape[1], -1).sum(axis=1))) if pred.ndim == 4 else None
                view = (images[i], truth[i], pred[i]) if z is None else (images[i][z], truth[i][z], pred[i][z])
                self.examples[f"patch_{len(self.examples)}"] = view
        denominator = 2 * counts[0] + counts[1] + counts[2]
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(denominator > 0, 2 * counts[0] / denominator, np.nan)[1:]
        logs = {"val_dice": finite_mean(dice)}
        logs.update({f"val_dice_{k}": float(value) for k, value in enumerate(dice, start=1)})
        logs.update(
            {f"val_{name}": finite_mean(score_from_counts(name, counts[:, 1:])) for name in self.config.metrics}
        )
        return logs

    def evaluate_volumes(self) -> dict:
        num_classes = self.config.num_classes
        means, per_class = [], []
        extra = {name: [] for name in self.config.metrics}  # --metrics: each case's mean over its classes
        for i, case_id in enumerate(self.case_ids):
            image, truth = self.dataset.image(case_id), np.asarray(self.dataset.label(case_id))
            pred = predict_labels(  # arg-maxed slab by slab: a large volume's probabilities are never held whole
                self.model,
                image,
                self.config.patch_size,
                num_classes,
                image.shape[:3],
                overlap=self.config.val_overlap,
                batch_size=self.config.batch_size,
                distributed=self.distributed,
            )
            mean, classes = mean_foreground_dice(pred, truth, num_classes)
            means.append(mean)
            per_class.append(classes)
            counts = confusion_counts(pred, truth, num_classes)[:, 1:]
            for name, values in extra.items():
                values.append(finite_mean(score_from_counts(name, counts)))
            if i < self.num_examples:
                z = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(axis=1)))
                self.examples[case_id] = (np.asarray(image[z]), truth[z], pred[z])
        logs = {"val_dice": float(np.nanmean(means)) if np.isfinite(means).any() else float("nan")}
        for k, values in enumerate(np.array(per_class, dtype=float).T, start=1):
            logs[f"val_dice_{k}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        logs.update({f"val_{name}": finite_mean(values) for name, values in extra.items()})
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


class EncoderFreeze(keras.callbacks.Callback):
    """Keeps a pretrained encoder (the model's nested ``encoder``, utils/backbones.py) fixed for the first ``epochs``
    epochs, then trains it with the rest.

    At the start of each epoch the encoder is made trainable exactly when ``epoch >= epochs``. When that changes, the
    model is recompiled from its own compile config (the same loss, metrics and optimizer settings), as Keras requires
    after a change of ``trainable``: the new optimizer's slots cover exactly the weights that now train, and its
    learning rate is the schedule's (:class:`LearningRate` sets it every step). A frozen encoder's batch normalisation
    runs in inference mode, so none of its weights or statistics change. The encoder's ``trainable`` is saved in the
    ``.keras`` files with an optimizer built for it, so ``--resume`` continues frozen (and with its optimizer state)
    in an epoch below ``epochs`` and unfreezes on time.

    Args:
        epochs: epochs with a frozen encoder.
        scope: the distribution strategy's scope, in which the optimizer is made.
    """

    def __init__(self, epochs: int, scope: Callable = contextlib.nullcontext):
        super().__init__()
        self.epochs, self.scope = int(epochs), scope

    def on_epoch_begin(self, epoch, logs=None):
        encoder = encoder_of(self.model)
        trainable = epoch >= self.epochs
        if encoder is None or encoder.trainable == trainable:
            return
        encoder.trainable = trainable
        with self.scope():
            self.model.compile_from_config(self.model.get_compile_config())
        self.model.make_train_function(force=True)
        log.info("encoder %s from epoch %d", "trains" if trainable else "frozen", epoch + 1)


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
        if improved:
            self.state.update(best=float(score), best_epoch=epoch)
        elapsed = self.distribution.agree(self.clock())
        row = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}, "steps": self.steps_done}
        row["time_s"] = round(elapsed, 1)
        self.history.append(row)
        self.state.update(epoch=epoch + 1, elapsed_s=elapsed, schedule=self.schedule.state)
        if self.distribution.is_chief:
            self._save_checkpoint(improved, epoch)
            try:
                plot_curves(self.history, self.run_dir / "curves.png")
            except fileio.OutputError as error:  # a picture: training goes on, the next checkpoint needs the space
                log.warning("curves.png not updated: %s", error.strerror)
        now = self.clock()
        epoch_end = max(float(self.state.get("epoch_end_s", 0.0)), now - self.last_step_end)
        if self.limit and not self.model.stop_training and self._out_of_time(now, epoch_end):
            log.info("time limit reached after epoch %d (%.1f min)", epoch + 1, elapsed / 60)
            self.model.stop_training = True
        patience = self.config.early_stopping
        if patience > 0 and epoch - int(self.state.get("best_epoch", epoch)) >= patience:
            log.info("early stopping: no better score for %d epochs", patience)
            self.model.stop_training = True

    def _save_checkpoint(self, improved: bool, epoch: int) -> None:
        """``model.keras`` (when the score improved), ``last.keras``, ``history.csv`` and ``state.json`` written as one
        :func:`utils.fileio.atomic_group`: every file is complete before any replaces its previous version, so a disk
        that fills during the writes leaves the previous epoch's set whole, and ``--resume`` continues from it.

        Raises:
            fileio.OutputError: a file could not be written (a full disk), saying what the run folder still holds.
        """
        try:
            with fileio.atomic_group():
                if improved:
                    save_model(self.model, self.run_dir / "model.keras")
                save_model(self.model, self.run_dir / "last.keras")
                write_history(self.run_dir / "history.csv", self.history)
                fileio.write_json(self.run_dir / STATE_FILE, self.state)
        except fileio.OutputError as error:
            kept = f"its checkpoint after {epoch} complete epoch(s)" if epoch else "no checkpoint yet"
            raise fileio.OutputError(
                error.errno,
                f"{error.strerror}; {self.run_dir} keeps {kept}: free some space, then continue with train.py --resume",
            ) from error


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
