"""Shared pytest fixtures and paths."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "data" / "hippocampus_sample"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.device import enable_onednn  # noqa: E402

enable_onednn()  # as every entry point does; subprocesses of the tests inherit it


import builders  # noqa: E402
import pytest  # noqa: E402

import data_gen  # noqa: E402


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory):
    """The shipped sample prepared once per test session with the demo's split (28 / 6 / 6 cases)."""
    import data_gen

    out = tmp_path_factory.mktemp("prepared") / "hippocampus"
    code = data_gen.main(
        ["--input", str(SAMPLE), "--output", str(out), "--split", "0.7", "0.15", "0.15", "--workers", "2"]
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def torch():
    """PyTorch on one thread: its thread pool otherwise competes with TensorFlow's on tiny tensors."""
    module = pytest.importorskip("torch")
    threads = module.get_num_threads()
    module.set_num_threads(1)
    yield module
    module.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Raw MSD folder, the dataset prepared from it (original spacing, no normalisation, nonzero crop) and a run."""
    root = tmp_path_factory.mktemp("synthetic")
    raw = builders.write_msd(root / "raw")
    dataset = root / "data"
    flags = ["--spacing", "original", "--normalize", "none", "--crop", "nonzero", "--split", "0.5", "0.25", "0.25"]
    assert data_gen.main(["--input", str(raw), "--output", str(dataset), "--seed", "1", *flags]) == 0
    return raw, dataset, builders.make_run(root / "run", dataset)
