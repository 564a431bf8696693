#!/usr/bin/env bash
# The GPU check of issue 15 in one command (what it measures: benchmarks/gpu_check.py's docstring).
#
#   python benchmarks/gpu_check.py prepare     # first, here: .gpu_carry/ (wheels, prepared Hippocampus, CT bank)
#   bash benchmarks/gpu_check.sh --dry-run     # here, on the CPU, tiny sizes: the rehearsal
#   bash benchmarks/gpu_check.sh               # on the device machine (carry .gpu_carry); figures in $OUT
#
# On the device the image's python3 (PyTorch, JAX) gets the carried wheels (keras, namex, optree, monai) in
# /tmp/site. Everything must end within GPU_CHECK_BUDGET_S seconds of this script's start (default 585: the device
# runs a command for at most 600); extra arguments go to gpu_check.py run (e.g. --only steps_keras steps_torch).
set -u -o pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
carry=${GPU_CARRY:-.gpu_carry}
out=${OUT:-/tmp/gpu_check_out}
mkdir -p "$out"
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
if [ ! -d "$carry/wheels" ]; then
    echo "gpu_check.sh: $carry/wheels not found: run python benchmarks/gpu_check.py prepare first" >&2
    exit 2
fi
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64"
if [ "$dry" = 1 ]; then
    py=${PYTHON:-.venv/bin/python}
    budget=${GPU_CHECK_BUDGET_S:-1200}
    # Rehearse the device's install: the same wheels, for Python 3.12 on x86-64, into a scratch folder.
    site=$(mktemp -d)
    # shellcheck disable=SC2086
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" --python-version 3.12 \
        --implementation cp --only-binary=:all: $platforms "$carry"/wheels/*.whl || exit 3
    echo "wheels install for Python 3.12: $(ls "$site" | grep -c dist-info) packages"
    rm -rf "$site"
    # The device has no TensorFlow: hide this machine's, so that Keras and the toolkit take the same paths here.
    hide=$(mktemp -d)
    mkdir "$hide/tensorflow"
    echo 'raise ImportError("TensorFlow is hidden in the GPU check rehearsal (the device has none)")' \
        >"$hide/tensorflow/__init__.py"
    export PYTHONPATH=$hide${PYTHONPATH:+:$PYTHONPATH}
else
    py=python3
    budget=${GPU_CHECK_BUDGET_S:-585}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$carry"/wheels/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    nvidia-smi >"$out/nvidia_smi.txt" 2>&1 || true
fi
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 TQDM_DISABLE=1
# JAX takes GPU memory as it needs it (its default takes 75 % at start), so the peaks it reports are real;
# compiled programs are cached on disk, so a part that compiles what an earlier one did reuses it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/gpu_check_jax_cache
"$py" -c "import keras, jax; print('keras', keras.__version__, 'jax', jax.__version__, jax.devices())" || exit 4
"$py" benchmarks/gpu_check.py run --carry "$carry" --out "$out" --deadline $((start + budget)) "$@" 2>&1 |
    tee "$out/gpu_check.log"
