"""A MONAI user's preprocessing of an MSD dataset, the peer of ``data_gen.py`` in ``preprocessing.py``.

``python benchmarks/monai_preprocess.py --input MSD_FOLDER --output OUT --workers N [--spacing Z Y X]``

Per case: ``LoadImaged`` (image and label), ``EnsureChannelFirstd``, ``Orientationd("RAS")``, ``Spacingd`` (linear for
the image, nearest for the label), ``NormalizeIntensityd`` (z-score of the image) and ``SaveImaged`` of both as
uncompressed NIfTI (``.nii``, the closest of MONAI's writers to our ``.npy``), over the cases in a ``DataLoader`` with
``--workers`` processes.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="MSD folder (dataset.json, imagesTr/, labelsTr/)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="target pixdim in mm")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    from monai import transforms as T
    from monai.data import DataLoader, Dataset

    source = Path(args.input)
    meta = json.loads((source / "dataset.json").read_text())
    items = [{"image": str(source / c["image"]), "label": str(source / c["label"])} for c in meta["training"]]
    keys = ("image", "label")
    save = dict(output_dir=args.output, output_ext=".nii", separate_folder=False, print_log=False, resample=False)
    pipeline = T.Compose(
        [
            T.LoadImaged(keys, image_only=True),
            T.EnsureChannelFirstd(keys),
            T.Orientationd(keys, axcodes="RAS"),
            T.Spacingd(keys, pixdim=args.spacing, mode=("bilinear", "nearest")),
            T.NormalizeIntensityd("image"),
            T.SaveImaged("image", output_postfix="image", **save),
            T.SaveImaged("label", output_postfix="label", **save),
        ]
    )
    loader = DataLoader(Dataset(items, pipeline), batch_size=1, num_workers=args.workers, collate_fn=lambda batch: 0)
    count = sum(1 for _ in loader)
    print(f"wrote {count} cases to {args.output}")


if __name__ == "__main__":
    main()
