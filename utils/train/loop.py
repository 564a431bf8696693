"""The training loop: build and compile the model, make the sampler, fit with the callbacks, resume.

The run folder (docs/ARCHITECTURE.md) receives ``config.json`` (every resolved setting, the plan, backend and
versions), ``model.keras`` (best validation mean foreground dice), ``last.keras`` (with optimizer state) plus
``state.json`` (epochs done, best score, time used, learning-rate schedule state) for ``--resume``, ``history.csv``,
``curves.png``, ``model_summary.txt``, ``train.log`` (what was logged) and ``tensorboard/``. Every file is written
atomically, so a run killed at any moment resumes from its last complete epoch and then sees the batches and learning
rates the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import keras

import model as model_zoo
from utils import console, device, fileio
from utils.losses import deep_supervision_compile_args, get_loss
from utils.metrics import training_metrics
from utils.prepared import PreparedDataset
from utils.runs import TrainingConfig, dataset_record, load_model, write_dataset_record
from utils.settings import TRAINING
from utils.train.augment import Augmenter, augmentation_settings
from utils.train.callbacks import (
    EncoderFreeze,
    LearningRate,
    RunRecorder,
    TensorBoard,
    Validation,
    read_history,
)
from utils.train.config import STATE_FILE, _resume_config, check_settings, fold_run, resolve_config, stack_paths
from utils.train.distribute import (
    Distribution,
    enable_determinism,
    make_distribution,
    mixed_precision_policy,
    summary_writer,
)
from utils.train.planning import jit_compile, output_margin
from utils.train.sampling import PatchSampler, StackSampler
from utils.train.workers import guarded

log = logging.getLogger(__name__)


def build(config: TrainingConfig, num_channels: int, num_classes: int) -> keras.Model:
    """Build the configured model for the configured patch size."""
    shape = (*config.patch_size, num_channels)
    if model_zoo.is_user_builder(config.model):
        return model_zoo.build_user_model(config.model, shape, num_classes, config.model_source, **config.model_args)
    backbone = {"backbone": config.backbone, "encoder_weights": config.encoder_weights} if config.backbone else {}
    return model_zoo.build_model(config.model, shape, num_classes, **config.model_args, **backbone)


def make_optimizer(config: TrainingConfig, lr: float) -> keras.optimizers.Optimizer:
    """Adam, or SGD with Nesterov momentum; ``grad_clip`` clips the global gradient norm (nnU-Net: 12)."""
    options = {"learning_rate": lr, "global_clipnorm": config.grad_clip}
    if config.weight_decay:
        options["weight_decay"] = config.weight_decay
    if config.optimizer == "adam":
        return keras.optimizers.Adam(**options)
    return keras.optimizers.SGD(momentum=config.momentum, nesterov=True, **options)


def compile_model(model: keras.Model, config: TrainingConfig, lr: float) -> list[tuple[int, ...]] | None:
    """Compile with the configured loss; a model with several outputs (deep supervision) gets one weighted loss per
    output. Returns the target stride of each output, or ``None`` for a single output."""
    optimizer = make_optimizer(config, lr)
    outputs = model.outputs
    if len(outputs) == 1:
        model.compile(
            optimizer=optimizer,
            loss=get_loss(config.loss, **config.loss_args),
            metrics=training_metrics(config.num_classes, config.metrics),
            jit_compile=jit_compile(config.model),
        )
        return None
    model.compile(
        optimizer=optimizer,
        metrics=[training_metrics(config.num_classes, config.metrics)] + [[] for _ in outputs[1:]],
        **deep_supervision_compile_args(config.loss, len(outputs), **config.loss_args),
    )
    return output_strides(model, config.patch_size)


def output_strides(model: keras.Model, patch_size: Sequence[int]) -> list[tuple[int, ...]] | None:
    if len(model.outputs) == 1:
        return None
    return [tuple(p // s for p, s in zip(patch_size, out.shape[1:-1], strict=True)) for out in model.outputs]


def make_sampler(
    config: TrainingConfig, dataset: PreparedDataset, distribution: Distribution, start_epoch: int, strides
):
    """The training sampler of the configured ``source``; under ``tf.distribute`` each replica draws its own
    ``batch_size``, else this process draws the batch of its local replicas."""
    ndim = len(config.patch_size)
    augment = None
    if config.augment != "none" or config.augmentation:
        augment = Augmenter(augmentation_settings(config.augment, ndim, config.augmentation), ndim)
    per_call = config.batch_size * (1 if distribution.strategy is not None else distribution.local_replicas)
    options = dict(
        batch_size=per_call,
        steps_per_epoch=config.steps_per_epoch,
        foreground_ratio=config.foreground_ratio,
        augment=augment,
        seed=config.seed,
        start_epoch=start_epoch,
        shard=distribution.worker_index,
        target_strides=strides,
        random_padding=config.pad_placement == "random",
        target_margin=output_margin(config.model, config.model_args),
    )
    if distribution.strategy is None and config.workers > 1:
        options.update(
            workers=config.workers,
            use_multiprocessing=config.worker_mode == "process",
            max_queue_size=2 * config.workers,
        )
    if config.source == "volumes":
        train_ids = dataset.split("train")
        labelled = [c for c in train_ids if dataset.cases[c].get("label")]
        if not labelled:
            raise ValueError(f"{dataset.path / 'splits.json'}: the train split holds no labelled case")
        return PatchSampler(dataset.image, dataset.label, labelled, config.patch_size, config.num_classes, **options)
    images, labels = stack_paths(dataset, config.source, "train")
    return StackSampler(
        fileio.load_npy(images), fileio.load_npy(labels), config.patch_size, config.num_classes, **options
    )


def train(
    config_overrides: dict, command: str = "train.py", callbacks: Sequence[keras.callbacks.Callback] = ()
) -> TrainingConfig:
    """Train a model as configured and write the run folder; returns the resolved config with the best score.

    Args:
        config_overrides: settings from flags or a config file (keys of :data:`utils.settings.TRAINING`); ``data``
            and ``output`` are required, ``resume`` continues the run in ``output``.
        command: how the run was started, recorded in the run folder's lock (:func:`utils.fileio.folder_lock`),
            which the chief holds while it trains.
        callbacks: the caller's own Keras callbacks (Python use; ``train.py`` passes none). Each epoch they run
            after validation, so ``logs`` already holds ``val_dice``, and before the checkpoints, so what they add to
            ``logs`` is written to ``history.csv``; the best model is still chosen by ``val_dice``.

    Raises:
        FileNotFoundError: the prepared dataset is missing; or ``resume`` without a previous run.
        ValueError: a bad setting, or a run folder made for another dataset.
        fileio.FolderInUse: another run writes the run folder.
    """
    check_settings(config_overrides)
    dataset, run_dir = fold_run(config_overrides, PreparedDataset(config_overrides["data"]))
    resume = bool(config_overrides.get("resume"))
    saved = _resume_config(run_dir, dataset, config_overrides) if resume else None
    if saved is not None and saved.fold is not None and config_overrides.get("fold") is None:
        dataset = dataset.with_fold(saved.fold)  # resuming runs/NAME/fold_I itself
    strategy = saved.strategy if saved else config_overrides.get("strategy") or TRAINING["strategy"].default
    distribution = make_distribution(strategy)  # before anything starts TensorFlow's runtime (multiworker needs it)
    machine = announce_device()
    previous_policy = keras.config.dtype_policy()
    lock = fileio.folder_lock(run_dir, command) if distribution.is_chief else contextlib.nullcontext()
    log_file = (
        console.log_file(run_dir / "train.log", header=(device.first_line(machine),))
        if distribution.is_chief
        else contextlib.nullcontext()
    )
    try:
        with lock, log_file:
            return _train(config_overrides, dataset, run_dir, saved, distribution, machine, callbacks)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if keras.backend.backend() == "jax" and distribution.name != "default":
            keras.distribution.set_distribution(None)


def announce_device() -> dict:
    """Log which device(s) training runs on (the run's first line) and warn when a GPU is expected but the backend
    sees none; returns the record stored as ``device`` in ``config.json``."""
    backend = keras.backend.backend()
    record = device.describe(backend)
    log.info(device.first_line(record))
    expected = device.gpu_expected()
    if expected and record["devices"] == ["cpu"]:
        log.warning(
            "a GPU is expected here (%s) but the %s backend sees none: training runs on the CPU with the CPU recipe "
            "(install the backend's CUDA build, e.g. pip install 'tensorflow[and-cuda]')",
            expected,
            backend,
        )
    return record


def _train(
    overrides: dict,
    dataset: PreparedDataset,
    run_dir: Path,
    saved: TrainingConfig | None,
    distribution: Distribution,
    machine: dict,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainingConfig:
    accelerators = [name for name in machine["devices"] if name != "cpu"]
    config = saved or resolve_config(overrides, dataset, distribution.num_replicas, accelerators)
    config.device = machine
    if not saved:
        log.info(describe_plan(config))
    config.output = str(run_dir)
    if config.deterministic:
        enable_determinism()
    keras.utils.set_random_seed(int(config.seed))
    if config.mixed_precision:
        config.precision_policy = config.precision_policy or mixed_precision_policy()
        keras.config.set_dtype_policy(config.precision_policy)
    lr = distribution.scaled_lr(config.lr, config.lr_scaling)
    fresh = {"epoch": 0, "best": float("nan"), "elapsed_s": 0.0, "schedule": {}}
    state = {**fresh, **fileio.read_json(run_dir / STATE_FILE)} if saved else fresh
    with distribution.scope():
        if saved:
            model = load_model(run_dir / "last.keras", config.model, config.model_source)
            strides = output_strides(model, config.patch_size)
        else:
            model = build(config, dataset.num_channels, dataset.num_classes)
            strides = compile_model(model, config, lr)
    if distribution.is_chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_temporaries(run_dir)  # what a run killed while writing a checkpoint left
        fileio.write_json(run_dir / "config.json", config.to_json())
        if not saved or dataset_record(run_dir) is None:  # a resumed run keeps the record it was started with
            write_dataset_record(run_dir, dataset)
        fileio.write_text(run_dir / "model_summary.txt", model_zoo.model_summary_text(model))

    sampler = make_sampler(config, dataset, distribution, int(state["epoch"]), strides)
    started = time.monotonic() - float(state["elapsed_s"])

    def clock() -> float:
        return time.monotonic() - started

    history = read_history(run_dir / "history.csv")[: int(state["epoch"])] if saved else []
    schedule = LearningRate(config, lr, clock, distribution, state.get("schedule"))
    examples = config.tensorboard_images if config.tensorboard else 0
    validation = Validation(
        dataset, dataset.split("val"), config, num_examples=examples, distributed=distribution.name != "default"
    )
    if validation.case_ids:
        log.info("Validation after each epoch: %s of %d cases", validation.mode, len(validation.case_ids))
    recorder = RunRecorder(run_dir, history, state, clock, config, schedule, distribution)
    callbacks = [schedule, validation, *extra_callbacks]
    if config.freeze_encoder_epochs:
        callbacks.insert(0, EncoderFreeze(config.freeze_encoder_epochs, distribution.scope))
    writer = summary_writer(run_dir / "tensorboard") if config.tensorboard and distribution.is_chief else None
    if writer is not None:
        callbacks.append(TensorBoard(writer, validation))
    callbacks.append(recorder)
    limit = float(config.time_limit) * 60 if config.time_limit else None
    if state["epoch"] < config.epochs and not (limit and clock() >= limit) and not _stopped_early(state, config):
        with guarded(distribution.input_for_fit(sampler, config.workers)) as (data, watch):
            model.fit(
                data,
                epochs=config.epochs,
                steps_per_epoch=config.steps_per_epoch,
                initial_epoch=int(state["epoch"]),
                callbacks=[*callbacks, *watch],
                shuffle=False,
                verbose=2 if os.environ.get("CI") else "auto",
            )
    config.best_val_dice = recorder.best
    config.epochs_done = int(recorder.state["epoch"])
    if distribution.is_chief:  # the record written at the start, now with its outcome
        fileio.write_json(run_dir / "config.json", config.to_json())
    return config


def describe_plan(config: TrainingConfig) -> str:
    """The plan in one line: recipe, network, patch, batch, optimisation, augmentation, precision and workers."""
    args = config.model_args
    shown = [f"backbone {config.backbone} ({config.encoder_weights or 'random'} weights)"] if config.backbone else []
    shown += [f"{key} {args[key]}" for key in ("filters", "depth") if key in args]
    shown += [f"encoder frozen {config.freeze_encoder_epochs} epoch(s)"] if config.freeze_encoder_epochs else []
    shown += ["deep supervision"] if args.get("deep_supervision") else []
    network = f"{config.model} ({', '.join(shown)})" if shown else config.model
    precision = "mixed precision" if config.mixed_precision else "float32"
    patch = "x".join(map(str, config.patch_size))
    return (
        f"Plan ({config.recipe} recipe; any flag overrides it): {network}, patch {patch}, batch {config.batch_size},"
        f" {config.optimizer} lr {config.lr:g} {config.schedule}, {config.augment} "
        f"augmentation, {precision}, {config.workers} {config.worker_mode} worker(s)"
    )


def _stopped_early(state: dict, config: TrainingConfig) -> bool:
    patience = config.early_stopping
    return patience > 0 and "best_epoch" in state and state["epoch"] - 1 - state["best_epoch"] >= patience
