"""Self-configuration: the patch size, batch size and network depth of a run, from the dataset fingerprint and a
memory budget, in the spirit of nnU-Net's experiment planning (Isensee et al. 2021).

1. Target patch: the median case shape (``fingerprint.json``; 2D models: its last two axes, the median slice),
   capped at 128 voxels per axis in 3D and 256 in 2D.
2. Depth (architectures with a ``depth`` option that is not set): as many resolution levels as keep the coarsest
   feature map at least 4 voxels along the shortest patch axis (nnU-Net's rule), at most 6; at least 3 for ``fcn``.
3. The patch is rounded up to a multiple of the network's total down-sampling factor (32 for a U-Net on a
   pretrained encoder, ``backbone``, whose depth is its own; its layers count with the model's in 4. and 6.).
4. Memory: the model is built once for the patch and the float32 training memory per sample is estimated as
   ``2 x`` the sum of every layer's output size (activations kept for the backward pass, plus their gradients)
   plus ``16`` bytes per parameter (weights, gradients, two Adam moments). While two samples do not fit in the
   budget, the axis with the largest physical extent (voxels x spacing) is shrunk by one down-sampling step.
5. Batch: 2 for 3D patches above 64^3 voxels, else 4; in 2D ``2^18 / voxels`` within 2..32; then capped by what fits
   in the budget (at least 2).
6. Speed (2D plans with the ``cpu`` recipe): the batch is also capped by what the CPU trains in
   :data:`~utils.settings.STEP_SECONDS` (at least 2): the training cost of a sample is counted from the model (2
   floating-point operations per multiply-add of every convolution and dense layer, forward and twice backward, plus
   a few per activation) and the CPU's speed is its cores times :data:`~utils.settings.CPU_GFLOPS_PER_CORE` of its
   kind. A step then stays near a second on a 2-core CPU instead of the 42 s that 32 whole 61 x 73 slices of the
   two-path network took; on a GPU the memory plan stands.

Models trained on patches (:data:`~utils.settings.WHOLE_SLICE_MODELS`: the two-path CNN of Havaei et al. 2017) are
planned differently: the network is built with valid convolutions, so each output pixel is the prediction for the
window of the receptive field (33 x 33) around it, and a sample of ``33 + k - 1`` pixels a side trains the ``k x k``
receptive-field patches at its centre at once (``k`` = 32, or 16, 8, 1 where the CPU's step budget does not hold two
samples; ``k = 1`` is the paper's 33 x 33 patch labelling its centre pixel). Without normalisation layers it needs a
tenth of the recipe's learning rate (unless one is set; the plan returns the factor as ``lr``), and under TensorFlow it
compiles with XLA (:func:`jit_compile`). Evaluation applies the same weights fully convolutionally to whole slices.

The plan (inputs, estimate and choices) is returned for ``config.json``. Spacing anisotropy (largest over smallest
spacing) above 3 is reported: such data usually trains better with a 2D model, as our 3D networks pool isotropically.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np

import model as model_zoo
from utils import device
from utils.backbones import ENCODER_STRIDE, leaf_layers
from utils.settings import CPU_GFLOPS_PER_CORE, DEFAULT_MEMORY_GB, STEP_SECONDS, WHOLE_SLICE_MODELS

MAX_PATCH = {2: 256, 3: 128}
MIN_FEATURE_MAP = 4
MAX_DEPTH = 6
OUTPUT_SIDES = (32, 16, 8, 1)  # output tiles of a model trained on patches, largest first
# The learning rate of the models trained on patches, as a factor of the recipe's: the two-path CNN has no
# normalisation layers; with Adam at 3e-3 it collapsed to background on MSD Hippocampus slices, at 3e-4 it reached a
# training dice of 0.7 in 120 steps.
WHOLE_SLICE_LR_FACTOR = 0.1


def builder_options(name: str) -> dict:
    """The options of a model's builder with their defaults."""
    parameters = inspect.signature(model_zoo.MODELS[name]).parameters
    return {k: p.default for k, p in parameters.items() if k not in ("input_shape", "num_classes")}


