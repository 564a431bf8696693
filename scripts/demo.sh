#!/usr/bin/env bash
# The whole workflow on the shipped 40-case MSD Hippocampus sample, on a fresh machine:
# install, prepare the data, train a 3D U-Net for a few minutes, evaluate on the held-out cases.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
MINUTES="${MINUTES:-4}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt
export TF_CPP_MIN_LOG_LEVEL=2
PY="$VENV/bin/python"

echo "== 1/3 data_gen.py: data/hippocampus_sample -> data/demo"
"$PY" data_gen.py --input data/hippocampus_sample --output data/demo --split 0.7 0.15 0.15 --workers 2

echo "== 2/3 train.py: unet3d for $MINUTES minutes -> runs/demo"
"$PY" train.py --data data/demo --output runs/demo --model unet3d --time-limit "$MINUTES"

echo "== 3/3 evaluation.py: test split -> results/demo"
"$PY" evaluation.py --run runs/demo --data data/demo --split test --output results/demo

echo
echo "Done. Look at:"
echo "  runs/demo/curves.png             training and validation curves"
echo "  results/demo/masks/*.nii.gz      predicted masks in the source images' geometry"
echo "  results/demo/metrics.csv         dice and distances per case and class"
echo "  results/demo/summary.json        per-class statistics"
echo "  results/demo/dice_boxplot.png    dice per class"
echo "  results/demo/overlays/           truth and prediction contours per case (PNG and GIF)"
echo "  results/demo/report.html         everything on one page: open it in a browser"
