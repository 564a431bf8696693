"""The training data loader: batches built ahead by the toolkit's own worker threads or processes, and a worker that
dies or raises stops training with a message naming the cause instead of hanging.

``fit`` is given a :class:`BatchLoader`: a :class:`keras.utils.PyDataset` without Keras workers, so ``fit`` asks it
for batches ``0, 1, 2, ...`` one at a time, and its ``__getitem__`` hands over batch ``i`` of the sampler as the
loader's workers built it:

- ``--worker-mode thread`` (the default): N threads of this process;
- ``--worker-mode process``: N ``multiprocessing`` processes (forked where the platform can, so they share the
  sampler's memory maps), each with a pipe of its own for the indices it is asked to build and one for the batches it
  sends back; a collector thread of the main process receives them.

Order and determinism: batch ``i`` is ``sampler[i]``, a pure function of ``(seed, epoch, step, shard)``
(:mod:`utils.train.sampling`), so whichever worker builds it, batches are the same for any number and kind of
workers, and a resumed run sees the batches the uninterrupted run would have seen. The workers build at most
``max_queue_size`` batches ahead of the one ``fit`` takes (those built and not yet taken included), each index going to
the worker with the fewest pending; an index asked for out of sequence (Keras reads two batches to learn their
shapes, then starts again at 0) moves the window there.

Faults. An exception raised while building a batch becomes that batch's result, a sentence naming the worker, the
exception and the batch, raised when ``fit`` takes it. A worker *process* that ends while the loader runs (the
kernel's out-of-memory killer sends SIGKILL; a crash in native code) is seen by the collector through
``multiprocessing.connection.wait`` on the processes' sentinels (and on their result pipes, which reach end-of-file
when their only writer dies, even in the middle of a batch); it reads the exit status (``Process.exitcode``), kills the
other workers and fails the loader, so the batch ``fit`` waits for raises at once, and a callback
(:class:`StopOnLoaderFailure`) ends ``fit`` at the next step when ``fit`` was not waiting. :func:`guarded` then turns
the error leaving ``fit`` into a :class:`DataLoaderError` that names the cause, e.g. ``a data-loader worker process
(pid 4242) died (killed by signal 9, SIGKILL; out of memory?)``. Checkpoints are written at epoch ends only, so the
last complete epoch stays in ``last.keras`` for ``--resume``.

Shutdown: worker processes hold no lock that anyone else waits for (each pipe has one reader and one writer), so
:meth:`BatchLoader.close` simply kills them when ``fit`` ends; they are daemons, ended at interpreter exit if
anything skipped that, and a forked worker closes its siblings' pipe ends, so a worker whose parent was killed reads
end-of-file and exits. Worker threads are daemons that stop after their current batch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from multiprocessing.connection import wait

import keras

from utils.settings import WORKER_MODES

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


def build(sampler, index: int) -> tuple[int, object, str | None]:
    """``(index, batch, None)``, or ``(index, None, sentence)`` naming the worker and the exception it raised."""
    try:
        return index, sampler[index], None
    except Exception as error:
        return index, None, f"{_where()} raised {type(error).__name__}: {error} (building batch {index})"


class _ThreadWorker:
    """A daemon thread that builds the indices put in its queue and delivers the batches to the loader."""

    def __init__(self, loader: BatchLoader, number: int):
        self.loader, self.number = loader, number
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name=f"data-loader-{number}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def send(self, index: int) -> None:
        self.tasks.put(index)

    def run(self) -> None:
        try:
            while (index := self.tasks.get()) is not None and not self.loader.closed:
                self.loader.deliver(self, *build(self.loader.sampler, index))
        except BaseException as error:  # SystemExit and the like: say so rather than leave fit waiting
            self.loader.fail(f"a data-loader worker thread ({self.thread.name}) stopped: {type(error).__name__}")

    def stop(self) -> None:
        self.tasks.put(None)


def _serve(sampler, tasks, results, inherited) -> None:
    """A worker process: build each index received on ``tasks`` and send the result on ``results``, until the pipe
    closes or ``None`` arrives. ``inherited``: the main process's pipe ends that a forked child holds copies of."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which then ends the workers
    for connection in inherited:
        connection.close()
    while True:
        try:
            index = tasks.recv()
        except (EOFError, OSError):
            return
        if index is None:
            return
        try:
            results.send(build(sampler, index))
        except OSError:  # the main process is gone
            return