def downsampling_factor(name: str, model_args: dict) -> int:
    """How many times the network halves the resolution in total: patch sizes must be multiples of it."""
    options = {**builder_options(name), **model_args}
    family = name[:-2]
    if options.get("backbone"):
        return ENCODER_STRIDE
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
    """Training memory of one sample and of the weights, in bytes (float32), and the floating-point operations of
    training on one sample (``flops_per_sample``), from a symbolic build of the model."""
    import keras

    built = model_zoo.build_model(name, (*patch, num_channels), num_classes, **model_args)
    elements = 0
    for layer in leaf_layers(built):
        outputs = layer.output if isinstance(layer.output, list | tuple) else [layer.output]
        for output in outputs:
            elements += int(np.prod([d for d in output.shape[1:] if d is not None]))
    multiply_adds = count_multiply_adds(built)
    parameters = int(built.count_params())
    keras.backend.clear_session()
    return {
        "per_sample_bytes": 2 * 4 * elements,
        "weights_bytes": 16 * parameters,
        "parameters": parameters,
        "flops_per_sample": 3 * 2 * multiply_adds + 6 * elements,
    }


def count_multiply_adds(built) -> int:
    """Multiply-adds of one forward pass of a built Keras model on one sample: every convolution and dense layer's
    kernel size times the positions it is applied at (a transposed convolution's input positions)."""
    import keras

    total = 0
    for layer in leaf_layers(built):
        kernel = getattr(layer, "kernel", None)
        if kernel is None or isinstance(layer.output, list | tuple):
            continue
        positions = int(np.prod([d for d in layer.output.shape[1:-1] if d is not None]))
        if isinstance(layer, keras.layers.Conv2DTranspose | keras.layers.Conv3DTranspose):
            positions //= int(np.prod(layer.strides))
        total += int(np.prod(kernel.shape)) * positions
    return total


def device_gflops(cpu: dict) -> float:
    """Training speed assumed for a CPU, in GFLOP/s: its cores times the rate of its kind."""
    rate = CPU_GFLOPS_PER_CORE.get(cpu.get("kind"), CPU_GFLOPS_PER_CORE["other"])
    return float(cpu.get("cores") or 1) * rate


