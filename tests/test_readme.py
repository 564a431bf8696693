"""README.md's workflow commands run as written, one after the other, on the shipped sample.

Every line of the fenced ``bash`` blocks of the "The workflow" section runs in a fresh folder holding a copy of
``data/hippocampus_sample``: ``python SCRIPT.py ARGS`` through the script's ``main`` in this process (the same code
the command runs, without a TensorFlow start-up per command), any other line through bash. Only budgets are
added: one epoch of two steps per training, no test-time mirroring or pictures in evaluation (flags given last win).
"""

import importlib
import re
import shlex
import shutil
import subprocess

import pytest
from conftest import ROOT, SAMPLE

SHORT_BUDGETS = {
    "train.py": ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--no-tensorboard"],
    "evaluation.py": ["--no-tta", "--pictures", "none", "--quiet"],
    "data_gen.py": [],
}


def workflow_commands(readme: str) -> list[str]:
    """The lines of the ``bash`` blocks between ``## The workflow`` and the next ``## `` heading."""
    section = readme.split("\n## The workflow\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return lines


def test_the_workflow_section_has_the_three_stages():
    commands = workflow_commands((ROOT / "README.md").read_text())
    scripts = [shlex.split(c)[1] for c in commands if c.startswith("python ")]
    assert scripts[0] == "data_gen.py" and "train.py" in scripts and scripts[-1] == "evaluation.py"


@pytest.mark.slow
def test_every_workflow_command_runs_on_the_sample(tmp_path, monkeypatch):
    shutil.copytree(SAMPLE, tmp_path / "data" / SAMPLE.name)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for command in workflow_commands((ROOT / "README.md").read_text()):
        words = shlex.split(command, comments=True)
        if words[0] != "python":
            subprocess.run(["bash", "-c", command], check=True, timeout=60)
            continue
        script = words[1]
        main = importlib.import_module(script.removesuffix(".py")).main
        assert main(words[2:] + SHORT_BUDGETS[script]) == 0, command
        outputs.append((script, words[words.index("--output") + 1]))
    for script, output in outputs:
        expected = {
            "data_gen.py": ["manifest.json", "splits.json", "volumes"],
            "train.py": ["config.json", "model.keras", "history.csv", "train.log"],
            "evaluation.py": ["summary.json", "metrics.csv", "masks", "evaluation.log"],
        }[script]
        missing = [name for name in expected if not (tmp_path / output / name).exists()]
        assert not missing, f"{script} --output {output}: {missing} missing"
    assert (tmp_path / "runs/hippocampus/train.log").read_text().count("Training on") >= 1
