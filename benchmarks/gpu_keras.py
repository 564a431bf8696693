"""The Keras side of ``gpu_check.py``: train steps of the recipes, the loader's overhead, the held-out dice of a run
and sliding-window inference, on the backend of ``KERAS_BACKEND`` (``jax`` on the device).

Each recipe's step is built as ``train.py`` builds it: ``utils.train.config.resolve_config`` on the prepared dataset
(planned patch, batch and depth), ``utils.train.loop.build`` and ``compile_model`` (deep-supervision losses, the
optimizer, the mixed-precision policy of ``utils.train.distribute.mixed_precision_policy``), batches from
``make_sampler`` (the recipe's sampling and augmentation), stepped with ``train_on_batch`` (the compiled train
function ``fit`` calls). Step time is the median of timed steps after untimed ones (the first compiles); the peak
device memory is the backend's own count for this process.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import numpy as np


def peak_memory() -> dict:
    """Peak device memory of this process under JAX (``None`` on a CPU) and the peak RSS, in GiB. JAX cannot reset
    its peak: in a process that measures several things, it is the peak of all measured so far."""
    gpu = None
    import keras

    if keras.backend.backend() == "jax":
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            gpu = stats["peak_bytes_in_use"] / 2**30
    elif keras.backend.backend() == "torch":
        import torch

        gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"gpu_peak_gib": gpu, "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def resolve(data: str, overrides: dict, recipe: str):
    """The resolved ``TrainingConfig`` of ``overrides`` on ``data`` as ``train.py`` makes it; ``recipe`` (``gpu`` or
    ``cpu``) fills what ``overrides`` leaves unset."""
    from utils.prepared import PreparedDataset
    from utils.train.config import resolve_config

    dataset = PreparedDataset(data)
    devices = ["gpu"] if recipe == "gpu" else []
    return dataset, resolve_config({**overrides, "data": data, "output": "unused"}, dataset, 1, devices)


def config_summary(config) -> dict:
    """What the PyTorch side needs to build the same step, and what the report shows."""
    return {
        "patch_size": list(config.patch_size),
        "batch_size": config.batch_size,
        "model_args": dict(config.model_args),
        "optimizer": config.optimizer,
        "lr": config.lr,
        "momentum": config.momentum,
        "augment": config.augment,
        "num_classes": config.num_classes,
        "num_channels": config.num_channels,
        "parameters": config.plan.get("parameters"),
    }


class KerasTrainStep:
    """A recipe's model compiled as ``train.py`` compiles it, with its sampler."""

    def __init__(self, data: str, overrides: dict, recipe: str, mixed: bool):
        import keras

        from utils.train.distribute import Distribution, mixed_precision_policy
        from utils.train.loop import build, compile_model, make_sampler

        keras.backend.clear_session()
        keras.config.set_dtype_policy("float32")
        self.dataset, self.config = resolve(data, {**overrides, "mixed_precision": mixed}, recipe)
        self.policy = mixed_precision_policy() if mixed else "float32"
        keras.config.set_dtype_policy(self.policy)
        keras.utils.set_random_seed(0)
        self.model = build(self.config, self.dataset.num_channels, self.dataset.num_classes)
        self.strides = compile_model(self.model, self.config, self.config.lr)
        self.sampler = make_sampler(self.config, self.dataset, Distribution(), 0, self.strides)
        keras.config.set_dtype_policy("float32")

    def ready_batches(self, count: int = 4) -> list:
        return [self.sampler[i] for i in range(count)]

    def time_ready(self, warmup: int, steps: int) -> dict:
        """Steps on batches built beforehand (no loader), rotating over four."""
        batches = self.ready_batches()
        started = time.perf_counter()
        for i in range(warmup):
            self.model.train_on_batch(*batches[i % len(batches)])
        compile_s = time.perf_counter() - started
        times = []
        for i in range(steps):
            start = time.perf_counter()
            self.model.train_on_batch(*batches[i % len(batches)])
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        return {
            "step_ms": 1000 * median,
            "best_step_ms": 1000 * float(np.min(times)),
            "mean_step_ms": 1000 * float(np.mean(times)),
            "steps": steps,
            "samples_per_s": self.config.batch_size / median,
            "warmup_s": compile_s,
            "policy": self.policy,
            "parameters": int(self.model.count_params()),
            **peak_memory(),
        }

    def time_loader(self, workers: int, mode: str, steps: int, stall_s: float) -> dict:
        """Steps fed by the toolkit's loader (``BatchLoader`` over the recipe's sampler, as ``fit`` reads it): the
        wait for each batch plus its step. The workers fill their queue before the timing starts.

        Raises:
            RuntimeError: no batch came within ``stall_s`` seconds (forked workers of a JAX process can deadlock).
        """
        from utils.train.workers import BatchLoader

        loader = BatchLoader(self.sampler, workers, mode, max_queue_size=2 * workers).start()
        try:
            index = 0
            for _ in range(2 * workers):  # the queue was filled ahead; take those untimed
                self.model.train_on_batch(*take(loader, index, stall_s))
                index += 1
            waits, times = [], []
            for _ in range(steps):
                start = time.perf_counter()
                batch = take(loader, index, stall_s)
                waits.append(time.perf_counter() - start)
                self.model.train_on_batch(*batch)
                times.append(time.perf_counter() - start)
                index += 1
        finally:
            loader.close()
        return {
            "workers": workers,
            "mode": mode,
            "steps": steps,
            "mean_step_ms": 1000 * float(np.mean(times)),
            "step_ms": 1000 * float(np.median(times)),
            "mean_wait_ms": 1000 * float(np.mean(waits)),
        }


