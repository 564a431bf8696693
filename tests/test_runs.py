"""utils/runs.py: a saved model loads where only utils.runs was imported (evaluation does not import training)."""

import subprocess
import sys

from conftest import ROOT


def test_a_saved_model_loads_in_a_process_that_imported_only_utils_runs(tmp_path):
    path = tmp_path / "model.keras"
    build = (
        "import model\nfrom utils.losses import get_loss\nfrom utils.metrics import MeanForegroundDice\n"
        "m = model.build_model('unet3d', (16, 16, 16, 1), 3, filters=4, depth=2)\n"
        "m.compile(optimizer='adam', loss=get_loss('dice_ce'), metrics=[MeanForegroundDice(3)])\n"
        f"m.save({str(path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", build], cwd=ROOT, check=True, capture_output=True)
    load = f"from utils.runs import load_model\nprint(type(load_model({str(path)!r}).loss).__name__)"
    result = subprocess.run([sys.executable, "-c", load], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "DiceCELoss"
