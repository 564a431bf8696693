"""pip install: one package ``keras_medseg`` with working console scripts, and the import rewrite that builds it.

The wheel is built offline from a copy of the sources (the clone is left untouched) with the setuptools of the running
environment and installed into a fresh virtual environment that sees the running environment's packages through a
``.pth`` file, so only the toolkit installs. Skipped where setuptools is missing or pip cannot build offline.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import ROOT

SOURCES = (
    "pyproject.toml",
    "setup.py",
    "README.md",
    "LICENSE",
    "requirements.txt",
    "requirements-dev.txt",
    "data_gen.py",
    "train.py",
    "evaluation.py",
    "model.py",
)
SCRIPTS = {"medseg-prepare": "data_gen", "medseg-train": "train", "medseg-evaluate": "evaluation"}
OFFLINE = re.compile(
    r"No matching distribution|Could not find a version|network|connection|No module named 'setuptools'"
)


def _setup_module():
    spec = importlib.util.spec_from_file_location("medseg_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def test_imports_are_rewritten_to_the_package():
    rewrite = _setup_module().rewrite_imports
    source = (
        "from utils.fileio import write_json\n"
        "from utils import console, fileio\n"
        "import model as model_zoo\n"
        "def load():\n"
        "    import model  # noqa: F401\n"
        "    import utils.losses  # noqa: F401\n"
        "    from utils.train.loop import (\n        train,\n    )\n"
        '"""utils.settings in a docstring stays"""\n'
    )
    assert rewrite(source, "x.py") == (
        "from keras_medseg.utils.fileio import write_json\n"
        "from keras_medseg.utils import console, fileio\n"
        "from keras_medseg import model as model_zoo\n"
        "def load():\n"
        "    from keras_medseg import model  # noqa: F401\n"
        "    import keras_medseg.utils.losses  # noqa: F401\n"
        "    from keras_medseg.utils.train.loop import (\n        train,\n    )\n"
        '"""utils.settings in a docstring stays"""\n'
    )


@pytest.mark.parametrize(
    "source, problem",
    [("import utils\n", "cannot rewrite"), ("import utils.losses\nutils.losses.get_loss('dice')\n", "uses the name")],
)
def test_imports_it_cannot_rewrite_stop_the_build(source, problem):
    with pytest.raises(ValueError, match=problem):
        _setup_module().rewrite_imports(source, "bad.py")


def test_every_module_of_the_clone_rewrites():
    setup = _setup_module()
    for path in [*ROOT.glob("utils/**/*.py"), *(ROOT / f"{name}.py" for name in setup.SCRIPTS)]:
        rewritten = setup.rewrite_imports(path.read_text(), str(path))
        compile(rewritten, str(path), "exec")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment with the toolkit's wheel installed; returns its folder."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: pip cannot build the wheel offline")
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "utils", source / "utils", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(
        [*pip, "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index", "-w", str(base / "wheels"), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if built.returncode and OFFLINE.search(built.stdout + built.stderr):
        pytest.skip(f"pip cannot build offline: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stdout + built.stderr
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((base / "wheels").glob("keras_medseg-*.whl"))
    done = subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {"venv": venv, "site": site, "wheel": wheel}


def test_the_wheel_declares_dependencies_scripts_and_licence(installed):
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = wheel.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(info).decode()
        entry_points = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert {name.split("/")[0] for name in names} == {"keras_medseg", info.split("/")[0]}
    for requirement in ("tensorflow", "keras", "tensorboard", "numpy", "nibabel", "SimpleITK"):
        assert re.search(rf"^Requires-Dist: {requirement}\b", metadata, re.M), requirement
    assert re.search(r'^Requires-Dist: pytest.*extra == "test"', metadata, re.M)
    assert "License-Expression: Apache-2.0" in metadata
    for script, module in SCRIPTS.items():
        assert f"{script} = keras_medseg.{module}:main" in entry_points


def test_nothing_generic_lands_in_site_packages(installed):
    top = {path.name for path in installed["site"].iterdir()}
    assert top == {"keras_medseg", f"keras_medseg-{_pyproject_version()}.dist-info", "dependencies.pth"}
    python = installed["venv"] / "bin" / "python"
    probe = (
        "import sys, keras_medseg.train, keras_medseg.data_gen, keras_medseg.evaluation; "
        "print(keras_medseg.__version__, sorted({m.split('.')[0] for m in sys.modules} & {'utils', 'model', 'train'}))"
    )
    done = subprocess.run([python, "-c", probe], cwd=installed["venv"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [_pyproject_version(), "[]"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_answer_version_and_help(installed, script):
    path = installed["venv"] / "bin" / script
    version = subprocess.run([path, "--version"], cwd=installed["venv"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"{script} {_pyproject_version()} (keras-medseg)"
    shown = subprocess.run([path, "--help"], cwd=installed["venv"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: {script}") and "--verbose" in shown.stdout and "--output" in shown.stdout
