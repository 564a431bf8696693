"""Small real-looking inputs the tests build at run time (MSD, BraTS and PNG folders, NRRD pairs, a synthetic
prepared dataset with a fake run) and helpers to kill and compare runs. Imported by test modules as ``builders``."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from utils import geometry
from utils.formats import load_case, source_values
from utils.preprocessing import PreprocessSettings, prepare_case

NRRD_PAIRS = {
    "image_pattern": ["*_image.nrrd", "*_subvolume.nrrd"],
    "label_pattern": ["*_label.nrrd", "*_subvolume-label.nrrd"],
}


def make_msd(root, labels=((0, 1), (1, 2)), shape=(4, 5, 6)):
    """A tiny MSD folder whose cases hold the given label values."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i, values in enumerate(labels):
        label = np.zeros(shape, np.uint8)
        for j, value in enumerate(values):
            label.flat[j * 7 : j * 7 + 5] = value
        write_nifti(root / "imagesTr" / f"case_{i}.nii.gz", rng.normal(size=shape).astype(np.float32))
        write_nifti(root / "labelsTr" / f"case_{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"name": "tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"}}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return root


def make_brats(root, cases=("BraTS20_001", "BraTS20_002"), modalities=("flair", "t1", "t1ce", "t2"), sep="_"):
    for i, case in enumerate(cases):
        folder = root / case
        folder.mkdir(parents=True)
        for c, modality in enumerate(modalities):
            write_nifti(folder / f"{case}{sep}{modality}.nii.gz", np.full((3, 4, 5), 10 * c + i + 1, np.float32))
        label = np.zeros((3, 4, 5), np.uint8)
        label[0, 0, :4] = [1, 2, 4, 4]
        write_nifti(folder / f"{case}{sep}seg.nii.gz", label)
    return root


def make_png(root, patients=(("001", (1, 2, 10)), ("002", (3,))), mask_value=255, rgb=False):
    """``images/STS_<patient>_<slice>_.png`` + ``masks/`` with the same names; slice ``s`` has ``s`` mask pixels."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for patient, slices in patients:
        for s in slices:
            name = f"STS_{patient}_{s}_.png"
            image = np.full((6, 8), s * 10, np.uint8)
            Image.fromarray(np.stack([image] * 3, -1) if rgb else image).save(root / "images" / name)
            mask = np.zeros((6, 8), np.uint8)
            mask.flat[:s] = mask_value
            Image.fromarray(mask).save(root / "masks" / name)
    return root


# i runs posterior at 1.2 mm, j right at 0.9 mm, k superior at 2.5 mm: the prepared grid is reoriented.
AFFINE = np.array([[0, 0.9, 0, -10.0], [-1.2, 0, 0, 30.0], [0, 0, 2.5, -5.0], [0, 0, 0, 1]])


def synthetic_label(index):
    """A core box (1) inside a rim box (2), shifted per case, in the file's (i, j, k) order."""
    label = np.zeros(SHAPE_IJK, dtype=np.uint8)
    a = index % 3
    label[3 + a : 12 + a, 4:15, 2:9] = 2
    label[5 + a : 10 + a, 6:12, 3:7] = 1
    return label


def synthetic_image(label, island):
    """100 x label inside a body of intensity 10 (zero outside, so ``--crop nonzero`` crops); an ``island`` adds a
    bright unlabelled spot that a label-reading model calls 'core'."""
    image = np.zeros(SHAPE_IJK, dtype=np.float32)
    image[1:15, 2:18, 1:11] = 10.0
    image += 100.0 * label
    if island:
        image[13, 16, 9] = 100.0
    return image


def write_msd(root, cases=8, unlabelled=0, islands=(1, 2, 5, 6)):
    """An MSD folder of ``cases`` labelled and ``unlabelled`` test images."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training, test = [], []
    for index in range(cases + unlabelled):
        name = f"case_{index:03d}.nii.gz"
        label = synthetic_label(index)
        folder = "imagesTr" if index < cases else "imagesTs"
        nib.save(nib.Nifti1Image(synthetic_image(label, index in islands), AFFINE), root / folder / name)
        if index < cases:
            nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    meta = {"name": "synthetic", "modality": {"0": "MRI"}, "labels": LABELS, "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def label_reader(batch):
    """The fake model: class = intensity / 100, rounded (the synthetic images spell out their labels)."""
    classes = np.clip(np.rint(batch[..., 0] / 100.0), 0, 2).astype(int)
    return np.eye(3, dtype=np.float32)[classes]


def make_run(run_dir, dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    run_dir.mkdir(parents=True)
    config = {
        "model": "unet3d",
        "patch_size": [8, 16, 16],
        "batch_size": 2,
        "num_classes": 3,
        "num_channels": 1,
        "labels": manifest["labels"],
        "channels": manifest["channels"],
        "data": str(dataset),
        "dataset_preprocessing": manifest["preprocessing"],
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGKILL ``process`` as soon as ``ready()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.kill()
    raise AssertionError(f"{' '.join(map(str, process.args[1:2]))} did not reach the kill point in time")


def write_nifti(path, array_zyx, affine_zyx=None, dtype=None):
    """Save a ``(Z, Y, X[, C])`` array as NIfTI (file order is the reverse)."""
    affine = np.eye(4) if affine_zyx is None else geometry.zyx_affine_to_nifti(affine_zyx)
    axes = (2, 1, 0, 3) if array_zyx.ndim == 4 else (2, 1, 0)
    data = np.transpose(array_zyx, axes).astype(dtype or array_zyx.dtype)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


LABELS = {"0": "background", "1": "core", "2": "rim"}


SHAPE_IJK = (16, 20, 12)


HIPPOCAMPUS_CASES = ("001", "003", "004", "006", "008", "011")


def hippocampus_subset(root, source, cases=HIPPOCAMPUS_CASES):
    """An MSD folder of a few real MSD Hippocampus cases (copied from ``source``, the shared data's copy): volumes of
    different in-plane sizes."""
    meta = json.loads((Path(source) / "dataset.json").read_text())
    training = []
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for case in cases:
        name = f"hippocampus_{case}.nii.gz"
        for folder in ("imagesTr", "labelsTr"):
            (root / folder / name).write_bytes((Path(source) / folder / name).read_bytes())
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training, "numTraining": len(training)}))
    return root


def hippocampus_png(root, source, cases=HIPPOCAMPUS_CASES[:4], prefix="HIP"):
    """``images/<prefix>_<case>_<slice>_.png`` (8-bit, scaled per case) and ``masks/`` (label values 0, 1, 2) from the
    axial slices (last file axis) of real MSD Hippocampus cases: slices of one patient share a size, patients
    differ. Returns ``{case: label (slices, rows, cols)}`` as written."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    written = {}
    for case in cases:
        image = np.asarray(nib.load(Path(source) / "imagesTr" / f"hippocampus_{case}.nii.gz").dataobj, np.float32)
        label = np.asarray(nib.load(Path(source) / "labelsTr" / f"hippocampus_{case}.nii.gz").dataobj).astype(np.uint8)
        scaled = np.clip(255 * image / np.percentile(image, 99.5), 0, 255).astype(np.uint8)
        for k in range(image.shape[2]):
            name = f"{prefix}_{case}_{k}_.png"
            Image.fromarray(scaled[..., k]).save(root / "images" / name)
            Image.fromarray(label[..., k]).save(root / "masks" / name)
        written[case] = np.moveaxis(label, 2, 0)
    return written


def entry_and_values(source, index=0):
    """A manifest-like case entry and the source label in source values, as evaluation hands them to write_mask."""
    spec = source.cases[index]
    case = load_case(spec)
    _, _, record = prepare_case(case, PreprocessSettings(spacing="original", normalize="none"), None, ["x"])
    entry = {"id": spec.id, "source": spec, "geometry": record, "writer": case.writer}
    return entry, source_values(case.label, source.label_values)


def ct_slabs_msd(root, source, labels, names, slabs=((0, 12), (9, 21), (18, 30))):
    """An MSD folder of axial slabs (three "patients") of the real TotalSegmentator CT (``source``: the shared data's
    ``totalsegmentator`` folder, 122 x 101 x 30 voxels at 3 mm), keeping the organs ``labels`` ``{TotalSegmentator
    value: new value}`` and setting every other label to 0; ``names`` ``{new value: name}`` go to dataset.json."""
    image = nib.load(Path(source) / "example_ct_sm.nii.gz")
    label = np.asarray(nib.load(Path(source) / "example_seg.nii.gz").dataobj).astype(np.uint8)
    kept = np.zeros(256, np.uint8)
    for value, new in labels.items():
        kept[value] = new
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for n, (first, last) in enumerate(slabs):
        affine = image.affine.copy()
        affine[:3, 3] += first * affine[:3, 2]  # the slab's first slice keeps its place in the patient
        name = f"ct_{n:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., first:last], affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(kept[label[..., first:last]], affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": root.name, "modality": {"0": "CT"}, "labels": {"0": "background", **names}}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training, "numTraining": len(training)}))
    return root


