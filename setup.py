"""Build the installed package ``keras_medseg`` from the clone's layout, without moving a file.

A clone runs as it is: ``python train.py`` with ``utils/`` and ``model.py`` importable from the repository root, whose
modules import each other as ``utils.…`` and ``model``. Installed, those generic names must not land at the top of
site-packages, where they would shadow or be shadowed by any other ``utils``. So the wheel holds one package,
``keras_medseg``, made of the same files (``keras_medseg/train.py``, ``keras_medseg/utils/…``), and while building it
the toolkit's own absolute imports are rewritten to name the package (``from utils.fileio import …`` becomes
``from keras_medseg.utils.fileio import …``, ``import model as model_zoo`` becomes
``from keras_medseg import model as model_zoo``), as pip's ``vendoring`` tool does for the libraries pip ships. Only
import statements change; the build stops with a message naming the file when it meets an import it cannot rewrite.
An editable install (``pip install -e .``) is not supported: work in the clone as it is.

Everything else (name, version, dependencies, console scripts) is declared in ``pyproject.toml``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGE = "keras_medseg"
ROOT = Path(__file__).resolve().parent
SCRIPTS = ("data_gen", "train", "evaluation", "model")  # the modules at the clone's root that the package holds
TOP_LEVEL = ("utils", "model", *SCRIPTS)
INIT = '''"""keras-medseg: segment tumours and organs in CT, MRI and PET volumes with Keras 3.

Console scripts: ``medseg-prepare`` (data_gen.py), ``medseg-train`` (train.py), ``medseg-evaluate``
(evaluation.py). Library: ``keras_medseg.model.build_model``, ``keras_medseg.utils.losses.get_loss``, ...
"""

from keras_medseg.utils.console import version as _version

__version__ = _version()
'''

_NAMES = "|".join(TOP_LEVEL)
REWRITES = (
    (re.compile(rf"^(\s*)from ({_NAMES})((?:\.\w+)*) import ", re.M), rf"\1from {PACKAGE}.\2\3 import "),
    (re.compile(rf"^(\s*)import ({'|'.join(SCRIPTS)})\b(?!\.)", re.M), rf"\1from {PACKAGE} import \2"),
    (re.compile(r"^(\s*)import utils((?:\.\w+)+)", re.M), rf"\1import {PACKAGE}.utils\2"),
)
LEFT = re.compile(rf"^\s*(from|import) ({_NAMES})\b", re.M)


def packages() -> list[str]:
    """``keras_medseg`` and one package per folder of ``utils/`` that has an ``__init__.py``."""
    found = [PACKAGE]
    for init in sorted((ROOT / "utils").rglob("__init__.py")):
        if "__pycache__" not in init.parts:
            found.append(".".join((PACKAGE, *init.parent.relative_to(ROOT).parts)))
    return found


def rewrite_imports(text: str, name: str) -> str:
    """The module's source with the toolkit's absolute imports naming :data:`PACKAGE`.

    Raises:
        ValueError: an import of a top-level name is left (a form this function does not know), or a module binds
            ``utils`` by ``import utils.x`` and then uses the name, which the rewrite would break.
    """
    tree = ast.parse(text)
    binds_utils = any(
        isinstance(node, ast.Import)
        and any(alias.name.startswith("utils.") and not alias.asname for alias in node.names)
        for node in ast.walk(tree)
    )
    if binds_utils and any(isinstance(node, ast.Name) and node.id == "utils" for node in ast.walk(tree)):
        raise ValueError(f"{name}: uses the name 'utils' bound by 'import utils.…'; use 'from utils import …'")
    for pattern, replacement in REWRITES:
        text = pattern.sub(replacement, text)
    left = LEFT.search(text)
    if left:
        raise ValueError(f"{name}: cannot rewrite {left.group(0).strip()!r} for the installed package")
    return text


class BuildPackage(build_py):
    """``build_py`` that keeps only :data:`SCRIPTS` at the package's root, writes its ``__init__.py`` and rewrites
    the imports of every module it built."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == PACKAGE:
            modules = [m for m in modules if m[1] in SCRIPTS]
        return modules

    def run(self):
        super().run()
        target = Path(self.build_lib) / PACKAGE
        (target / "__init__.py").write_text(INIT, encoding="utf-8")
        for path in sorted(target.rglob("*.py")):
            path.write_text(rewrite_imports(path.read_text(encoding="utf-8"), str(path)), encoding="utf-8")


if __name__ == "__main__":  # as pip and setuptools run it; tests import rewrite_imports without building
    setup(packages=packages(), package_dir={PACKAGE: "."}, cmdclass={"build_py": BuildPackage})
