"""utils/console.py and the start-up filter of utils/device.py: --version, --verbose, log files, quiet start."""

import logging
import os
import re

import pytest
from conftest import ROOT

import data_gen
import evaluation
import train
from utils import console, device


def test_version_comes_from_pyproject():
    expected = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert console.version() == expected


@pytest.mark.parametrize("script", [data_gen, train, evaluation], ids=lambda m: m.__name__)
def test_every_script_answers_version(script, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f"{console.version()} (keras-medseg)")


def test_log_file_copies_records_and_lets_go(tmp_path):
    path = tmp_path / "run" / "train.log"
    logger = logging.getLogger("utils.test_console")
    handlers = list(logging.getLogger().handlers)
    with console.log_file(path, header=("Training on the CPU",)) as written:
        logger.info("epoch %d done", 3)
        logger.debug("not copied")
    logger.info("after the block")
    assert written == path and logging.getLogger().handlers == handlers
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(f"keras-medseg {console.version()}: log of {path.parent}")
    assert lines[1].endswith("Training on the CPU") and lines[2].endswith("utils.test_console: epoch 3 done")
    with console.log_file(path):  # a resumed run appends
        logger.warning("again")
    assert len(path.read_text().splitlines()) == 5


def test_log_file_in_an_unwritable_place_is_skipped(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with console.log_file(blocker / "sub" / "train.log") as written:
        assert written is None


def test_logged_to_writes_into_the_output_argument(tmp_path):
    @console.logged_to("evaluation.log")
    def evaluate(run, output, split="test"):
        logging.getLogger("utils.evaluate.fake").info("scored %s", split)
        return split

    assert evaluate("runs/x", output=tmp_path / "results", split="val") == "val"
    assert (tmp_path / "results" / "evaluation.log").read_text().splitlines()[-1].endswith("scored val")


def test_start_up_lines_are_filtered_and_the_rest_kept(capfd):
    with device.filtered_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n")
        os.write(2, b"a real warning from a library\n")
    assert capfd.readouterr().err == "a real warning from a library\n"
