"""Checkpoints survive a full disk: when the disk fills while an epoch's files are written, last.keras, state.json and
history.csv stay those of the last complete epoch (never half-written, never from two epochs), train.py stops with a
clear error, and --resume continues."""

import csv
import errno
import json

import pytest

import train
from utils import fileio
from utils.runs import load_model

STEPS = 3
FLAGS = ["--patch-size", "16", "16", "16", "--batch-size", "2", "--steps-per-epoch", str(STEPS), "--no-tensorboard"]


def rows(run):
    with open(run / "history.csv") as handle:
        return list(csv.DictReader(handle))


def saved_steps(run) -> int:
    """The optimizer steps that ``last.keras`` holds: which epoch's weights it is."""
    return int(load_model(run / "last.keras").optimizer.iterations.numpy())


@pytest.fixture
def disk_fills_at(monkeypatch):
    """``disk_fills_at(name, count)``: the ``count``-th write of ``name`` finds the disk full: its temporary is left
    half-written and flushing it raises ENOSPC, as a real full disk does."""
    real_fsync = fileio._fsync

    def arm(name: str, count: int) -> None:
        seen = {"n": 0}

        def fsync(path):
            stem, extension = name.split(".", 1)
            if path.name.startswith(f".{stem}.") and path.name.endswith(f".tmp.{extension}"):
                seen["n"] += 1
                if seen["n"] == count:
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(path)

        monkeypatch.setattr(fileio, "_fsync", fsync)

    yield arm
    monkeypatch.setattr(fileio, "_fsync", real_fsync)


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_last_epoch_whole_and_resume_continues(
    synthetic, tmp_path, capsys, disk_fills_at, monkeypatch
):
    dataset, run = synthetic[1], tmp_path / "run"
    disk_fills_at("state.json", 2)  # the last file of the second epoch's checkpoint: the others are written by then
    assert train.main(["--data", str(dataset), "--output", str(run), "--epochs", "2", *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "train.py --resume" in err and "Traceback" not in err
    assert json.loads((run / "state.json").read_text())["epoch"] == 1
    assert [int(row["epoch"]) for row in rows(run)] == [0]
    assert saved_steps(run) == STEPS  # last.keras is the first epoch's, as state.json says
    assert not list(run.rglob(".*.tmp*")) and not (run / fileio.LOCK_FILE).exists()

    monkeypatch.undo()  # space again
    assert train.main(["--data", str(dataset), "--output", str(run), "--resume"]) == 0
    assert [int(row["epoch"]) for row in rows(run)] == [0, 1]
    assert json.loads((run / "state.json").read_text())["epoch"] == 2 and saved_steps(run) == 2 * STEPS


def test_a_group_of_writes_that_fails_changes_no_file(tmp_path, disk_fills_at):
    fileio.write_text(tmp_path / "a.txt", "old a")
    fileio.write_text(tmp_path / "b.json", "old b")
    disk_fills_at("b.json", 1)
    with pytest.raises(fileio.OutputError, match=r"cannot write .*b\.json: No space left on device"):
        with fileio.atomic_group():
            fileio.write_text(tmp_path / "a.txt", "new a")
            fileio.write_text(tmp_path / "b.json", "new b")
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.json").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]
    with fileio.atomic_group():
        fileio.write_text(tmp_path / "a.txt", "new a")
        assert (tmp_path / "a.txt").read_text() == "old a"  # renamed only when the group ends
    assert (tmp_path / "a.txt").read_text() == "new a"
