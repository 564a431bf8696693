"""One writer per output folder: data_gen.py, train.py and evaluation.py hold a lock on the folder they write; a
second run on it exits 2 naming the holder; a lock left by a process that died on this host is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, SAMPLE

import data_gen
import evaluation
import train
from utils import fileio
from utils.fileio import LOCK_FILE, FolderInUse, folder_lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from utils.fileio import folder_lock
    with folder_lock({folder!r}, "holder.py --output {folder}"):
        print("held", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture
def held(tmp_path):
    """A folder locked by another process (killed at the end); yields the folder and the process."""
    folder = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(root=str(ROOT), folder=str(folder))], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield folder, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_the_lock_file_names_the_holder_and_goes_with_it(tmp_path):
    folder = tmp_path / "new" / "out"
    with folder_lock(folder, "data_gen.py --output x") as path:
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "data_gen.py --output x" and record["started"]
        with pytest.raises(FolderInUse, match=rf"{folder} is in use by another run: pid {os.getpid()} on .*x"):
            with folder_lock(folder, "second"):
                pass
    assert not folder.exists()  # made for the run and left empty: removed with the lock
    folder.mkdir(parents=True)
    (folder / "kept.txt").write_text("work")
    with folder_lock(folder, "third"):
        pass
    assert sorted(p.name for p in folder.iterdir()) == ["kept.txt"]


def test_a_second_data_gen_on_the_same_folder_exits_2_naming_the_holder(held, capsys):
    folder, process = held
    assert data_gen.main(["--input", str(SAMPLE), "--output", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run: pid {process.pid} on {socket.gethostname()}" in err
    assert "holder.py --output" in err and "Traceback" not in err
    assert not (folder / "manifest.json").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(held, tmp_path, caplog):
    folder, process = held
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (folder / LOCK_FILE).is_file()  # what a killed run leaves
    subset = tmp_path / "raw"
    (subset / "imagesTr").mkdir(parents=True)
    (subset / "labelsTr").mkdir()
    meta = json.loads((SAMPLE / "dataset.json").read_text())
    meta["training"] = meta["training"][:2]
    for entry in meta["training"]:
        for key in ("image", "label"):
            (subset / entry[key]).write_bytes((SAMPLE / entry[key]).read_bytes())
    (subset / "dataset.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        assert data_gen.main(["--input", str(subset), "--output", str(folder), "--split", "0.5", "0.5", "0"]) == 0
    notes = [r.getMessage() for r in caplog.records if "lock taken over" in r.getMessage()]
    assert len(notes) == 1 and f"pid {process.pid}" in notes[0] and "\n" not in notes[0]
    assert (folder / "manifest.json").is_file() and not (folder / LOCK_FILE).exists()


def test_a_lock_of_a_dead_pid_without_flock_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "out"
    folder.mkdir()
    record = {"pid": dead.pid, "host": socket.gethostname(), "command": "train.py", "started": "then"}
    (folder / LOCK_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING), folder_lock(folder, "now"):
        pass
    assert any(f"locked by pid {dead.pid} (train.py)" in r.getMessage() for r in caplog.records)


def test_a_lock_of_another_host_is_refused_with_what_to_do(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    record = {"pid": 4242, "host": "node-17", "command": "train.py --output out", "started": "then"}
    (folder / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(FolderInUse, match=rf"pid 4242 on node-17.*; if that run has ended, delete {folder}/\.lock"):
        with folder_lock(folder, "now"):
            pass


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(fileio.OutputError, match="cannot write into"):
        with folder_lock(blocker / "out", "now"):
            pass


def test_train_and_evaluation_refuse_a_folder_in_use(prepared_sample, tmp_path, capsys):
    folder = tmp_path / "out"
    with folder_lock(folder, "first.py --output out"):
        code = train.main(["--data", str(prepared_sample), "--output", str(folder), "--epochs", "1"])
        assert code == 2 and "is in use by another run" in capsys.readouterr().err
        code = evaluation.main(
            ["--run", str(tmp_path / "run"), "--data", str(prepared_sample), "--output", str(folder)]
        )
        assert code == 2 and "first.py --output out" in capsys.readouterr().err
    assert not folder.exists()  # neither wrote anything; the holder's empty folder went with its lock
