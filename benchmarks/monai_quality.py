"""A MONAI user's recipe for MSD Hippocampus on a time budget, the peer of ``train.py`` + ``evaluation.py`` in
``quality.py``.

``python benchmarks/monai_quality.py --dev MSD --splits splits.json --heldout MSD --minutes M --output DIR``

- Data: the ``train`` and ``val`` cases of ``--splits`` (the split ``data_gen.py`` made of the same cases for our
  run) from the raw ``--dev`` folder; ``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd("RAS")``,
  ``NormalizeIntensityd`` (z-score per case), ``SpatialPadd`` to one patch covering every volume (the largest shape
  rounded up to a multiple of 8), cached by ``CacheDataset``; ``RandFlipd`` on each axis with p 0.5.
- Model: ``monai.networks.nets.UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)``;
  ``DiceCELoss(softmax=True, to_onehot_y=True)``; Adam, learning rate 1e-3; batch 4.
- Budget: ``--minutes`` of wall-clock time from the first training step, validation included, the same rule as
  ``train.py --time-limit``: training is cut at a step when the time left is what the last validation took, then
  validated once more. Whole-volume validation every 2 epochs and at the end; the best model by mean foreground dice
  is kept.
- Held-out: every ``--heldout`` case predicted whole (one window covering it), arg-max, dice of classes 1 and 2
  against its label; ``result.json`` holds the mean over cases of each case's mean foreground dice.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

CLASSES = (1, 2)


def dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    """Dice of one class; NaN when absent from both (left out of the means, as in ``utils.metrics``)."""
    a, b = pred == value, truth == value
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def items(folder: Path, ids=None) -> list[dict]:
    meta = json.loads((folder / "dataset.json").read_text())
    out = []
    for case in meta["training"]:
        case_id = Path(case["image"]).name.split(".")[0]
        if ids is None or case_id in ids:
            out.append({"id": case_id, "image": str(folder / case["image"]), "label": str(folder / case["label"])})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", required=True, help="MSD folder of the training and validation cases")
    parser.add_argument("--splits", required=True, help="splits.json whose train and val ids to use")
    parser.add_argument("--heldout", required=True, help="MSD folder of the held-out cases")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--output", required=True, help="folder for result.json and the best weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch
    from monai import transforms as T
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.utils import set_determinism

    set_determinism(args.seed)
    torch.manual_seed(args.seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    splits = json.loads(Path(args.splits).read_text())
    train_items = items(Path(args.dev), set(splits["train"]))
    val_items = items(Path(args.dev), set(splits["val"]))
    keys = ("image", "label")
    load = [
        T.LoadImaged(keys, image_only=True),
        T.EnsureChannelFirstd(keys),
        T.Orientationd(keys, axcodes="RAS"),
        T.NormalizeIntensityd("image"),
    ]
    shapes = [T.Compose(load[:2])(item)["image"].shape[1:] for item in train_items + val_items]
    patch = tuple(int(math.ceil(max(s[axis] for s in shapes) / 8) * 8) for axis in range(3))
    train_transform = T.Compose(
        [*load, T.SpatialPadd(keys, patch), *[T.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]]
    )
    train_data = CacheDataset(train_items, train_transform, num_workers=0, progress=False)
    loader = DataLoader(train_data, batch_size=4, shuffle=True, num_workers=0, drop_last=True)
    val_data = CacheDataset(val_items, T.Compose(load), num_workers=0, progress=False)
    heldout = Dataset(items(Path(args.heldout)), T.Compose(load))

    model = UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    loss_function = DiceCELoss(softmax=True, to_onehot_y=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def predict(image: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits = sliding_window_inference(image[None], patch, 1, model, overlap=0.5)
        return logits[0].argmax(0).numpy()

    def score(dataset) -> tuple[float, list[dict]]:
        model.eval()
        rows = []
        for item in dataset:
            pred, truth = predict(item["image"]), item["label"][0].numpy()
            per_class = [dice(pred, truth, k) for k in CLASSES]
            rows.append({"dice": per_class, "mean": float(np.nanmean(per_class))})
        model.train()
        return float(np.mean([r["mean"] for r in rows])), rows

    budget = 60.0 * args.minutes
    start = time.monotonic()
    steps = epochs = 0
    best, best_epoch, history = -1.0, -1, []
    validation_s = 0.0  # the last validation's duration: the budget keeps that much free for the final one

    def validate() -> None:
        nonlocal best, best_epoch, validation_s
        began = time.monotonic()
        val_dice, _ = score(val_data)
        validation_s = time.monotonic() - began
        history.append({"epoch": epochs, "steps": steps, "val_dice": val_dice, "time_s": time.monotonic() - start})
        if val_dice > best:
            best, best_epoch = val_dice, epochs
            torch.save(model.state_dict(), output / "best.pt")

    cut = False
    while not cut:
        for batch in loader:
            if time.monotonic() - start + validation_s >= budget:  # cut at a step, as train.py --time-limit does
                cut = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss = loss_function(model(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            steps += 1
        epochs += 1
        if cut or epochs % 2 == 0:
            validate()
    train_seconds = time.monotonic() - start
    model.load_state_dict(torch.load(output / "best.pt"))
    held_dice, rows = score(heldout)
    per_class = np.nanmean(np.array([r["dice"] for r in rows]), axis=0).tolist()
    result = {
        "heldout_dice": held_dice,
        "heldout_per_class": dict(zip(map(str, CLASSES), per_class, strict=True)),
        "heldout_cases": len(rows),
        "best_val_dice": best,
        "best_epoch": best_epoch,
        "epochs": epochs,
        "steps": steps,
        "train_seconds": train_seconds,
        "patch": list(patch),
        "train_cases": len(train_items),
        "val_cases": len(val_items),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    (output / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))


if __name__ == "__main__":
    main()
