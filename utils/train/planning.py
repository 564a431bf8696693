"""Self-configuration: the patch size, batch size and network depth of a run, from the dataset fingerprint and a
memory budget, in the spirit of nnU-Net's experiment planning (Isensee et al. 2021).

1. Target patch: the median case shape (``fingerprint.json``; 2D models: its last two axes, the median slice),
   capped at 128 voxels per axis in 3D and 256 in 2D.
2. Depth (architectures with a ``depth`` option that is not set): as many resolution levels as keep the coarsest
   feature map at least 4 voxels along the shortest patch axis (nnU-Net's rule), at most 6; at least 3 for ``fcn``.
3. The patch is rounded up to a multiple of the network's total down-sampling factor.
4. Memory: the model is built once for the patch and the float32 training memory per sample is estimated as
   ``2 x`` the sum of every layer's output size (activations kept for the backward pass, plus their gradients)
   plus ``16`` bytes per parameter (weights, gradients, two Adam moments). While two samples do not fit in the
   budget, the axis with the largest physical extent (voxels x spacing) is shrunk by one down-sampling step.
5. Batch: 2 for 3D patches above 64^3 voxels, else 4; in 2D ``2^18 / voxels`` within 2..32; then capped by what fits
   in the budget (at least 2).

The plan (inputs, estimate and choices) is returned for ``config.json``. Spacing anisotropy (largest over smallest
spacing) above 3 is reported: such data usually trains better with a 2D model, as our 3D networks pool isotropically.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np

import model as model_zoo
from utils.settings import DEFAULT_MEMORY_GB

MAX_PATCH = {2: 256, 3: 128}
MIN_FEATURE_MAP = 4
MAX_DEPTH = 6


def builder_options(name: str) -> dict:
    """The options of a model's builder with their defaults."""
    parameters = inspect.signature(model_zoo.MODELS[name]).parameters
    return {k: p.default for k, p in parameters.items() if k not in ("input_shape", "num_classes")}


def downsampling_factor(name: str, model_args: dict) -> int:
    """How many times the network halves the resolution in total: patch sizes must be multiples of it."""
    options = {**builder_options(name), **model_args}
    family = name[:-2]
    if family in ("unet", "resunet", "attention_unet"):
        return int(options["stem_stride"]) * 2 ** (int(options["depth"]) - 1)
    if family == "fcn":
        depth = options["depth"] if options["depth"] is not None else (5 if name.endswith("2d") else 3)
        return 2 ** int(depth)
    return 1


def plan_depth(name: str, model_args: dict, patch: Sequence[float]) -> int | None:
    """The depth for a patch (``None`` for architectures without a ``depth`` option)."""
    if "depth" not in builder_options(name):
        return None
    shortest = float(min(patch))
    minimum = min_depth(name)
    if model_args.get("deep_supervision"):
        minimum = max(minimum, 2 if int(model_args.get("stem_stride", 1)) == 2 else 3)
    best = minimum
    for depth in range(max(minimum, 2), MAX_DEPTH + 1):
        if shortest / downsampling_factor(name, {**model_args, "depth": depth}) >= MIN_FEATURE_MAP:
            best = depth
    return best


def min_depth(name: str) -> int:
    return 3 if name.startswith("fcn") else 1


def round_up(patch: Sequence[float], factor: int) -> list[int]:
    return [int(math.ceil(float(p) / factor) * factor) for p in patch]


def estimate_memory(name: str, model_args: dict, patch: Sequence[int], num_channels: int, num_classes: int) -> dict:
    """Training memory of one sample and of the weights, in bytes (float32), from a symbolic build of the model."""
    import keras

    built = model_zoo.build_model(name, (*patch, num_channels), num_classes, **model_args)
    elements = 0
    for layer in built.layers:
        outputs = layer.output if isinstance(layer.output, list | tuple) else [layer.output]
        for output in outputs:
            elements += int(np.prod([d for d in output.shape[1:] if d is not None]))
    parameters = int(built.count_params())
    keras.backend.clear_session()
    return {"per_sample_bytes": 2 * 4 * elements, "weights_bytes": 16 * parameters, "parameters": parameters}