class _ProcessWorker:
    """A worker process with a task pipe and a result pipe of its own."""

    def __init__(self, loader: BatchLoader, number: int, context, siblings: list):
        task_reader, self.tasks = context.Pipe(duplex=False)
        self.results, result_writer = context.Pipe(duplex=False)
        # A forked child inherits this process's ends of its own pipes and of its siblings': it closes them.
        inherited = [*siblings, self.tasks, self.results] if context.get_start_method() == "fork" else []
        self.process = context.Process(
            target=_serve,
            args=(loader.sampler, task_reader, result_writer, inherited),
            name=f"data-loader-{number}",
            daemon=True,
        )
        self.ends = (task_reader, result_writer)

    def start(self) -> None:
        self.process.start()
        for end in self.ends:  # the worker holds these now; its pipes' ends here are the other two
            end.close()

    def send(self, index: int) -> None:
        with contextlib.suppress(OSError):  # a dead worker: the collector reports it
            self.tasks.send(index)

    def exit_status(self) -> str:
        """How the process ended, as words (waiting up to a second for its exit status)."""
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is None:
            return "closed its result pipe"
        return f"died ({describe_exit(code)})"

    def stop(self) -> None:
        self.process.kill()

    def release(self) -> None:
        self.process.join(timeout=5.0)
        for connection in (self.tasks, self.results):
            connection.close()
        with contextlib.suppress(ValueError):  # still running after the kill: left to the interpreter's exit
            self.process.close()


