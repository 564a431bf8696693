"""utils/device.py: the CPU kind, the GPU that should be there, and oneDNN switched on before TensorFlow loads."""

import os
import subprocess
import sys

from conftest import ROOT

from utils import device

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma bmi2

processor\t: 1
model name\t: ignored second entry
"""


def test_cpu_info_reads_the_model_and_instruction_sets(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = device.cpu_info(path)
    assert info["model"] == "AMD EPYC 7B13 64-Core Processor" and info["vendor"] == "AuthenticAMD"
    assert info["isa"]["avx2"] and info["isa"]["fma"] and not info["isa"]["avx512f"] and not info["isa"]["amx_tile"]
    assert info["kind"] == "avx2" and info["cores"] >= 1


def test_cpu_kind_is_the_widest_extension():
    assert device.cpu_kind({"avx2": True, "avx512f": True}) == "avx512"
    assert device.cpu_kind({"avx2": True, "avx512f": True, "amx_tile": True}) == "amx"
    assert device.cpu_kind({"avx": True}) == "avx" and device.cpu_kind({}) == ""


def test_a_gpu_is_expected_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert device.gpu_expected() == "CUDA_VISIBLE_DEVICES=0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # the usual way to hide every GPU
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    assert device.gpu_expected() is None


def test_first_line_names_the_device():
    cpu = {"model": "AMD EPYC", "cores": 2, "kind": "avx2", "isa": {}}
    assert device.first_line({"backend": "jax", "devices": ["cpu"], "cpu": cpu}) == (
        "Training on the CPU (AMD EPYC, 2 cores, avx2) with jax"
    )
    record = {"backend": "tensorflow", "devices": ["/device:GPU:0", "/device:GPU:1"], "cpu": cpu}
    assert device.first_line(record) == "Training on 2 accelerators (/device:GPU:0, /device:GPU:1) with tensorflow"


def _environment_after(script: str, variable: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != device.ONEDNN_VARIABLE}
    if variable is not None:
        env[device.ONEDNN_VARIABLE] = variable
    code = (
        f"import sys; sys.argv = ['{script}', '--help']; import {script}; "
        "import os; print('tensorflow' in sys.modules, os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return result.stdout.strip()


def test_every_entry_point_turns_onednn_on_before_tensorflow_is_imported():
    for script in ("train", "data_gen", "evaluation"):
        assert _environment_after(script, None) == "False 1", script


def test_the_users_choice_of_onednn_is_kept():
    assert _environment_after("train", "0") == "False 0"
