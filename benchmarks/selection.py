"""Is the best checkpoint chosen by validation *patches* as good as the one chosen by whole validation *volumes*?

    python benchmarks/selection.py                     # 24 epochs; writes benchmarks/measured/epyc_selection.json
    python benchmarks/selection.py --patch-size 16 32 16 --output benchmarks/measured/epyc_selection_patch16.json
    python benchmarks/selection.py --patch-size 16 32 16 --seed 1 \
        --output benchmarks/measured/epyc_selection_patch16_seed1.json
    python benchmarks/selection.py --epochs 4 --output /tmp/selection.json       # a quick look

``--validation auto`` scores seeded validation patches each epoch when whole volumes would cost more than a fifth of
the epoch (a hundred 512 x 512 x 200 CT cases), and ``model.keras`` is the epoch with the best ``val_dice``. This
benchmark shows on MSD Hippocampus what that choice costs. The same seeded split as ``quality.py`` (140 development
cases prepared by ``data_gen.py``, its default 112 train / 28 val; 60 held out) and one training run,
``train.py --model unet3d --validation volumes --epochs E --seed 0`` with every other setting at its default, in
which two callbacks passed to :func:`utils.train.loop.train` add, after each epoch:

- ``val_dice_patches``: the patch score of the same 28 validation cases, exactly what ``--validation patches`` would
  log for this configuration (:meth:`utils.train.callbacks.Validation.evaluate_patches`, its own seeded patches), with
  the time each validation took (``val_seconds_volumes``, ``val_seconds_patches``);
- the epoch's model, saved as ``epochs/epoch_NNN.keras`` beside the run.

Neither changes the training: the volumes' ``val_dice`` still picks ``model.keras``, the batches and learning rates are
the plain run's. Then every epoch's model is scored on the 60 held-out cases the way ``quality.py`` scores its run:
``evaluation.py --run EPOCH_RUN --input HELD_OUT`` with its defaults (prepared with the run's settings, test-time
mirroring, back on the source grid), the mean over cases of each case's mean dice over the two classes. The summary:
the epoch each criterion chooses (the first best, as the run's checkpoint does), the held-out dice of each choice,
the best held-out dice of any epoch (the oracle) and each choice's shortfall from it, and Spearman's rank correlation
of the two validation series, and of each with the held-out series.

The planned patch (40 x 56 x 40) is larger than a Hippocampus case (about 35 x 50 x 36), so there a patch is nearly
the whole case and the two scores can hardly differ. ``--patch-size 16 32 16`` (an eighth of a case, as a 128^3
patch is a small part of a CT) is the test that means something: with it ``--validation auto`` itself chooses
patches for these 28 cases (``auto_validation`` in the result) and each patch sees part of a case only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from common import HIPPOCAMPUS, REPO, default_workdir, loadavg, machine, msd_subset, run_script
from quality import case_mean_dice, selection

EPOCHS = 24  # about 7 minutes of training on 2 AMD EPYC cores
OUTPUT = REPO / "benchmarks" / "measured" / "epyc_selection.json"
SUFFIX = "_patches"


def train_args(data: Path, run_dir: Path, epochs: int, patch_size: list[int] | None = None, seed: int = 0) -> list[str]:
    """The training command's flags: the defaults, whole-volume validation, a fixed number of epochs (and a patch
    size other than the planned one)."""
    patch = ["--patch-size", *map(str, patch_size)] if patch_size else []
    return ["--data", str(data), "--output", str(run_dir), "--model", "unet3d", "--validation", "volumes",
            "--epochs", str(epochs), "--seed", str(seed), *patch]  # fmt: skip


def train_with_both_scores(argv: list[str]) -> int:
    """``train.py`` with ``argv``, plus the patch score and the per-epoch models (runs in its own process)."""
    from utils.device import enable_onednn

    enable_onednn()
    import keras

    import train as train_script
    from utils.console import start
    from utils.fileio import command_line
    from utils.prepared import PreparedDataset
    from utils.runs import load_config, save_model
    from utils.train.callbacks import Validation, validation_mode
    from utils.train.loop import train

    class PatchScore(keras.callbacks.Callback):
        """Logs ``val_dice_patches`` (and per class ``val_dice_patches_<k>``) and the seconds of both validations."""

        def __init__(self, data: str, run_dir: Path):
            super().__init__()
            self.data, self.run_dir, self.scorer, self.last_step = data, run_dir, None, 0.0

        def on_train_begin(self, logs=None):  # config.json holds the resolved settings once training starts
            dataset, config = PreparedDataset(self.data), load_config(self.run_dir)
            self.scorer = Validation(dataset, dataset.split("val"), config)
            self.scorer.set_model(self.model)
            auto = validation_mode(dataclasses.replace(config, validation="auto"), dataset, self.scorer.case_ids)
            auto_file(self.run_dir).write_text(json.dumps({"auto_validation": auto}))

        def on_train_batch_end(self, batch, logs=None):
            self.last_step = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            volumes = time.perf_counter() - self.last_step  # the volume validation ran between the two
            start_patches = time.perf_counter()
            scores = self.scorer.evaluate_patches()
            logs.update({patch_key(key): value for key, value in scores.items()})
            logs.update(val_seconds_volumes=volumes, val_seconds_patches=time.perf_counter() - start_patches)

    class EpochModels(keras.callbacks.Callback):
        def __init__(self, folder: Path):
            super().__init__()
            self.folder = folder

        def on_epoch_end(self, epoch, logs=None):
            save_model(self.model, self.folder / f"epoch_{epoch + 1:03d}.keras")

    args = train_script.build_parser().parse_args(argv)
    start(vars(args).pop("verbose"))
    settings = {key: value for key, value in vars(args).items() if value is not None and key != "config"}
    run_dir = Path(settings["output"])
    callbacks = [PatchScore(settings["data"], run_dir), EpochModels(run_dir.parent / f"{run_dir.name}_epochs")]
    config = train(settings, command_line("train.py", argv), callbacks=callbacks)
    print(f"best val_dice {config.best_val_dice:.4f} after {config.epochs_done} epochs", flush=True)
    return 0


def auto_file(run_dir: Path) -> Path:
    """Where the training stage writes what ``--validation auto`` would have chosen for this run."""
    return run_dir.parent / f"{run_dir.name}_auto.json"


def patch_key(key: str) -> str:
    """The patch score's log key: ``val_dice`` -> ``val_dice_patches``, ``val_dice_1`` -> ``val_dice_patches_1``,
    ``val_iou`` -> ``val_iou_patches`` (never the volumes' own keys)."""
    return key.replace("val_dice", "val_dice" + SUFFIX, 1) if key.startswith("val_dice") else key + SUFFIX


def epoch_run(run_dir: Path, model_file: Path, folder: Path) -> Path:
    """A run folder holding one epoch's model: the run's ``config.json`` and ``dataset/``, the model as
    ``model.keras``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy2(run_dir / "config.json", folder / "config.json")
    shutil.copytree(run_dir / "dataset", folder / "dataset")
    shutil.copy2(model_file, folder / "model.keras")
    return folder


def score_held_out(run_dir: Path, held_out_raw: Path, workdir: Path) -> list[dict]:
    """Every epoch's model scored on the held-out cases by ``evaluation.py`` (in one process, one call each)."""
    from utils.device import enable_onednn

    enable_onednn()
    import evaluation

    rows = []
    for model_file in sorted((run_dir.parent / f"{run_dir.name}_epochs").glob("epoch_*.keras")):
        epoch = int(model_file.stem.split("_")[1])
        folder = epoch_run(run_dir, model_file, workdir / "epoch_runs" / model_file.stem)
        results = workdir / "results" / model_file.stem
        shutil.rmtree(results, ignore_errors=True)
        argv = ["--run", str(folder), "--input", str(held_out_raw), "--output", str(results), "--metrics", "dice",
                "--pictures", "none", "--quiet"]  # fmt: skip
        if evaluation.main(argv) != 0:
            raise RuntimeError(f"evaluation.py {' '.join(argv)} failed")
        dice, per_class, cases = case_mean_dice(results / "metrics.csv")
        per_class = {label: round(value, 4) for label, value in per_class.items()}
        rows.append(
            {"epoch": epoch, "heldout_dice": round(dice, 4), "heldout_per_class": per_class, "heldout_cases": cases}
        )
        print(f"epoch {epoch}: held-out dice {dice:.4f} ({cases} cases)", flush=True)
    return rows


def first_best(values: list[float]) -> int:
    """Index of the first maximum (the run keeps the first best: a later equal score does not replace it)."""
    array = np.asarray(values, dtype=float)
    return int(np.nanargmax(array))


def summarize(rows: list[dict]) -> dict:
    """The two choices, their held-out dice, the oracle and the rank correlations."""
    from scipy.stats import spearmanr

    volumes, patches = [r["val_dice"] for r in rows], [r["val_dice" + SUFFIX] for r in rows]
    held_out = [r["heldout_dice"] for r in rows]
    by_volumes, by_patches, oracle = first_best(volumes), first_best(patches), first_best(held_out)

    def choice(index: int) -> dict:
        return {
            "epoch": rows[index]["epoch"],
            "heldout_dice": round(held_out[index], 4),
            "below_oracle": round(held_out[oracle] - held_out[index], 4),
        }

    def rho(a, b) -> float:
        return round(float(spearmanr(a, b).statistic), 3)

    volume_seconds = np.median([r["val_seconds_volumes"] for r in rows])
    patch_seconds = np.median([r["val_seconds_patches"] for r in rows])
    return {
        "by_volume_dice": choice(by_volumes),
        "by_patch_dice": choice(by_patches),
        "oracle": choice(oracle),
        "last_epoch": choice(len(rows) - 1),
        "patch_minus_volume_heldout": round(held_out[by_patches] - held_out[by_volumes], 4),
        "spearman_patch_volume": rho(patches, volumes),
        "spearman_volume_heldout": rho(volumes, held_out),
        "spearman_patch_heldout": rho(patches, held_out),
        "spearman_patch_volume_second_half": rho(patches[len(rows) // 2 :], volumes[len(rows) // 2 :]),
        "median_validation_seconds": {"volumes": round(float(volume_seconds), 2), "patches": round(patch_seconds, 2)},
    }


def epoch_rows(run_dir: Path, held_out: list[dict]) -> list[dict]:
    """history.csv's validation columns joined with the held-out dice of each epoch."""
    from utils.train.callbacks import read_history

    scores = {row["epoch"]: row for row in held_out}
    keep = ("loss", "fg_dice", "val_dice", "val_dice" + SUFFIX, "val_seconds_volumes", "val_seconds_patches", "lr")
    rows = []
    for row in read_history(run_dir / "history.csv"):
        epoch = int(row["epoch"]) + 1
        rows.append({"epoch": epoch, **{k: round(float(row[k]), 6) for k in keep if k in row}, **scores[epoch]})
    return rows


def run(epochs: int, workdir: Path, output: Path, patch_size: list[int] | None = None, seed: int = 0) -> dict:
    log_dir = workdir / "logs"
    record = {"machine": machine(), "loadavg_before": loadavg()}
    development, held_out = selection()
    dev_raw = msd_subset(HIPPOCAMPUS, development, workdir / "raw" / "hippocampus_dev")
    held_out_raw = msd_subset(HIPPOCAMPUS, held_out, workdir / "raw" / "hippocampus_heldout")
    data, run_dir = workdir / "prepared" / "hippocampus_dev", workdir / "runs" / "selection"
    for folder in (data, run_dir, run_dir.parent / f"{run_dir.name}_epochs"):
        shutil.rmtree(folder, ignore_errors=True)
    run_script(
        [sys.executable, "data_gen.py", "--input", str(dev_raw), "--output", str(data), "--workers", "2"],
        log_dir / "selection.prepare.log",
    )
    args = train_args(data, run_dir, epochs, patch_size, seed)
    train_seconds = run_script(
        [sys.executable, __file__, "--stage", "train", "--", *args], log_dir / "train.log", env={"CI": "1"}
    )  # CI: one line per epoch in the log
    record["loadavg_after_training"] = loadavg()
    start = time.perf_counter()
    held = run_heldout_stage(run_dir, held_out_raw, workdir, log_dir)
    rows = epoch_rows(run_dir, held)
    config = json.loads((run_dir / "config.json").read_text())
    auto = json.loads(auto_file(run_dir).read_text())["auto_validation"] if auto_file(run_dir).is_file() else None
    record.update(
        command=f"python train.py {' '.join(args)} (plus the patch score and per-epoch models)",
        cases={"development": len(development), "held_out": len(held_out), "seed": 2024},
        auto_validation=auto,  # what --validation auto chooses for this patch size and these validation cases
        train_process_seconds=round(train_seconds, 1),
        heldout_seconds=round(time.perf_counter() - start, 1),
        config={key: config[key] for key in ("patch_size", "batch_size", "steps_per_epoch", "model_args")},
        summary=summarize(rows),
        epochs=rows,
        loadavg_after=loadavg(),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print_table(record)
    return record


def run_heldout_stage(run_dir: Path, held_out_raw: Path, workdir: Path, log_dir: Path) -> list[dict]:
    """:func:`score_held_out` in its own process (TensorFlow's threads apart from the parent); returns its rows."""
    result = workdir / "heldout.json"
    run_script(
        [sys.executable, __file__, "--stage", "heldout", "--", str(run_dir), str(held_out_raw), str(workdir)],
        log_dir / "heldout.log",
    )
    return json.loads(result.read_text())


def print_table(record: dict) -> None:
    print(f"{'epoch':>5} {'val_dice':>9} {'patches':>9} {'held-out':>9}")
    for row in record["epochs"]:
        print(f"{row['epoch']:>5} {row['val_dice']:>9.4f} {row['val_dice' + SUFFIX]:>9.4f} {row['heldout_dice']:>9.4f}")
    summary = record["summary"]
    for name in ("by_volume_dice", "by_patch_dice", "oracle", "last_epoch"):
        choice = summary[name]
        print(
            f"{name}: epoch {choice['epoch']}, held-out {choice['heldout_dice']:.4f} "
            f"({choice['below_oracle']:.4f} below the best epoch)"
        )
    print(
        f"Spearman patch/volume {summary['spearman_patch_volume']}, volume/held-out "
        f"{summary['spearman_volume_heldout']}, patch/held-out {summary['spearman_patch_heldout']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs (default %(default)s)")
    parser.add_argument("--workdir", type=Path, default=default_workdir() / "selection", help="scratch folder")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="result JSON (default %(default)s)")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("D", "H", "W"), help="default: planned")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default %(default)s)")
    parser.add_argument("--stage", choices=("train", "heldout"), help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.stage == "train":
        return train_with_both_scores(args.rest)
    if args.stage == "heldout":
        run_dir, held_out_raw, workdir = map(Path, args.rest)
        rows = score_held_out(run_dir, held_out_raw, workdir)
        (workdir / "heldout.json").write_text(json.dumps(rows))
        return 0
    run(args.epochs, args.workdir, args.output, args.patch_size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
