"""Data-loader workers that die or raise stop training with a message naming the cause, instead of hanging.

``fit`` reads the training sampler (a :class:`keras.utils.PyDataset`) through Keras's ``OrderedEnqueuer``
(``keras/src/trainers/data_adapters/py_dataset_adapter.py``): with ``--workers N`` a pool of N threads, with
``--worker-mode process`` a ``multiprocessing.Pool`` of N processes. Two faults go wrong there:

- a worker *process* that dies (the kernel's out-of-memory killer sends SIGKILL; a crash in native code) is replaced
  by the pool, but the batch it was building never arrives, and the enqueuer waits for it without a timeout: training
  hangs for ever;
- an exception raised while building a batch reaches ``fit``, but under TensorFlow inside a ``tf.data`` error whose
  message is a traceback.

:func:`guarded` wraps the sampler in a :class:`GuardedLoader`, which records an exception raised while building a
batch (thread workers in the shared object, process workers through a pipe) and re-raises it. For process workers a
:class:`PoolWatchdog` thread also looks at the pools' worker processes every 0.05 s; when one has ended with a
non-zero status it fails every batch still awaited, so the enqueuer wakes up and ``fit`` raises (a callback also
stops ``fit`` at the next step when the dead worker held no batch and was replaced), and the pools are
then abandoned without ``Pool.terminate()``, which would wait for ever for a queue lock that a dead idle worker held
(there and at interpreter exit). :func:`guarded` then turns whatever error leaves ``fit`` into a
:class:`DataLoaderError` that names the cause, e.g. ``a data-loader worker process (pid 4242) died (killed by signal 9,
SIGKILL; out of memory?)``. Checkpoints are written at epoch ends only, so the last complete epoch stays in
``last.keras`` for ``--resume``.

The watchdog reads two private attributes of Keras and the standard library (Keras's ``_DATA_POOLS`` and the pool's
``_pool`` / ``_cache``); if a later version drops them it watches nothing and training behaves as before.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from multiprocessing.pool import RUN

import keras

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.05


class DataLoaderError(ChildProcessError):
    """A data-loader worker died or raised while building a training batch."""


def describe_exit(exitcode: int) -> str:
    """Words for a process's exit code: ``killed by signal 9, SIGKILL; out of memory?`` or ``exited with status 3``."""
    if exitcode >= 0:
        return f"exited with status {exitcode}"
    number = -exitcode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    return f"killed by signal {number}, {name}" + ("; out of memory?" if number == signal.SIGKILL else "")


def _where() -> str:
    if multiprocessing.parent_process() is not None:
        return f"a data-loader worker process (pid {os.getpid()})"
    if threading.current_thread() is not threading.main_thread():
        return f"a data-loader worker thread ({threading.current_thread().name})"
    return "the data loader"


class GuardedLoader(keras.utils.PyDataset):
    """``loader`` with the same batches, workers and epochs, recording any exception raised while building a batch.

    Args:
        loader: the training :class:`keras.utils.PyDataset` (its ``workers``, ``use_multiprocessing`` and
            ``max_queue_size`` are taken over).
    """

    def __init__(self, loader: keras.utils.PyDataset):
        super().__init__(
            workers=loader.workers, use_multiprocessing=loader.use_multiprocessing, max_queue_size=loader.max_queue_size
        )
        self.loader = loader
        self._owner = os.getpid()
        self._failure: str | None = None
        self._reports = multiprocessing.SimpleQueue() if loader.use_multiprocessing else None

    @property
    def num_batches(self):
        return self.loader.num_batches

    def on_epoch_begin(self):
        self.loader.on_epoch_begin()

    def on_epoch_end(self):
        self.loader.on_epoch_end()

    def __getitem__(self, index):
        try:
            return self.loader[index]
        except Exception as error:
            message = f"{_where()} raised {type(error).__name__}: {error} (building batch {index})"
            if os.getpid() == self._owner:
                self._failure = self._failure or message
            elif self._reports is not None:
                self._reports.put(message)
            raise DataLoaderError(message) from error

    def failure(self) -> str | None:
        """The first exception recorded in any worker, as a sentence; ``None`` if there was none."""
        while self._reports is not None and not self._reports.empty():
            message = self._reports.get()
            self._failure = self._failure or message
        return self._failure

    def close(self) -> None:
        if self._reports is not None:
            self._reports.close()


def _keras_pools() -> list:
    """The ``multiprocessing.Pool`` objects through which Keras's enqueuers feed ``PyDataset`` batches."""
    try:
        from keras.src.trainers.data_adapters import py_dataset_adapter
    except ImportError:
        return []
    return list(getattr(py_dataset_adapter, "_DATA_POOLS", ()))