def take(loader, index: int, stall_s: float):
    """``loader[index]`` taken in a helper thread (about 0.1 ms a batch), so that a loader that stalls raises a
    ``RuntimeError`` after ``stall_s`` seconds instead of hanging the measurement."""
    box: dict = {}

    def fetch() -> None:
        try:
            box["batch"] = loader[index]
        except Exception as error:  # handed to the caller below
            box["error"] = error

    thread = threading.Thread(target=fetch, name="gpu-check-take", daemon=True)
    thread.start()
    thread.join(stall_s)
    if thread.is_alive():
        raise RuntimeError(f"no batch {index} from the {loader.mode} loader within {stall_s:.0f} s: stalled")
    if "error" in box:
        raise box["error"]
    return box["batch"]


def steps(spec: dict, record) -> None:
    """Every (recipe, precision) of ``spec["step_configs"]`` on ready batches, and once the GPU recipe's are done, the
    first one (the GPU recipe itself) fed by each loader of ``spec["loader"]["kinds"]``: the loader's overhead.

    ``record(key, value)`` stores each figure as it is measured. A measurement that the time left before
    ``spec["deadline"]`` would not hold (judged by the longest configuration so far) is skipped and recorded so."""
    deadline, longest, first = float(spec["deadline"]), 0.0, None
    for index, item in enumerate(spec["step_configs"]):
        if first is not None and item["recipe"] != "gpu":
            loader_overhead(first, spec, record)
            first = None
        label = item["label"]
        if index and time.time() + longest > deadline:
            record(label, {"skipped": "out of time"})
            continue
        started = time.time()
        step = KerasTrainStep(spec["data"], item["overrides"], item["recipe"], item["mixed"])
        figures = {"config": config_summary(step.config), **step.time_ready(spec["warmup"], spec["timed"])}
        figures["seconds"] = time.time() - started
        longest = max(longest, figures["seconds"])
        record(label, figures)
        print(f"keras {label}: {figures['step_ms']:.1f} ms/step ({figures['warmup_s']:.1f} s warm-up)", flush=True)
        if index == 0:
            first = step
    if first is not None:
        loader_overhead(first, spec, record)


def loader_overhead(step: KerasTrainStep, spec: dict, record) -> None:
    """``step`` fed by each loader of ``spec["loader"]["kinds"]`` (``loader_<mode>_<workers>``), each against the
    same number of steps on ready batches just before it. A loader whose steps would end after ``spec["deadline"]``
    (judged by the ready steps) is skipped."""
    for loader in spec["loader"]["kinds"]:
        key = f"loader_{loader['mode']}_{loader['workers']}"
        again = step.time_ready(0, spec["loader"]["steps"])
        if time.time() + 3 * again["mean_step_ms"] / 1000 * spec["loader"]["steps"] + 10 > float(spec["deadline"]):
            record(key, {"skipped": "out of time"})
            continue
        try:
            options = spec["loader"]
            fed = step.time_loader(loader["workers"], loader["mode"], options["steps"], options["stall_s"])
        except RuntimeError as error:
            record(key, {"error": str(error)})
            print(f"{key}: {error}", flush=True)
            continue
        fed["ready_mean_step_ms"] = again["mean_step_ms"]
        fed["overhead"] = fed["mean_step_ms"] / again["mean_step_ms"] - 1.0
        record(key, fed)
        print(f"{key}: overhead {100 * fed['overhead']:.1f} % ({fed['mean_wait_ms']:.1f} ms wait)", flush=True)


