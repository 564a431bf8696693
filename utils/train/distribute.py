"""The engine seam: data-parallel training, its input pipeline, TensorBoard summaries and op determinism.

Everything here that names TensorFlow (``tf.distribute``, ``tf.data``, ``tf.summary``, ``tf.config``) runs only when
the Keras backend is TensorFlow; under JAX the same strategies map to ``keras.distribution.DataParallel``. No other
module of the toolkit imports TensorFlow.

Strategies (``--strategy``):

- ``default``: one device (the first GPU, else the CPU), the sampler feeds ``fit`` directly (through the toolkit's
  loader workers, :mod:`utils.train.workers`).
- ``mirrored``: TensorFlow ``MirroredStrategy`` over every local GPU (every logical CPU device when there is no GPU);
  JAX ``DataParallel`` over the local devices.
- ``multiworker``: TensorFlow ``MultiWorkerMirroredStrategy`` over the hosts listed in ``TF_CONFIG``, as a subclass
  whose public ``reduce`` also takes the structures and scalars that Keras's ``fit`` reduces
  (:func:`multiworker_strategy`), so ``fit`` runs unchanged; under JAX, ``keras.distribution.initialize()`` (from
  ``KERAS_DISTRIBUTION_JOB_ADDRESSES``, ``..._NUM_PROCESSES``, ``..._PROCESS_ID``) then ``DataParallel`` over every
  device of every process.

Batch and learning rate, as users of these engines expect: ``batch_size`` is the batch of one replica (device), so
the global batch of one step is ``batch_size x replicas`` and each replica holds what one device was planned for.
Gradients are averaged over the global batch; the learning rate is scaled by ``lr_scaling`` (``none`` by default,
``linear`` for Goyal et al.'s rule ``lr x replicas``, ``sqrt`` for ``lr x sqrt(replicas)``). Each replica draws its own
batches: replica ``r`` of host ``w`` reads sampler stream ``shard = w x local_replicas + r``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from utils.device import cpu_info
from utils.settings import STRATEGIES

log = logging.getLogger(__name__)


@dataclass
class Distribution:
    """The chosen strategy and where this process stands in it.

    Attributes:
        name: ``default``, ``mirrored`` or ``multiworker``.
        strategy: the ``tf.distribute.Strategy`` (TensorFlow backend, not ``default``), else ``None``.
        num_replicas: devices taking part in one step, over all hosts.
        num_workers: processes (hosts) taking part.
        worker_index: this process's index; 0 is the chief, the only one that writes the run folder.
    """

    name: str = "default"
    strategy: Any = None
    num_replicas: int = 1
    num_workers: int = 1
    worker_index: int = 0
    devices: list = field(default_factory=list)

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    @property
    def local_replicas(self) -> int:
        return max(1, self.num_replicas // self.num_workers)

    def scope(self):
        """Context in which to build, load and compile the model."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def agree(self, value: float) -> float:
        """The chief's ``value`` on every host, so that all hosts take the same decision (stop, learning rate)."""
        if self.strategy is None or self.num_workers == 1:
            return float(value)
        import tensorflow as tf

        def chief_only():
            first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
            return tf.constant(float(value) if self.is_chief and first else 0.0, tf.float32)

        per_replica = self.strategy.run(chief_only)
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))

    def scaled_lr(self, lr: float, scaling: str) -> float:
        """The learning rate for the global batch (``none``, ``linear`` or ``sqrt`` in the number of replicas)."""
        if scaling == "linear":
            return lr * self.num_replicas
        if scaling == "sqrt":
            return lr * math.sqrt(self.num_replicas)
        return lr

    def input_for_fit(self, sampler, workers: int = 1):
        """What to pass to ``fit``: the sampler itself, or for ``tf.distribute`` a distributed ``tf.data`` pipeline
        in which every replica reads its own stream of the sampler (see the module docstring)."""
        if self.strategy is None:
            return sampler
        return _distributed_dataset(self, sampler, workers)


