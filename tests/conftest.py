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


import pytest  # noqa: E402


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