def target_batch_size(patch: Sequence[int]) -> int:
    voxels = int(np.prod(patch))
    if len(patch) == 3:
        return 2 if voxels > 64**3 else 4
    return int(np.clip(2**18 // max(voxels, 1), 2, 32))


def plan(
    name: str,
    fingerprint: dict,
    num_channels: int,
    num_classes: int,
    model_args: dict | None = None,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    memory_gb: float = DEFAULT_MEMORY_GB,
    target_shape: Sequence[float] | None = None,
) -> dict:
    """Plan the patch size, batch size and depth of ``name`` for a dataset.

    Args:
        name: a key of ``model.MODELS``.
        fingerprint: ``fingerprint.json`` (``median_shape``, ``median_spacing``).
        num_channels, num_classes: the dataset's.
        model_args: the architecture options already chosen; ``depth`` there is kept.
        patch_size, batch_size: values set by the user, kept as they are.
        memory_gb: the memory budget of one device, in GiB.
        target_shape: the shape to cover instead of the fingerprint's median (e.g. the rows of an exported stack).

    Returns:
        ``{"patch_size", "batch_size", "model_args", "plan": {...how they were chosen...}}``.

    Raises:
        ValueError: no median shape to plan from, or a budget that cannot hold two samples of the smallest patch.
    """
    ndim = int(name[-2])
    model_args = dict(model_args or {})
    spacing = list(fingerprint.get("median_spacing") or [1.0] * 3)[-ndim:]
    if target_shape is None:
        median = fingerprint.get("median_shape")
        if not median and patch_size is None:
            raise ValueError("fingerprint.json has no median_shape to plan the patch size from; pass --patch-size")
        target_shape = list(median)[-ndim:] if median else list(patch_size)
    target = [min(float(t), MAX_PATCH[ndim]) for t in target_shape[-ndim:]]
    budget = float(memory_gb) * 2**30
    depth_planned = "depth" in builder_options(name) and "depth" not in model_args
    patch = list(patch_size) if patch_size is not None else None
    rates: dict[str, dict] = {}
    while True:
        args = dict(model_args)
        if depth_planned:
            args["depth"] = plan_depth(name, model_args, patch or target)
            if patch is not None:
                while args["depth"] > min_depth(name) and any(p % downsampling_factor(name, args) for p in patch):
                    args["depth"] -= 1
        factor = downsampling_factor(name, args)
        candidate = list(patch) if patch is not None else round_up(target, factor)
        key = repr(sorted(args.items()))
        if key not in rates:  # activations grow with the voxels: one symbolic build per architecture
            rates[key] = estimate_memory(name, args, candidate, num_channels, num_classes)
            rates[key]["voxels"] = int(np.prod(candidate))
        rate = rates[key]
        memory = {**rate, "per_sample_bytes": rate["per_sample_bytes"] * int(np.prod(candidate)) / rate["voxels"]}
        fits = int((budget - memory["weights_bytes"]) // max(memory["per_sample_bytes"], 1))
        if patch_size is not None or fits >= (batch_size or 2):
            break
        extents = [c * s for c, s in zip(candidate, spacing, strict=True)]
        axis = int(np.argmax(extents))
        if candidate[axis] <= factor:
            raise ValueError(
                f"a memory budget of {memory_gb} GiB does not hold two samples of {name} even at patch {candidate}; "
                "raise --memory-budget or choose a smaller model"
            )
        target[axis] = candidate[axis] - factor
    batch = int(batch_size) if batch_size is not None else max(2, min(target_batch_size(candidate), fits))
    spacing_arr = np.asarray(fingerprint.get("median_spacing") or [1.0], dtype=float)
    anisotropy = float(spacing_arr.max() / spacing_arr.min()) if spacing_arr.size else 1.0
    record = {
        "target_shape": [float(t) for t in target_shape[-ndim:]],
        "median_spacing": spacing,
        "anisotropy": round(anisotropy, 3),
        "downsampling_factor": factor,
        "memory_budget_gb": float(memory_gb),
        "estimated_gb_per_sample": round(memory["per_sample_bytes"] / 2**30, 4),
        "estimated_gb_weights": round(memory["weights_bytes"] / 2**30, 4),
        "estimated_gb_total": round((batch * memory["per_sample_bytes"] + memory["weights_bytes"]) / 2**30, 4),
        "parameters": memory["parameters"],
        "samples_that_fit": fits,
        "planned": [k for k, v in (("patch_size", patch_size), ("batch_size", batch_size)) if v is None]
        + (["depth"] if depth_planned else []),
    }
    if fits < batch:
        record["note_memory"] = f"the estimate exceeds the {memory_gb} GiB budget at batch {batch}"
    if anisotropy > 3 and ndim == 3:
        record["note"] = "spacing is anisotropic (> 3); a 2D model may train better"
    return {"patch_size": candidate, "batch_size": batch, "model_args": args, "plan": record}