def evaluate(spec: dict, record) -> None:
    """Mean foreground dice of the run ``spec["run"]`` on the test split of ``spec["data"]`` (its first
    ``spec["max_cases"]`` cases if set), predicted as ``evaluation.py`` predicts by default (overlap 0.5, Gaussian
    blending, test-time mirroring along the axes the run mirrored), scored on the prepared grid (MSD Hippocampus is
    1 mm isotropic and prepared without cropping or resampling, so that grid is the source grid). The figures are
    recorded after every case, so a time box that ends the part keeps the cases scored."""
    from utils.inference import predict_volume
    from utils.metrics import finite_mean, mean_foreground_dice
    from utils.prepared import PreparedDataset
    from utils.runs import load_run
    from utils.train.augment import mirrored_axes

    config, model = load_run(spec["run"])
    dataset = PreparedDataset(spec["data"])
    ids = dataset.split("test")[: spec.get("max_cases") or None]
    tta = mirrored_axes(config)
    started = time.time()
    per_case, per_class = {}, []
    for case_id in ids:
        probabilities = predict_volume(
            model, dataset.image(case_id), config.patch_size, config.num_classes, overlap=0.5, blend="gaussian",
            batch_size=4, tta=tta,
        )  # fmt: skip
        pred = np.argmax(probabilities, axis=-1)
        mean, classes = mean_foreground_dice(pred, np.asarray(dataset.label(case_id)), config.num_classes)
        per_case[case_id] = mean
        per_class.append(classes)
        record(
            "test",
            {
                "cases": len(per_case),
                "of": len(ids),
                "mean_foreground_dice": finite_mean(per_case.values()),
                "per_class": [finite_mean(column) for column in zip(*per_class, strict=True)],
                "tta_axes": list(tta),
                "seconds": time.time() - started,
                "per_case": per_case,
            },
        )


def inference(spec: dict, image: np.ndarray, mixed: bool) -> dict:
    """Seconds and peak memory of ``utils.inference.predict_volume`` of ``image`` (Z, Y, X, C) with the recipe network
    (no deep supervision at inference), windows of ``spec["window"]``: one untimed run (tracing every batch size),
    then ``spec["reps"]`` timed ones. The probabilities come back to the host (Z, Y, X, K), as MONAI's side does."""
    import keras

    import model as model_zoo
    from utils.inference import predict_volume
    from utils.train.distribute import mixed_precision_policy

    keras.backend.clear_session()
    keras.config.set_dtype_policy(mixed_precision_policy() if mixed else "float32")
    args = {**spec["model_args"], "deep_supervision": False}
    network = model_zoo.build_model("unet3d", (*spec["window"], image.shape[-1]), spec["num_classes"], **args)
    keras.config.set_dtype_policy("float32")

    def run() -> np.ndarray:
        return predict_volume(
            network, image, spec["window"], spec["num_classes"], overlap=spec["overlap"], blend="gaussian",
            batch_size=spec["batch_size"],
        )  # fmt: skip

    started = time.perf_counter()
    out = run()
    first = time.perf_counter() - started
    seconds = []
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - start)
    if out.shape != (*image.shape[:3], spec["num_classes"]):
        raise RuntimeError(f"predict_volume returned shape {out.shape}")
    return {
        "seconds": float(np.median(seconds)),
        "seconds_all": seconds,
        "first_run_s": first,
        "parameters": int(network.count_params()),
        "policy": network.dtype_policy.name,
        **peak_memory(),
    }


def backend_facts() -> dict:
    """Backend, its version and devices, Keras's version."""
    import keras

    facts = {"keras": keras.__version__, "backend": keras.backend.backend()}
    if facts["backend"] == "jax":
        import jax

        facts.update(jax=jax.__version__, devices=[str(d) for d in jax.devices()])
    elif facts["backend"] == "torch":
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        facts.update(torch=torch.__version__, devices=names or ["cpu"])
    facts["cpu_count"] = os.cpu_count()
    return facts