class PoolWatchdog:
    """A thread that notices when a worker process of a Keras data pool ends with a non-zero status.

    It then records :attr:`failure` and fails every batch still awaited from the pools (again at each poll, as the
    enqueuer drains its queue), so that nothing waits for the batch the dead worker took with it.
    """

    def __init__(self, interval: float = POLL_INTERVAL_S):
        self.interval = interval
        self.failure: str | None = None
        self._workers: dict[int, tuple] = {}  # pid -> (process, weak reference to its pool)
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> pids of its workers so far
        self._replaced_checks = 0  # consecutive checks that found a replaced worker without seeing its exit
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="data-loader-watchdog", daemon=True)

    def start(self) -> PoolWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.check()
            except Exception as error:  # the watchdog must never be what breaks training
                log.debug("data-loader watchdog: %s", error)

    def check(self) -> None:
        """Look at every worker once; after a death, fail the awaited batches.

        A worker that died between two looks is still noticed: the pool starts a replacement, so the pool has then had
        more workers than its size (Keras's pools never retire workers before they end).
        """
        pools = _keras_pools()
        replaced = False
        for pool in pools:
            seen = self._seen.setdefault(pool, set())
            for process in list(getattr(pool, "_pool", ())):
                if process.pid is not None and process.pid not in seen:
                    seen.add(process.pid)
                    self._workers[process.pid] = (process, weakref.ref(pool))
            replaced = replaced or len(seen) > getattr(pool, "_processes", len(seen))
        for pid, (process, pool_ref) in list(self._workers.items()):
            try:
                code = process.exitcode
            except ValueError:  # a closed Process object
                code = 0
            if code is None:
                continue
            del self._workers[pid]
            pool = pool_ref()
            if code == 0 or pool is None or (code == -signal.SIGTERM and getattr(pool, "_state", RUN) != RUN):
                continue  # a normal end, or the pool's own shutdown
            self.failure = self.failure or f"a data-loader worker process (pid {pid}) died ({describe_exit(code)})"
        self._replaced_checks = self._replaced_checks + 1 if replaced and self.failure is None else 0
        if self._replaced_checks > 1:  # one more look first: the dead worker's exit status may come in late
            self.failure = "a data-loader worker process died (its exit status was not seen; out of memory?)"
        if self.failure is not None:
            for pool in pools:
                _fail_pending(pool, self.failure)


def abandon_pools() -> None:
    """Stop Keras's data pools after a worker died, without ``Pool.terminate()``: that first takes the task queue's
    read lock, which an idle worker holds while it waits for a task, so if that worker was the one killed, terminating
    blocks for ever (also at interpreter exit, where the pool's finalizer calls it). The pools' handler threads are
    daemons; the workers are killed here."""
    from multiprocessing.pool import TERMINATE

    for pool in _keras_pools():
        with contextlib.suppress(Exception):  # best effort on private attributes
            pool._terminate.cancel()
            pool._worker_handler._state = TERMINATE  # no more replacements
            pool._state = TERMINATE
            for process in list(pool._pool):
                process.kill()
                process.join(timeout=1)


def _fail_pending(pool, message: str) -> None:
    """Make every result still awaited from ``pool`` raise :class:`DataLoaderError` (``message``)."""
    for result in list(getattr(pool, "_cache", {}).values()):
        if not result.ready():
            with contextlib.suppress(KeyError):  # the pool delivered it meanwhile
                result._set(0, (False, DataLoaderError(message)))


class _StopOnDeadWorker(keras.callbacks.Callback):
    """Ends ``fit`` at the next step once the watchdog saw a worker die, even when no batch was lost (an idle worker
    killed and replaced): the memory pressure that killed it is still there, so stopping with the cause is what
    nnU-Net users know ("background workers are no longer alive") and what lets them act."""

    def __init__(self, watchdog: PoolWatchdog | None):
        super().__init__()
        self.watchdog = watchdog

    def on_train_batch_end(self, batch, logs=None):
        if self.watchdog is not None and self.watchdog.failure is not None:
            raise DataLoaderError(self.watchdog.failure)


@contextlib.contextmanager
def guarded(data) -> Iterator[tuple[object, list]]:
    """Yield ``(input, callbacks)`` to give ``fit`` in place of ``data``, and name the cause when a data-loader worker
    fails.

    Args:
        data: the training input; a :class:`keras.utils.PyDataset` is wrapped in a :class:`GuardedLoader` (and its
            process pools watched, with a callback that stops ``fit`` after a death), anything else (a ``tf.data``
            pipeline) is yielded unchanged with no callback.

    Raises:
        DataLoaderError: ``fit`` raised because a worker died or raised; the message names the worker and the cause.
    """
    if not isinstance(data, keras.utils.PyDataset):
        yield data, []
        return
    loader = GuardedLoader(data)
    watchdog = PoolWatchdog().start() if loader.use_multiprocessing else None
    try:
        yield loader, ([_StopOnDeadWorker(watchdog)] if watchdog is not None else [])
    except Exception as error:
        died = watchdog.failure if watchdog is not None else None
        cause = died or loader.failure()
        if cause is None:
            raise
        if died:
            abandon_pools()
        raise DataLoaderError(
            f"{cause}; training stopped (rerun with --resume to continue from the last complete epoch)"
        ) from error
    finally:
        if watchdog is not None:
            watchdog.stop()
        loader.close()