def brats_from_hippocampus(root, source, cases=HIPPOCAMPUS_CASES[:4]):
    """BraTS 2020-style case folders built from real MSD Hippocampus T1 cases (``source``): four channels (the image,
    its square root, a smoothed copy and its inverse standing for FLAIR, T1, T1ce and T2) and a label with BraTS's
    values: 1 the anterior hippocampus, 2 the posterior, 4 the brighter half of the posterior (above its median)."""
    from scipy import ndimage

    for case in cases:
        image_file = nib.load(Path(source) / "imagesTr" / f"hippocampus_{case}.nii.gz")
        image = np.asarray(image_file.dataobj, np.float32)
        label = np.asarray(nib.load(Path(source) / "labelsTr" / f"hippocampus_{case}.nii.gz").dataobj).astype(np.uint8)
        posterior = label == 2
        label[posterior & (image > np.median(image[posterior]))] = 4
        channels = {
            "flair": image,
            "t1": np.sqrt(image - image.min()),
            "t1ce": ndimage.gaussian_filter(image, 1.0),
            "t2": image.max() - image,
            "seg": label,
        }
        folder = root / f"BraTS20_Training_{case}"
        folder.mkdir(parents=True)
        for suffix, array in channels.items():
            nib.save(nib.Nifti1Image(array, image_file.affine), str(folder / f"{folder.name}_{suffix}.nii.gz"))
    return root


