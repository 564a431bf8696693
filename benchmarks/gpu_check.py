"""The GPU check (issue 15): the recipes' train steps, the loader's overhead, sliding-window inference of a full-size
CT and the held-out dice after a short GPU training, against plain PyTorch and MONAI on the same GPU, in one command.

    python benchmarks/gpu_check.py prepare        # here: the carried folder .gpu_carry/ (wheels, data, CT bank)
    bash benchmarks/gpu_check.sh --dry-run        # here: the whole check at tiny sizes on the CPU (a few minutes)
    bash benchmarks/gpu_check.sh                  # on the device (the exact call is in benchmarks/RESULTS.md)

What it measures, each part in its own process (``KERAS_BACKEND=jax``; JAX and PyTorch never share a GPU process):

1. ``steps_keras``: the train step (median of timed steps after a warm-up that compiles) of the GPU recipe and of
   the CPU recipe (``utils.settings.RECIPES``, passed explicitly), each in float32 and mixed precision, built as
   ``train.py`` builds it on the prepared MSD Hippocampus (planned patch, batch and depth).
2. ``steps_torch``: the same four networks, losses, optimizers and batch shapes in plain PyTorch
   (``gpu_torch.RecipeUNet3D``, same parameter count; autocast for mixed precision).
3. ``loader`` (in the ``steps_keras`` process, after the GPU recipe's steps): the GPU recipe's steps fed by the
   toolkit's loader (``BatchLoader`` over the recipe's sampler with its strong augmentation; thread, then process
   workers, as many as the recipe starts) against the same steps on ready batches: the loader's overhead.
4. ``infer_keras`` / ``infer_monai``: ``utils.inference.predict_volume`` against MONAI's ``sliding_window_inference``
   of a 512 x 512 x 256 CT from ``scale.py`` (same network, window, overlap 0.5, Gaussian blending sigma 1/8, 4
   windows per call), host array in, host probabilities out; seconds and peak GPU memory, float32 and mixed.
5. ``train``: ``train.py`` with the GPU recipe's flags for 5 minutes (less if the call's budget is short: the minutes
   used are recorded) on the Hippocampus prepared here by ``data_gen.py --split 0.6 0.2 0.2``, then ``eval``: the
   mean foreground dice of its 40 test cases, never trained on, predicted as ``evaluation.py`` does by default.

Everything goes into one JSON (``$OUT/gpu_check.json``, rewritten after each part) with the machine's facts; the
log, ``nvidia-smi``'s answer, and the training run's ``history.csv`` and ``config.json`` come back beside it. Each
part is time-boxed against the call's deadline; a part that fails or runs out of time is recorded and the others
still run. The parts before training leave it at least 80 % of its 5 minutes; training takes what is left up to 5
minutes, less the eval part's reserve. ``--keras-torch`` also times the GPU recipe's steps with
``KERAS_BACKEND=torch`` (off by default: the call's 10 minutes are full). ``--dry-run`` runs the same code on the CPU
with tiny networks, patches and volumes (the rehearsal).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

from utils.settings import RECIPES, gpu_workers  # noqa: E402  (light: imports nothing heavy)

CARRY = REPO / ".gpu_carry"
SHARED_DATA = REPO.parent / "shared" / "data"
NUM_CLASSES = 3
PROFILES = {
    "device": {
        "steps": {"warmup": 3, "timed": 12},
        "loader": {"steps": 30, "workers": gpu_workers()},
        "train_minutes": 5.0,
        "min_train_minutes": 1.0,
        "train_flags": [],
        "inference": {
            "depth": 256, "in_plane": 512, "window": [128, 128, 128], "overlap": 0.5, "batch_size": 4, "reps": 2,
            "model_args": {"filters": 32, "max_filters": 320, "depth": 6, "norm": "instance", "stem_stride": 1},
        },
        "model_scale": {},
        "overrides": {},
        "eval_cases": None,
        "reserve_s": {"eval": 45, "train_start": 30},
        "protect_train_fraction": 0.8,
        "timeouts_s": {
            "steps_keras": 200, "steps_torch": 90, "infer_keras_fp32": 75, "infer_keras_mixed": 75, "infer_monai": 90,
            "eval": 90, "steps_keras_torch": 90,
        },
    },
    "dry": {
        "steps": {"warmup": 1, "timed": 2},
        "loader": {"steps": 3, "workers": 2},
        "train_minutes": 0.4,
        "min_train_minutes": 0.2,
        "train_flags": ["--steps-per-epoch", "4"],
        "inference": {
            "depth": 64, "in_plane": 128, "window": [32, 32, 32], "overlap": 0.5, "batch_size": 4, "reps": 1,
            "model_args": {"filters": 4, "max_filters": 16, "depth": 3, "norm": "instance", "stem_stride": 1},
        },
        "model_scale": {"filters": 4, "max_filters": 16},
        "overrides": {"patch_size": [16, 24, 16], "batch_size": 2},
        "eval_cases": 4,
        "reserve_s": {"eval": 60, "train_start": 30},
        "protect_train_fraction": 0.8,
        "timeouts_s": {
            "steps_keras": 600, "steps_torch": 300, "infer_keras_fp32": 300, "infer_keras_mixed": 300,
            "infer_monai": 300, "eval": 300, "steps_keras_torch": 300,
        },
    },
}  # fmt: skip


def recipe_overrides(recipe: str, profile: dict) -> dict:
    """The recipe's settings as explicit ``train.py`` settings (a rehearsal's profile shrinks the network, the patch
    and the batch)."""
    model_args = {**RECIPES[recipe]["model_defaults"]["unet"], **profile["model_scale"]}
    settings = {"model": "unet3d", "model_args": model_args, **RECIPES[recipe]["settings"]}
    if recipe == "gpu":
        settings["workers"] = gpu_workers()
    return {**settings, **profile["overrides"]}


def step_configs(profile: dict) -> list[dict]:
    """GPU recipe mixed (the recipe itself; the loader is measured on it), GPU fp32, CPU mixed, CPU fp32."""
    configs = []
    for recipe, mixed in (("gpu", True), ("gpu", False), ("cpu", True), ("cpu", False)):
        overrides = recipe_overrides(recipe, profile)
        label = f"{recipe}_recipe_{'mixed' if mixed else 'fp32'}"
        configs.append({"label": label, "recipe": recipe, "mixed": mixed, "overrides": overrides})
    return configs


def train_flags(overrides: dict) -> list[str]:
    """``train.py`` flags of a settings dict: ``--key-name value``, ``--flag`` for true, JSON for dicts, lists
    spread."""
    flags = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif isinstance(value, list | tuple):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


# ---------------------------------------------------------------------------------------------------- the parts


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_part(name: str, spec: dict, result_path: Path) -> None:
    """One part in this process; its figures go to ``result_path`` as they are measured."""
    result: dict = {}

    def record(key, value):
        result[key] = value
        write_json(result_path, result)

    if name == "ct_case":
        import numpy as np
        import scale

        started = time.time()
        sources = scale.load_bank(spec["bank"])
        case = scale.make_case(spec["depth"], sources, seed=0, in_plane=spec["in_plane"])
        np.save(spec["case_path"], scale.normalised(case.image))
        facts = {"id": case.case_id, "source": case.source, "shape": list(case.image.shape), "spacing": case.spacing}
        record("case", {**facts, "seconds": time.time() - started})
        return
    if name.startswith("steps_keras"):
        import gpu_keras

        record("backend", gpu_keras.backend_facts())
        gpu_keras.steps(spec, record)
        return
    if name == "steps_torch":
        import gpu_keras  # planning only: JAX_PLATFORMS=cpu keeps it off the GPU
        import gpu_torch
        import torch

        record("torch", {"version": torch.__version__, "cuda": torch.cuda.is_available()})
        for item in spec["step_configs"]:
            if time.time() > float(spec["deadline"]):
                record(item["label"], {"skipped": "out of time"})
                continue
            _, config = gpu_keras.resolve(
                spec["data"], {**item["overrides"], "mixed_precision": item["mixed"]}, item["recipe"]
            )
            summary = gpu_keras.config_summary(config)
            figures = gpu_torch.TorchTrainStep(summary, item["mixed"]).time_steps(spec["warmup"], spec["timed"])
            record(item["label"], {"config": summary, **figures})
            print(f"torch {item['label']}: {figures['step_ms']:.1f} ms/step", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return
    if name.startswith("infer_"):
        import numpy as np

        image = np.load(spec["case_path"])
        for key in spec["precisions"]:
            mixed = key == "mixed"
            if time.time() > float(spec["deadline"]):
                record(key, {"skipped": "out of time"})
                continue
            if name.startswith("infer_keras"):
                import gpu_keras

                figures = gpu_keras.inference({**spec, "num_classes": NUM_CLASSES}, image, mixed)
            else:
                import gpu_torch

                options = {k: spec[k] for k in ("batch_size", "overlap", "reps")}
                figures = gpu_torch.monai_inference(
                    image, spec["model_args"], spec["window"], NUM_CLASSES, mixed, sigma_scale=0.125, **options
                )
            record(key, {"shape": list(image.shape), **figures})
            print(f"{name} {key}: {figures['seconds']:.2f} s, peak GPU {figures['gpu_peak_gib']} GiB", flush=True)
        return
    if name == "eval":
        import gpu_keras

        gpu_keras.evaluate(spec, record)
        return
    raise ValueError(f"unknown part {name!r}")


class Runner:
    """Runs the parts in subprocesses against one deadline and keeps the report up to date."""

    def __init__(self, args, profile: dict):
        self.args, self.profile = args, profile
        self.deadline = float(args.deadline) if args.deadline else time.time() + 570
        self.work = args.work.resolve()
        self.out = args.out.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
        self.report["deadline_in_s"] = round(self.deadline - time.time(), 1)

    def save(self) -> None:
        write_json(self.out / "gpu_check.json", self.report)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def spawn(self, name: str, spec: dict, env: dict | None = None) -> tuple[subprocess.Popen, Path, float]:
        spec_path, result_path = self.work / f"{name}.spec.json", self.work / f"{name}.json"
        write_json(spec_path, spec)
        result_path.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__)), "part", name, str(spec_path), str(result_path)]
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True)
        return process, result_path, time.time()

    def finish(self, name: str, spawned, timeout: float) -> dict:
        """Wait for a part (killing its process group at ``timeout``) and file its figures under its name."""
        process, result_path, started = spawned
        status = "ok"
        try:
            code = process.wait(timeout=max(1.0, timeout))
            if code != 0:
                status = f"exited with {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"killed after {timeout:.0f} s (time box)"
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        entry = {"status": status, "seconds": round(time.time() - started, 1), **result}
        self.report["parts"][name] = entry
        self.save()
        print(f"== {name}: {status} in {entry['seconds']} s; {self.remaining():.0f} s left", flush=True)
        return entry

    def protected(self) -> float:
        """Seconds kept for training (a share of its minutes), its start and the eval part while it has not run."""
        if "train" in self.report["parts"] or not self.args.wants("train"):
            return 0.0
        reserve = self.profile["reserve_s"]
        return 60 * self.profile["train_minutes"] * self.profile["protect_train_fraction"] + sum(reserve.values())

    def part(self, name: str, spec: dict, env: dict | None = None) -> dict:
        """Run a part with a time box: its own limit, within what the deadline leaves after the time kept for
        training (:meth:`protected`)."""
        timeout = min(self.profile["timeouts_s"].get(name, 120), self.remaining() - self.protected() - 5)
        if timeout < 10:
            self.report["parts"][name] = {"status": "skipped: out of time"}
            self.save()
            return self.report["parts"][name]
        print(f"== {name} (time box {timeout:.0f} s)", flush=True)
        return self.finish(name, self.spawn(name, {**spec, "deadline": time.time() + timeout - 10}, env), timeout)

    def train(self, data: Path, run_dir: Path) -> dict:
        """``train.py`` with the GPU recipe's flags for the profile's minutes, or what the deadline leaves."""
        reserve = sum(self.profile["reserve_s"].values())  # the eval part, and train.py's start and last save
        minutes = min(self.profile["train_minutes"], (self.remaining() - reserve) / 60)
        if minutes < self.profile["min_train_minutes"]:
            entry = {"status": f"skipped: {max(minutes, 0):.1f} minutes left"}
            self.report["parts"]["train"] = entry
            self.save()
            return entry
        overrides = recipe_overrides("gpu", self.profile)
        flags = train_flags(overrides) + ["--time-limit", f"{minutes:.2f}", "--no-tensorboard", "--seed", "0"]
        command = [sys.executable, "train.py", "--data", str(data), "--output", str(run_dir), *flags]
        command += self.profile["train_flags"]
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"== train ({minutes:.2f} min): {' '.join(command[1:])}", flush=True)
        started = time.time()
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "CI": "1"}, start_new_session=True)
        status = "ok"
        try:
            code = process.wait(timeout=max(10.0, self.remaining() - self.profile["reserve_s"]["eval"]))
            status = "ok" if code == 0 else f"exited with {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = "killed (time box)"
        entry = {"status": status, "seconds": round(time.time() - started, 1), "time_limit_minutes": round(minutes, 2)}
        entry["flags"] = flags + self.profile["train_flags"]
        entry.update(read_run(run_dir))
        for name, target in (("history.csv", "train_history.csv"), ("config.json", "train_config.json")):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, self.out / target)
        self.report["parts"]["train"] = entry
        self.save()
        print(f"== train: {status} in {entry['seconds']} s; {self.remaining():.0f} s left", flush=True)
        return entry


def read_run(run_dir: Path) -> dict:
    """Epochs, steps, best validation dice and the resolved plan of a run folder (what there is of them)."""
    out: dict = {}
    if (run_dir / "state.json").is_file():
        state = json.loads((run_dir / "state.json").read_text())
        out.update(epochs=state.get("epoch"), best_val_dice=state.get("best"), elapsed_s=state.get("elapsed_s"))
    if (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text())
        keys = ("recipe", "patch_size", "batch_size", "model_args", "steps_per_epoch", "workers", "worker_mode")
        out["config"] = {key: config.get(key) for key in keys}
        out["config"]["precision_policy"] = config.get("precision_policy")
        out["config"]["device"] = (config.get("device") or {}).get("devices")
    return out


def unpack_data(carry: Path, work: Path) -> Path:
    """The prepared Hippocampus from ``carry/hippocampus.tar.gz`` into ``work/hippocampus`` (again when the archive
    changed)."""
    archive, target = carry / "hippocampus.tar.gz", work / "hippocampus"
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: not found; run python benchmarks/gpu_check.py prepare first")
    stamp, key = work / "hippocampus.stamp", f"{archive.stat().st_size} {archive.stat().st_mtime_ns}"
    if not (target / "manifest.json").is_file() or not stamp.is_file() or stamp.read_text() != key:
        shutil.rmtree(target, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        stamp.write_text(key)
    return target


def machine_facts() -> dict:
    """CPU, cores, Python and library versions (read without importing them), and the GPU ``nvidia-smi`` names."""
    import importlib.metadata as metadata
    import platform

    versions = {}
    for name in ("keras", "jax", "jaxlib", "torch", "monai", "numpy", "scipy", "optree"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    facts = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        answer = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
        facts["gpu"] = answer.stdout.strip() or answer.stderr.strip()
    else:
        facts["gpu"] = None
    facts["env"] = {k: os.environ.get(k) for k in ("KERAS_BACKEND", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS")}
    return facts


def run(args) -> int:
    profile = PROFILES["dry" if args.dry_run else "device"]
    args.wants = lambda name: not args.only or name in args.only
    runner = Runner(args, profile)
    runner.report["machine"] = machine_facts()
    runner.report["profile"] = profile
    runner.save()
    data = unpack_data(args.carry, runner.work)
    case_path = runner.work / "ct_case.npy"
    inference = dict(profile["inference"])
    ct_spec = {"bank": str(args.carry / "ct_bank.npz"), "case_path": str(case_path), **inference}
    ct_case = runner.spawn("ct_case", ct_spec)  # on the CPU, while the GPU parts start
    common = {"data": str(data), **profile["steps"], "step_configs": step_configs(profile)}
    wanted = args.wants
    if wanted("steps_keras"):  # loader threads first: forked workers of a JAX process may deadlock (the box ends it)
        kinds = [{"mode": mode, "workers": profile["loader"]["workers"]} for mode in ("thread", "process")]
        loader = {"steps": profile["loader"]["steps"], "kinds": kinds, "stall_s": 60}
        runner.part("steps_keras", {**common, "loader": loader})
    if wanted("steps_torch"):
        labels = runner.report["parts"].get("steps_keras", {})
        measured = [c for c in common["step_configs"] if "step_ms" in labels.get(c["label"], {})]
        runner.part(
            "steps_torch", {**common, "step_configs": measured or common["step_configs"]}, {"JAX_PLATFORMS": "cpu"}
        )
    if args.keras_torch and (wanted("steps_keras") or wanted("steps_keras_torch")):
        gpu_only = [c for c in common["step_configs"] if c["recipe"] == "gpu"]
        spec = {**common, "step_configs": gpu_only, "loader": {"kinds": []}}
        runner.part("steps_keras_torch", spec, {"KERAS_BACKEND": "torch"})
    runner.finish("ct_case", ct_case, min(300.0, runner.remaining() - 5))
    spec = {"case_path": str(case_path), **inference}
    if wanted("infer_keras"):  # one process per precision: JAX's peak memory cannot be reset
        for precision in ("fp32", "mixed"):
            runner.part(f"infer_keras_{precision}", {**spec, "precisions": [precision]})
    if wanted("infer_monai"):
        runner.part("infer_monai", {**spec, "precisions": ["fp32", "mixed"]})
    run_dir = runner.work / "run_gpu_recipe"
    if wanted("train"):
        runner.train(data, run_dir)
    if wanted("eval") and (run_dir / "config.json").is_file():
        runner.part("eval", {"data": str(data), "run": str(run_dir), "max_cases": profile["eval_cases"]})
    runner.report["summary"] = summarize(runner.report["parts"])
    runner.report["total_s"] = round(time.time() - (runner.deadline - runner.report["deadline_in_s"]), 1)
    runner.save()
    print_summary(runner.report)
    failed = [n for n, p in runner.report["parts"].items() if p.get("status") != "ok"]
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------- the summary


def _ratio(peer, ours):
    return round(peer / ours, 3) if isinstance(peer, int | float) and isinstance(ours, int | float) and ours else None


def summarize(parts: dict) -> dict:
    """The figures of the GPU table: step ratios (PyTorch ms / ours ms), inference ratios (MONAI s / ours s), the
    loader's overhead and the held-out dice."""
    keras_steps, torch_steps = parts.get("steps_keras", {}), parts.get("steps_torch", {})
    summary: dict = {"train_step": {}, "inference": {}, "loader_overhead": {}, "quality": {}}
    for index, item in enumerate(step_configs(PROFILES["device"])):
        ours, peer = keras_steps.get(item["label"], {}), torch_steps.get(item["label"], {})
        summary["train_step"][item["label"]] = {
            "keras_ms": ours.get("step_ms"),
            "pytorch_ms": peer.get("step_ms"),
            "ratio": _ratio(peer.get("step_ms"), ours.get("step_ms")),
            "keras_torch_backend_ms": parts.get("steps_keras_torch", {}).get(item["label"], {}).get("step_ms"),
            # JAX's peak covers everything its process measured before: only the first configuration's is its own.
            "keras_gpu_peak_gib": ours.get("gpu_peak_gib") if index == 0 else None,
            "pytorch_gpu_peak_gib": peer.get("gpu_peak_gib"),
        }
    for key, value in keras_steps.items():
        if key.startswith("loader_") and "overhead" in value:
            summary["loader_overhead"][key] = round(value["overhead"], 3)
    for precision in ("fp32", "mixed"):
        ours = parts.get(f"infer_keras_{precision}", {}).get(precision, {})
        peer = parts.get("infer_monai", {}).get(precision, {})
        summary["inference"][precision] = {
            "ours_s": ours.get("seconds"),
            "monai_s": peer.get("seconds"),
            "ratio": _ratio(peer.get("seconds"), ours.get("seconds")),
            "ours_gpu_peak_gib": ours.get("gpu_peak_gib"),
            "monai_gpu_peak_gib": peer.get("gpu_peak_gib"),
        }
    train, test = parts.get("train", {}), parts.get("eval", {}).get("test", {})
    summary["quality"] = {
        "test_mean_foreground_dice": test.get("mean_foreground_dice"),
        "test_cases": test.get("cases"),
        "train_minutes": train.get("time_limit_minutes"),
        "epochs": train.get("epochs"),
        "best_val_dice": train.get("best_val_dice"),
    }
    return summary