def make_distribution(name: str) -> Distribution:
    """Set up the strategy ``name`` for the current backend; call before any model is built.

    Raises:
        ValueError: an unknown name, or a strategy the backend does not offer (torch: ``default`` only).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    backend = keras.backend.backend()
    if name == "default":
        return Distribution()
    if backend == "tensorflow":
        return _tensorflow_distribution(name)
    if backend == "jax":
        return _jax_distribution(name)
    raise ValueError(
        f"--strategy {name} needs the tensorflow or jax backend; the {backend} backend trains on one device"
    )


def _tensorflow_distribution(name: str) -> Distribution:
    import tensorflow as tf

    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        return Distribution(name, strategy, strategy.num_replicas_in_sync, 1, 0, devices)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = resolver.cluster_spec().as_dict()
    if not cluster:
        raise ValueError("--strategy multiworker needs TF_CONFIG describing the cluster (see the README)")
    strategy = multiworker_strategy(resolver)
    hosts = [("chief", i) for i in range(len(cluster.get("chief", [])))]
    hosts += [("worker", i) for i in range(len(cluster.get("worker", [])))]
    index = hosts.index((resolver.task_type, int(resolver.task_id or 0)))
    return Distribution(name, strategy, strategy.num_replicas_in_sync, len(hosts), index)


# Dtypes that TensorFlow's collective all-reduce takes; other integers and booleans are reduced in int32 or int64.
_COLLECTIVE_DTYPES = ("bfloat16", "float16", "float32", "float64", "int32", "int64")


def multiworker_strategy(resolver):
    """A ``tf.distribute.MultiWorkerMirroredStrategy`` whose :meth:`reduce` also takes what Keras 3's ``fit`` gives it
    (keras-team/keras#20585).

    Before the first step, ``fit`` averages one ``(x, y)`` batch over the replicas to build the loss, metric and
    optimizer state (``strategy.reduce("MEAN", batch, axis=None)``), and after each step it averages every logged
    scalar with ``axis=0``. The collective strategy takes neither a structure of values, nor a ``uint8`` label map,
    nor an axis that a scalar lacks. This subclass overrides the public ``reduce``: it reduces each value of a
    structure, reduces integer types that the collectives lack in ``int32``/``int64`` (cast back after), and averages a
    scalar over the replicas (``axis=None``), which is what ``axis=0`` means for a value without a batch axis.

    Args:
        resolver: the ``tf.distribute.cluster_resolver.TFConfigClusterResolver`` describing the hosts.
    """
    import tensorflow as tf

    class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis=None):
            leaves = [self.reduce_one(reduce_op, leaf, axis) for leaf in tf.nest.flatten(value)]
            return tf.nest.pack_sequence_as(value, leaves)

        def reduce_one(self, reduce_op, value, axis):
            local = self.experimental_local_results(value)[0]
            if axis is not None and local.shape.rank == 0:
                axis = None
            if local.dtype.name in _COLLECTIVE_DTYPES:
                return super().reduce(reduce_op, value, axis)
            wide = tf.int64 if local.dtype.size > 4 else tf.int32
            widened = self.run(tf.cast, args=(value, wide))
            return tf.cast(super().reduce(reduce_op, widened, axis), local.dtype)

    return MultiWorkerStrategy(cluster_resolver=resolver)


def _jax_distribution(name: str) -> Distribution:
    import jax

    if name == "multiworker":
        keras.distribution.initialize()
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return Distribution(name, None, len(devices), jax.process_count(), jax.process_index(), devices)


def _distributed_dataset(distribution: Distribution, sampler, workers: int):
    """``strategy.distribute_datasets_from_function``: each host's pipeline yields per-replica batches, element
    ``j`` being step ``j // local`` of local replica ``j % local``."""
    import tensorflow as tf

    local = distribution.local_replicas
    x0, y0 = sampler.batch(sampler.start_epoch, 0, 0)
    targets = list(y0) if isinstance(y0, tuple) else [y0]
    specs = [tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)) for a in (x0, *targets)]

    def make(context):
        def load(j):
            index, replica = divmod(int(j), local)
            epoch, step = divmod(index, sampler.steps_per_epoch)
            x, y = sampler.batch(sampler.start_epoch + epoch, step, context.input_pipeline_id * local + replica)
            return (x, *(y if isinstance(y, tuple) else (y,)))

        def structure(*arrays):
            arrays = [tf.ensure_shape(a, spec.shape) for a, spec in zip(arrays, specs, strict=True)]
            return arrays[0], (tuple(arrays[1:]) if isinstance(y0, tuple) else arrays[1])

        dataset = tf.data.Dataset.range(2**62).map(
            lambda j: tf.numpy_function(load, [j], [spec.dtype for spec in specs], stateful=False),
            num_parallel_calls=max(1, int(workers)),
            deterministic=True,
        )
        dataset = dataset.map(structure).prefetch(2)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return dataset.with_options(options)

    return distribution.strategy.distribute_datasets_from_function(make)


