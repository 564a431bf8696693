"""The carried folder of the GPU check (``python benchmarks/gpu_check.py prepare``): what the device call takes
along besides the working tree.

- ``wheels/``: what the device image lacks of what the check imports (its package list in the device tool's
  KINDS.md), for Python 3.12 on x86-64, at the versions of this environment: :data:`WHEELS`. The rest of
  ``requirements.txt`` is either there (numpy, scipy, h5py, scikit-image, matplotlib, pillow, tqdm, pyyaml) or never
  imported by the check (tensorflow: the backend is jax; nibabel, SimpleITK, pydicom, highdicom: the data is prepared
  here, and the check scores on the prepared grid).
- ``hippocampus.tar.gz``: MSD Hippocampus prepared by ``data_gen.py --split 0.6 0.2 0.2 --seed 0`` (``.npy`` volumes;
  gzip takes its 63 MB to 17).
- ``ct_bank.npz``: the source CTs of ``scale.py``.
- ``prepared.json``: when and what.

The folder and the working tree must stay under the 64 MiB a device call carries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LIMIT_MIB = 64
WHEELS = ("keras", "namex", "optree", "monai")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def prepare(carry: Path, work: Path, shared_data: Path) -> int:
    """Build the carried folder: wheels for Python 3.12 x86-64, the prepared Hippocampus (.npy in a .tar.gz) and the
    CT source bank; check that it and the working tree stay under the 64 MiB the device call carries."""
    import importlib.metadata as metadata

    import scale

    wheels = carry / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(wheels), *pins],
        check=True,
    )  # fmt: skip
    work = work.resolve()
    prepared = work / "prepare" / "hippocampus"
    shutil.rmtree(prepared, ignore_errors=True)
    subprocess.run(
        [sys.executable, "data_gen.py", "--input", str(shared_data / "msd_hippocampus"), "--output",
         str(prepared), "--split", "0.6", "0.2", "0.2", "--seed", "0", "--workers", "2"],
        cwd=REPO, check=True, env={**os.environ, "TQDM_DISABLE": "1"},
    )  # fmt: skip
    with tarfile.open(carry / "hippocampus.tar.gz", "w:gz") as tar:
        tar.add(prepared, arcname="hippocampus")
    scale.save_bank(scale.load_sources(shared_data), carry / "ct_bank.npz")
    splits = json.loads((prepared / "splits.json").read_text())
    record = {
        "made": time.strftime("%Y-%m-%d %H:%M %Z"),
        "wheels": sorted(p.name for p in wheels.glob("*.whl")),
        "hippocampus_splits": {k: len(v) for k, v in splits.items()},
    }
    (carry / "prepared.json").write_text(json.dumps(record, indent=1) + "\n")
    carried, tree = folder_bytes(carry), tree_bytes()
    total = (carried + tree) / 2**20
    print(f"carry {carry}: {carried / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB; together {total:.1f} MiB")
    if total > LIMIT_MIB:
        print(
            f"gpu_check.py: error: {total:.1f} MiB is over the {LIMIT_MIB} MiB a device call carries", file=sys.stderr
        )
        return 1
    return 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tree_bytes() -> int:
    """Tracked files plus untracked files git does not ignore: what a device call sends besides ``carry``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
        check=True,
    ).stdout.split(b"\0")  # fmt: skip
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())