def print_summary(report: dict) -> None:
    summary = report["summary"]

    def show(value, digits=3):
        return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"

    print(f"\nGPU check ({'dry run, CPU' if report['dry_run'] else report['machine'].get('gpu')}), "
          f"{report['total_s']} s; figures in gpu_check.json")  # fmt: skip
    print("train step (ms)        keras  pytorch  ratio (>= 1.0: ours faster)")
    for label, row in summary["train_step"].items():
        print(f"  {label:20s} {show(row['keras_ms'], 1):>7s} {show(row['pytorch_ms'], 1):>8s}  {show(row['ratio'])}")
    volume = report["profile"]["inference"]
    size = f"{volume['in_plane']}x{volume['in_plane']}x{volume['depth']}"
    print(f"inference {size:12s} ours s  MONAI s  ratio  peak GPU GiB ours/MONAI")
    for precision, row in summary["inference"].items():
        peaks = f"{show(row['ours_gpu_peak_gib'], 2)}/{show(row['monai_gpu_peak_gib'], 2)}"
        seconds = f"{show(row['ours_s'], 2):>6s} {show(row['monai_s'], 2):>8s}"
        print(f"  {precision:20s} {seconds}  {show(row['ratio'])}  {peaks}")
    for key, value in summary["loader_overhead"].items():
        print(f"loader overhead {key}: {100 * value:.1f} %")
    quality = summary["quality"]
    print(f"held-out dice {show(quality['test_mean_foreground_dice'], 4)} on {quality['test_cases']} test cases after "
          f"{quality['train_minutes']} min ({quality['epochs']} epochs)")  # fmt: skip
    for name, part in report["parts"].items():
        if part.get("status") != "ok":
            print(f"part {name}: {part.get('status')}")