def has_gpu() -> bool:
    """Whether the backend sees a GPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    return False


def mixed_precision_policy() -> str:
    """``mixed_float16`` on a GPU; ``mixed_bfloat16`` on CPUs with bfloat16 instructions (AVX-512 BF16, AMX), whose
    kernels (e.g. 3D max pooling) lack float16; ``float32`` on other CPUs, where oneDNN has no bfloat16 convolution
    (an AVX2 CPU, or oneDNN capped below AVX-512 by ``ONEDNN_MAX_CPU_ISA``)."""
    if has_gpu():
        return "mixed_float16"
    if cpu_has_bfloat16():
        log.info("no GPU: --mixed-precision uses mixed_bfloat16 (the CPU kernels lack float16)")
        return "mixed_bfloat16"
    log.warning("--mixed-precision: this CPU has no bfloat16 instructions, so training stays in float32")
    return "float32"


def cpu_has_bfloat16() -> bool:
    """Whether the CPU (as oneDNN may use it) has bfloat16 instructions."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if capped and not capped.startswith(("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")):
        return False
    isa = cpu_info()["isa"]
    return bool(isa.get("avx512_bf16") or isa.get("amx_bf16"))


def enable_determinism() -> None:
    """Make the backend's kernels deterministic (slower): same seed, same weights, run after run."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True)


class SummaryWriter:
    """TensorBoard event files: scalars and RGB images.

    Written with TensorFlow's core ``tf.summary.write`` and the summary metadata of TensorBoard's scalar and image
    plugins, so writing needs no ``tensorboard`` package (viewing does: ``pip install tensorboard``).

    Args:
        logdir: the folder of the event files (``runs/NAME/tensorboard``).
    """

    def __init__(self, logdir):
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(logdir))
        self._scalar = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )
        self._image = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"),
            data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
        )

    def scalars(self, values: dict, step: int) -> None:
        tf = self._tf
        with self._writer.as_default():
            for key, value in values.items():
                if value is not None and np.isfinite(value):
                    tf.summary.write(key, tf.constant(float(value), tf.float32), step=step, metadata=self._scalar)
        self._writer.flush()

    def images(self, images: dict[str, np.ndarray], step: int) -> None:
        """``images``: name → ``(H, W, 3)`` uint8, stored as PNG."""
        tf = self._tf
        with self._writer.as_default():
            for key, image in images.items():
                image = np.asarray(image, dtype=np.uint8)
                png = tf.io.encode_png(image)
                tensor = tf.stack([tf.constant(str(image.shape[1])), tf.constant(str(image.shape[0])), png])
                tf.summary.write(key, tensor, step=step, metadata=self._image)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_events(logdir) -> list[tuple[str, str, int]]:
    """``(tag, plugin name, step)`` of every summary in the event files under ``logdir`` (for tests and checks)."""
    import glob

    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    found = []
    for path in sorted(glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True)):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                found.append((value.tag, value.metadata.plugin_data.plugin_name, int(event.step)))
    return found


def summary_writer(logdir) -> SummaryWriter | None:
    """A :class:`SummaryWriter` under the TensorFlow backend; ``None`` (no TensorBoard files) under the others."""
    if keras.backend.backend() != "tensorflow":
        log.info("TensorBoard summaries are written under the tensorflow backend only")
        return None
    return SummaryWriter(logdir)