def _context():
    """``fork`` on Linux (fast start, memory maps shared, as Keras's pools do there), else the platform's default."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)


class BatchLoader(keras.utils.PyDataset):
    """The batches of ``sampler`` in index order, built ahead by ``workers`` threads or processes of its own.

    Args:
        sampler: a :class:`keras.utils.PyDataset` whose batch ``i`` depends on ``i`` only (``num_batches`` is passed
            on: ``None`` for the endless training samplers).
        workers: how many workers; 0 or 1 thread builds each batch when it is asked for, in the calling thread.
        mode: ``thread`` or ``process``.
        max_queue_size: batches built ahead at most (default ``2 x workers``).

    Raises:
        ValueError: an unknown ``mode``.
    """

    def __init__(self, sampler, workers: int = 1, mode: str = "thread", max_queue_size: int | None = None):
        super().__init__()  # no Keras workers: fit asks for the batches one by one, in order
        if mode not in WORKER_MODES:
            raise ValueError(f"worker mode must be one of {WORKER_MODES}, got {mode!r}")
        self.sampler, self.mode = sampler, mode
        workers = int(workers or 0)
        self.num_workers = max(0, workers) if mode == "process" else (workers if workers > 1 else 0)
        self.queue_size = max(1, int(max_queue_size or 2 * self.num_workers))
        self.failure: str | None = None
        self._changed = threading.Condition()
        self._team: list = []
        self._load: dict[object, int] = {}  # worker -> indices sent and not delivered
        self._pending: dict[int, object] = {}  # index -> the worker building it
        self._ready: dict[int, tuple] = {}  # index -> (batch, error sentence)
        self._start = 0  # the window of indices built ahead is [_start, _start + queue_size)
        self._started = self._closing = False
        self._collector: threading.Thread | None = None

    @property
    def num_batches(self):
        return self.sampler.num_batches

    @property
    def closed(self) -> bool:
        return self._closing

    def on_epoch_begin(self):
        self.sampler.on_epoch_begin()

    def on_epoch_end(self):
        self.sampler.on_epoch_end()

    def start(self) -> BatchLoader:
        """Start the workers (``__getitem__`` does it when needed) and begin building from batch 0."""
        if self._started:
            return self
        self._started = True
        if self.mode == "thread":
            self._team = [_ThreadWorker(self, number) for number in range(self.num_workers)]
        else:
            context, siblings = _context(), []
            for number in range(self.num_workers):
                self._team.append(_ProcessWorker(self, number, context, list(siblings)))
                self._team[-1].start()
                siblings += [self._team[-1].tasks, self._team[-1].results]
        self._load = {worker: 0 for worker in self._team}
        for worker in self._team:
            if isinstance(worker, _ThreadWorker):
                worker.start()
        if self.mode == "process" and self._team:
            self._collector = threading.Thread(target=self._collect, name="data-loader-collector", daemon=True)
            self._collector.start()
        if self._team:
            with self._changed:
                self._plan(0)
        return self

    def __getitem__(self, index):
        index = int(index)
        if not self._started:
            self.start()
        if not self._team:
            _, batch, error = build(self.sampler, index)
            return self._result(batch, error)
        with self._changed:
            self._plan(index)
            while index not in self._ready and self.failure is None and not self._closing:
                self._changed.wait(1.0)
            if self.failure is not None or self._closing:
                raise DataLoaderError(self.failure or "the data loader is closed")
            batch, error = self._ready.pop(index)
            self._plan(index + 1)
        return self._result(batch, error)

    def _result(self, batch, error: str | None):
        if error is not None:
            self.failure = self.failure or error
            raise DataLoaderError(error)
        return batch

    def _plan(self, start: int) -> None:
        """Make ``[start, start + queue_size)`` the window of batches to build ahead (the condition is held)."""
        self._start = start
        end = start + self.queue_size
        for index in [i for i in self._ready if not start <= i < end]:
            del self._ready[index]
        for index in range(start, end):
            if index not in self._ready and index not in self._pending:
                worker = min(self._team, key=self._load.__getitem__)
                self._load[worker] += 1
                self._pending[index] = worker
                worker.send(index)

    def deliver(self, worker, index: int, batch, error: str | None) -> None:
        """Called by a worker thread or the collector: batch ``index`` is built (or failed with ``error``)."""
        with self._changed:
            self._load[worker] -= 1
            self._pending.pop(index, None)
            if not self._closing and self._start <= index < self._start + self.queue_size:
                self._ready[index] = (batch, error)
                self._changed.notify_all()

    def fail(self, message: str) -> None:
        """Stop the loader: every batch asked for from now on raises :class:`DataLoaderError` (``message``)."""
        with self._changed:
            if self._closing:
                return
            self.failure = self.failure or message
            self._changed.notify_all()
        for worker in self._team:
            worker.stop()

    def _collect(self) -> None:
        """The collector thread of process workers: receive their batches and notice a worker that ended."""
        by_reader = {worker.results: worker for worker in self._team}
        by_sentinel = {worker.process.sentinel: worker for worker in self._team}
        while not self._closing and self.failure is None:
            for ready in wait([*by_reader, *by_sentinel], timeout=POLL_INTERVAL_S):
                worker = by_reader.get(ready)
                if worker is not None:
                    try:
                        self.deliver(worker, *ready.recv())
                        continue
                    except (EOFError, OSError):  # its only writer is gone
                        pass
                worker = worker or by_sentinel[ready]
                if not self._closing:
                    self.fail(f"a data-loader worker process (pid {worker.process.pid}) {worker.exit_status()}")
                return

    def close(self) -> None:
        """End the workers (processes are killed, threads stop after their current batch); again does nothing."""
        with self._changed:
            if self._closing:
                return
            self._closing = True
            self._changed.notify_all()
        for worker in self._team:
            worker.stop()
        if self._collector is not None:
            self._collector.join(timeout=5.0)
        for worker in self._team:
            if isinstance(worker, _ProcessWorker):
                worker.release()

    def __enter__(self) -> BatchLoader:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class StopOnLoaderFailure(keras.callbacks.Callback):
    """Ends ``fit`` at the next step once the loader failed, also when ``fit`` was not waiting for a batch (an idle
    worker killed): the memory pressure that killed it is still there, so stopping with the cause is what nnU-Net users
    know ("background workers are no longer alive") and what lets them act."""

    def __init__(self, loader: BatchLoader):
        super().__init__()
        self.loader = loader

    def on_train_batch_end(self, batch, logs=None):
        if self.loader.failure is not None:
            raise DataLoaderError(self.loader.failure)


@contextlib.contextmanager
def guarded(data) -> Iterator[tuple[object, list]]:
    """Yield ``(input, callbacks)`` to give ``fit`` in place of ``data``, and name the cause when a data-loader worker
    fails.

    Args:
        data: the training input. A :class:`keras.utils.PyDataset` is read through a :class:`BatchLoader` with its
            ``workers``, ``max_queue_size`` and kind (processes when ``use_multiprocessing``, else threads), started
            here and closed when ``fit`` is done, with a :class:`StopOnLoaderFailure` callback; anything else (a
            ``tf.data`` pipeline) is yielded unchanged with no callback.

    Raises:
        DataLoaderError: ``fit`` raised because a worker died or raised; the message names the worker and the cause.
    """
    if not isinstance(data, keras.utils.PyDataset):
        yield data, []
        return
    mode = "process" if data.use_multiprocessing else "thread"
    loader = BatchLoader(data, data.workers, mode, data.max_queue_size)
    try:
        yield loader.start(), [StopOnLoaderFailure(loader)]  # a worker that fails to start is ended below too
    except Exception as error:
        if loader.failure is None:
            raise
        raise DataLoaderError(
            f"{loader.failure}; training stopped (rerun with --resume to continue from the last complete epoch)"
        ) from error
    finally:
        loader.close()