# ------------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="build the carried folder (here, with ../shared/data)")
    prep.add_argument("--shared-data", type=Path, default=SHARED_DATA)
    for sub in (prep, commands.add_parser("run", help="run the check (gpu_check.sh calls this)")):
        sub.add_argument("--carry", type=Path, default=CARRY, help="the carried folder (default: %(default)s)")
        sub.add_argument("--work", type=Path, default=Path("/tmp/gpu_check_work"), help="scratch folder")
    run_parser = commands.choices["run"]
    out = Path(os.environ.get("OUT", "/tmp/gpu_check_out"))
    run_parser.add_argument("--out", type=Path, default=out, help="gpu_check.json and the logs (default: $OUT)")
    run_parser.add_argument("--deadline", type=float, help="Unix time by which everything must be done")
    run_parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (rehearsal)")
    parts = ("steps_keras", "steps_torch", "infer_keras", "infer_monai", "train", "eval")
    run_parser.add_argument("--only", nargs="+", choices=(*parts, "steps_keras_torch"), help="run only these parts")
    run_parser.add_argument(
        "--keras-torch", action="store_true", help="also time the GPU recipe's steps with KERAS_BACKEND=torch"
    )
    part = commands.add_parser("part", help="one part (internal)")
    part.add_argument("name")
    part.add_argument("spec", type=Path)
    part.add_argument("result", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        from gpu_prepare import prepare

        return prepare(args.carry, args.work, args.shared_data)
    if args.command == "part":
        run_part(args.name, json.loads(args.spec.read_text()), args.result)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
