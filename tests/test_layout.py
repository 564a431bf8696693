"""The rules of docs/ARCHITECTURE.md: who may import whom, module sizes, public APIs only, no dangling references."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UTILS = ROOT / "utils"
STAGES = ("prepare", "train", "evaluate")
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(p for p in UTILS.rglob("*.py") if "__pycache__" not in p.parts)


def _package(path: Path) -> str:
    """``prepare``, ``train``, ``evaluate``, ``formats`` or ``shared``."""
    parts = path.relative_to(UTILS).parts
    return parts[0] if len(parts) > 1 else "shared"


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "utils" and len(parts) > 1:
                found.add(parts[1] if parts[1] in (*STAGES, "formats") else "shared")
    return found


ALLOWED = {
    "shared": {"shared", "formats"},
    "formats": {"shared", "formats"},
    "prepare": {"shared", "formats", "prepare"},
    "train": {"shared", "formats", "train"},
    "evaluate": {"shared", "formats", "evaluate"},
}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_stages(path):
    package = _package(path)
    imported = _imported_packages(path)
    assert imported <= ALLOWED[package], f"{path.relative_to(ROOT)} ({package}) imports {imported - ALLOWED[package]}"


def test_shared_modules_that_formats_use_import_no_format():
    # formats/ may use fileio and geometry; those two must not need formats/ back (no cycle through the shared layer).
    for name in ("fileio.py", "geometry.py", "settings.py", "cli.py"):
        assert "formats" not in _imported_packages(UTILS / name), name


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_too_long(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


PRIVATE = re.compile(
    r"keras\.src|\._DATA_POOLS|_maybe_symbolic_build|\._pool\b|\._cache\b|\._state\b|\._distribute_strategy|"
    r"\._set\(|\._processes\b|\._symbolic_build"
)


def test_no_private_attributes_of_other_libraries():
    hits = []
    for path in [*_modules(), *ROOT.glob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if PRIVATE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def _referenced_paths(text: str) -> set[str]:
    """Repository paths named in text: ``utils/...``, ``docs/...``, ``tests/...``, ``scripts/...``,
    ``benchmarks/...`` ending in a file suffix."""
    pattern = r"(?<![\w./-])((?:utils|docs|tests|scripts|benchmarks|data)/[\w./-]*\.(?:py|md|sh|json|csv))"
    return set(re.findall(pattern, text))


def test_every_referenced_repository_file_exists():
    sources = [*_modules(), *ROOT.glob("*.py"), *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]
    sources += [*(ROOT / "scripts").glob("*"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "benchmarks").glob("*.md")]
    missing = []
    for source in sources:
        for ref in _referenced_paths(source.read_text(errors="replace")):
            if "<" in ref or "*" in ref or ref.startswith("data/") and not ref.startswith("data/hippocampus_sample"):
                continue  # patterns and generated folders (data/<name>/...)
            if not (ROOT / ref).exists():
                missing.append(f"{source.relative_to(ROOT)} names {ref}")
    assert not missing, "\n".join(missing)


def test_no_reference_to_a_design_file_the_repository_lacks():
    for path in [*_modules(), *ROOT.glob("*.py"), ROOT / "README.md"]:
        text = path.read_text()
        assert "DESIGN.md" not in text, (
            f"{path.relative_to(ROOT)} names DESIGN.md (the project's copy is docs/ARCHITECTURE.md)"
        )