def make_nnunet(root, source, cases=("001", "011", "020"), test_cases=("034",), channels=1, labels=None):
    """An nnU-Net v2 raw folder (``dataset.json`` without a case list, ``imagesTr/<case>_000C.nii.gz``,
    ``labelsTr/<case>.nii.gz``, ``imagesTs/``) built from real MSD Hippocampus cases of ``source`` (an MSD folder):
    channel ``C`` is the case's image times ``C + 1``; ``test_cases`` go to ``imagesTs`` without their labels."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for case in (*cases, *test_cases):
        image = nib.load(Path(source) / "imagesTr" / f"hippocampus_{case}.nii.gz")
        folder = "imagesTr" if case in cases else "imagesTs"
        for c in range(channels):
            data = np.asarray(image.dataobj, np.float32) * (c + 1)
            nib.save(nib.Nifti1Image(data, image.affine), str(root / folder / f"hippocampus_{case}_{c:04d}.nii.gz"))
        if case in cases:
            label = (Path(source) / "labelsTr" / f"hippocampus_{case}.nii.gz").read_bytes()
            (root / "labelsTr" / f"hippocampus_{case}.nii.gz").write_bytes(label)
    meta = {
        "name": "Hippocampus",
        "channel_names": {str(c): "MRI" if c == 0 else f"MRI x{c + 1}" for c in range(channels)},
        "labels": labels or {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root