def speed_batch(flops_per_sample: float, gflops: float) -> int:
    """Samples a device of ``gflops`` trains in :data:`~utils.settings.STEP_SECONDS`."""
    return int(STEP_SECONDS * gflops * 1e9 // max(flops_per_sample, 1.0))


def receptive_field(name: str, model_args: dict) -> int:
    """The receptive field of a model trained on patches (33 for the two-path CNN, 65 as a cascade)."""
    return (model_zoo.TWOPATH_CONTEXT * (2 if model_args.get("cascade") else 1)) + 1


def output_margin(name: str, model_args: dict) -> int:
    """Pixels a model with valid convolutions trims from each side of its input (0 for the others): the training
    targets are the centre of each patch."""
    if name not in WHOLE_SLICE_MODELS or model_args.get("padding", "same") != "valid":
        return 0
    return receptive_field(name, model_args) // 2


def jit_compile(name: str) -> bool | str:
    """``model.compile``'s ``jit_compile``: XLA for the networks trained on patches under TensorFlow, Keras's
    ``auto`` (XLA on GPUs only) for the others. TensorFlow's own gradient of the two-path CNN's 21 x 21 score
    convolution (224 channels in, a few out) is pathologically slow on a CPU: a step of five 64 x 64 samples took
    4.8 s there against 0.28 s with XLA (2 cores, AMD EPYC)."""
    import keras

    if name in WHOLE_SLICE_MODELS and keras.backend.backend() == "tensorflow":
        return True
    return "auto"


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
    recipe: str = "cpu",
    cpu: dict | None = None,
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
        recipe: the device recipe (``cpu`` or ``gpu``); with ``cpu`` 2D plans also fit the step time.
        cpu: :func:`utils.device.cpu_info` of the machine (read when ``None``).

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
    speed = None
    if ndim == 2 and recipe == "cpu":
        cpu = cpu or device.cpu_info()
        speed = {"cpu": cpu.get("model"), "cores": cpu.get("cores"), "kind": cpu.get("kind")}
        speed["gflops"] = device_gflops(cpu)
    if name in WHOLE_SLICE_MODELS:
        return _patch_trained_plan(
            name, num_channels, num_classes, model_args, patch_size, batch_size, budget, target, speed, memory_gb
        )
    depth_planned = "depth" in builder_options(name) and "depth" not in model_args and not model_args.get("backbone")
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
    by_speed = None
    if speed is not None:
        speed["gflop_per_sample"] = round(rate["flops_per_sample"] * int(np.prod(candidate)) / rate["voxels"] / 1e9, 4)
        by_speed = speed_batch(speed["gflop_per_sample"] * 1e9, speed["gflops"])
    limits = [target_batch_size(candidate), fits] + ([by_speed] if by_speed is not None else [])
    batch = int(batch_size) if batch_size is not None else max(2, min(limits))
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
    if speed is not None:
        record["speed"] = _speed_record(speed, batch, by_speed)
    return {"patch_size": candidate, "batch_size": batch, "model_args": args, "plan": record}


def _speed_record(speed: dict, batch: int, by_speed: int | None) -> dict:
    estimated = batch * speed["gflop_per_sample"] / speed["gflops"]
    return {**speed, "samples_per_step_s": by_speed, "step_s_target": STEP_SECONDS, "estimated_step_s": estimated}


def _patch_trained_plan(
    name: str,
    num_channels: int,
    num_classes: int,
    model_args: dict,
    patch_size: Sequence[int] | None,
    batch_size: int | None,
    budget: float,
    target: Sequence[float],
    speed: dict | None,
    memory_gb: float,
) -> dict:
    """Plan a model trained on patches of its receptive field (module docstring): valid convolutions, a patch of
    ``field + k - 1`` pixels a side with the largest output side ``k`` (at most the slice) whose two samples fit the
    step time (with the ``cpu`` recipe) and the memory budget, and the batch as for the other 2D models."""
    args = {"padding": "valid", **model_args}
    field, margin = receptive_field(name, args), output_margin(name, args)
    shortest = max(1, int(min(target)))
    sides = sorted({min(k, shortest) for k in OUTPUT_SIDES}, reverse=True)
    candidates = [list(patch_size)] if patch_size is not None else [[field + k - 1] * 2 for k in sides]
    for patch in candidates:
        estimate = estimate_memory(name, args, patch, num_channels, num_classes)
        fits = int((budget - estimate["weights_bytes"]) // max(estimate["per_sample_bytes"], 1))
        by_speed = speed_batch(estimate["flops_per_sample"], speed["gflops"]) if speed is not None else None
        if fits >= 2 and (by_speed is None or by_speed >= 2):
            break
    limits = [target_batch_size(patch), fits] + ([by_speed] if by_speed is not None else [])
    batch = int(batch_size) if batch_size is not None else max(2, min(limits))
    record = {
        "target_shape": [float(t) for t in target],
        "trained_on": f"{patch[0]}x{patch[1]} patches labelling their central {patch[0] - 2 * margin}x"
        f"{patch[1] - 2 * margin} pixels (receptive field {field}x{field})",
        "predicted_on": "whole slices, fully convolutionally",
        "jit_compile": jit_compile(name),
        "memory_budget_gb": float(memory_gb),
        "estimated_gb_per_sample": round(estimate["per_sample_bytes"] / 2**30, 4),
        "estimated_gb_total": round((batch * estimate["per_sample_bytes"] + estimate["weights_bytes"]) / 2**30, 4),
        "parameters": estimate["parameters"],
        "samples_that_fit": fits,
        "planned": [k for k, v in (("patch_size", patch_size), ("batch_size", batch_size)) if v is None],
    }
    if speed is not None:
        speed["gflop_per_sample"] = round(estimate["flops_per_sample"] / 1e9, 4)
        record["speed"] = _speed_record(speed, batch, by_speed)
    record["lr"] = f"the recipe's x {WHOLE_SLICE_LR_FACTOR:g} unless set (no normalisation layers)"
    patch = [int(p) for p in patch]
    return {"patch_size": patch, "batch_size": batch, "model_args": args, "lr": WHOLE_SLICE_LR_FACTOR, "plan": record}
