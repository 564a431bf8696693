"""train.py with a data-loader fault injected once the first epoch is saved (a helper of test_workers.py).

    python tests/train/worker_fault.py MODE TRAIN_FLAGS...

MODE ``kill``: the worker process building the next batch kills itself with SIGKILL; ``oom``: a thread of the main
process sends SIGKILL to one of the loader's worker processes, busy or idle, as the kernel's out-of-memory killer does;
``raise``: building the next batch raises RuntimeError (in whichever worker builds it). The fault fires after
``state.json`` appears in the run folder, so one epoch is complete and checkpointed. Exits with train.py's status.
"""

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train  # noqa: E402
from utils.train.sampling import PatchSampler

MAIN_PID = os.getpid()


def epoch_saved(argv: list[str]) -> bool:
    return (Path(argv[argv.index("--output") + 1]) / "state.json").is_file()


def inject(mode: str, argv: list[str]) -> None:
    building = PatchSampler.__getitem__

    def faulty(self, index):
        if epoch_saved(argv):
            if mode == "kill" and os.getpid() != MAIN_PID:
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "raise":
                raise RuntimeError(f"injected fault at batch {index}")
        return building(self, index)

    PatchSampler.__getitem__ = faulty
    if mode == "oom":
        threading.Thread(target=kill_a_worker, args=(argv,), daemon=True).start()


def kill_a_worker(argv: list[str]) -> None:
    """Once an epoch is saved, SIGKILL a data-loader worker process that has been up for 0.3 s, long enough to fill
    the queue (so it is most likely idle, waiting for its next index)."""
    first_seen: dict[int, float] = {}
    while True:
        time.sleep(0.02)
        for worker in multiprocessing.active_children():
            first_seen.setdefault(worker.pid, time.monotonic())
            if epoch_saved(argv) and time.monotonic() - first_seen[worker.pid] > 0.3:
                os.kill(worker.pid, signal.SIGKILL)
                return


if __name__ == "__main__":
    inject(sys.argv[1], sys.argv[2:])
    sys.exit(train.main(sys.argv[2:]))
