"""The PyTorch side of ``gpu_check.py``: the recipes' U-Net in plain PyTorch, its train step, and MONAI's
``sliding_window_inference`` of the same network.

:class:`RecipeUNet3D` is layer for layer ``model.build_model("unet3d", ..., filters, depth, max_filters, norm,
stem_stride, deep_supervision)`` (the options the CPU and GPU recipes set): per level two 3x3x3 convolutions without
bias, each followed by the norm and LeakyReLU(0.01) (``torch_unet.py``'s blocks, whose first convolution may carry a
stride); channels ``min(filters * 2**level, max_filters)``; 2x2x2 max-pooling down, a 2x2x2 transposed convolution
(with bias) up, the skip concatenated before the up-sampled features; with ``stem_stride=2`` a final transposed
convolution back to full resolution; 1x1x1 output convolutions, one per deep-supervision level below full resolution
(ordered from full to coarsest, as Keras returns them). The parameter counts of both sides are recorded and compared.
Inputs ``(B, C, D, H, W)``; outputs are logits.

The train step is what nnU-Net's trainer does each iteration: forward, MONAI's ``DiceCELoss`` per output weighted
``1, 1/2, 1/4, ...`` normalised (the toolkit's deep-supervision weights), backward, optimizer step, ``loss.item()``;
mixed precision is ``torch.autocast`` (float16 with a ``GradScaler`` on a GPU, bfloat16 on a CPU, as Keras's policy).
``torch.backends.cudnn.benchmark`` is on, as in nnU-Net.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch
from torch import nn
from torch_unet import _norm


def level_channels(level: int, filters: int, max_filters: int) -> int:
    """Channels of level ``level`` (0 = full resolution), as ``model._level_filters``."""
    return int(min(filters * 2**level, max_filters))


class Block(nn.Sequential):
    """``convs`` x (3x3x3 convolution without bias, norm, LeakyReLU 0.01); the first convolution carries ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride: int = 1, convs: int = 2):
        layers = []
        for i in range(convs):
            source = in_channels if i == 0 else out_channels
            conv = nn.Conv3d(source, out_channels, 3, stride=stride if i == 0 else 1, padding=1, bias=False)
            layers += [conv, _norm(norm, out_channels), nn.LeakyReLU(0.01)]
        super().__init__(*layers)


class RecipeUNet3D(nn.Module):
    """The toolkit's ``unet3d`` with the options of the recipes (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        filters: int = 16,
        depth: int = 4,
        max_filters: int = 320,
        norm: str = "instance",
        stem_stride: int = 1,
        deep_supervision: bool = False,
        convs_per_level: int = 2,
        full_res_skip: int = 0,
    ):
        super().__init__()
        self.stem_stride, self.deep_supervision = stem_stride, deep_supervision
        features = [level_channels(level, filters, max_filters) for level in range(depth)]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for level, channels in enumerate(features):
            stride = stem_stride if level == 0 else 1
            self.encoder.append(Block(previous, channels, norm, stride, convs_per_level))
            previous = channels
        self.pool = nn.MaxPool3d(2)
        self.up, self.decoder, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleDict()
        for level in range(depth - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(previous, features[level], 2, stride=2))
            self.decoder.append(Block(2 * features[level], features[level], norm, 1, convs_per_level))
            previous = features[level]
            scale = level + (stem_stride == 2)
            if deep_supervision and scale > 0:
                self.heads[str(level)] = nn.Conv3d(previous, num_classes, 1)
        self.final_up = self.full_res = None
        skip = full_res_skip if stem_stride == 2 else 0
        if stem_stride == 2:
            self.final_up = nn.Sequential(
                nn.ConvTranspose3d(previous, features[0], 2, stride=2), _norm(norm, features[0]), nn.LeakyReLU(0.01)
            )
        if skip:  # the full-resolution path: a 3x3x3 convolution of the image, concatenated before the head
            self.full_res = Block(in_channels, skip, norm, 1, 1)
        self.head = nn.Conv3d(features[0] + skip, num_classes, 1)

    def forward(self, x: torch.Tensor):
        image, skips = x, []
        for level, block in enumerate(self.encoder):
            x = block(self.pool(x) if level > 0 else x)
            skips.append(x)
        auxiliary = []
        levels = range(len(self.encoder) - 2, -1, -1)
        for level, up, block, skip in zip(levels, self.up, self.decoder, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
            if str(level) in self.heads:
                auxiliary.append(self.heads[str(level)](x))
        if self.final_up is not None:
            x = self.final_up(x)
        if self.full_res is not None:
            x = torch.cat([x, self.full_res(image)], dim=1)
        main = self.head(x)
        return [main, *auxiliary[::-1]] if self.deep_supervision else main


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def supervision_weights(count: int) -> list[float]:
    """``1, 1/2, 1/4, ...`` normalised to sum 1 (``utils.losses.deep_supervision_weights``)."""
    weights = [0.5**level for level in range(count)]
    return [w / sum(weights) for w in weights]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> dict:
    """Peak GPU memory allocated by PyTorch since the last reset (each measurement resets it before its warm-up;
    ``None`` on a CPU) and the process's peak RSS, in GiB."""
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"gpu_peak_gib": gpu, "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _network(model_args: dict, num_classes: int, in_channels: int) -> RecipeUNet3D:
    keys = ("filters", "depth", "max_filters", "norm", "stem_stride", "full_res_skip")
    options = {k: model_args[k] for k in keys if k in model_args}
    return RecipeUNet3D(
        in_channels,
        num_classes,
        deep_supervision=bool(model_args.get("deep_supervision", False)),
        convs_per_level=int(model_args.get("convs_per_level", 2)),
        **options,
    )


class TorchTrainStep:
    """One recipe's network, loss and optimizer in plain PyTorch.

    Args:
        config: the resolved training config as JSON (``patch_size``, ``batch_size``, ``model_args``, ``optimizer``,
            ``lr``, ``momentum``, ``num_classes``, ``num_channels``).
        mixed: autocast (float16 + GradScaler on a GPU, bfloat16 on a CPU).
    """

    def __init__(self, config: dict, mixed: bool):
        from monai.losses import DiceCELoss

        torch.manual_seed(0)
        torch.backends.cudnn.benchmark = True
        self.device = device()
        self.mixed = mixed
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.config = config
        self.model = _network(config["model_args"], config["num_classes"], config["num_channels"]).to(self.device)
        self.loss = DiceCELoss(softmax=True, to_onehot_y=True)
        if config["optimizer"] == "sgd":
            self.optimizer = torch.optim.SGD(
                self.model.parameters(), config["lr"], momentum=config["momentum"], nesterov=True
            )
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), config["lr"])
        self.scaler = torch.amp.GradScaler("cuda") if mixed and self.device.type == "cuda" else None

    def batches(self, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` random batches in host memory (pinned on a GPU machine, as nnU-Net's loader pins them): images
        (B, C, *patch) float32 and label maps (B, 1, *patch) uint8; each step copies its batch to the device, as
        Keras's ``train_on_batch`` copies its NumPy batch."""
        rng = np.random.default_rng(seed)
        shape = (self.config["batch_size"], self.config["num_channels"], *self.config["patch_size"])
        out = []
        for _ in range(count):
            x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            labels = torch.from_numpy(rng.integers(0, self.config["num_classes"], (shape[0], 1, *shape[2:]), np.uint8))
            if self.device.type == "cuda":
                x, labels = x.pin_memory(), labels.pin_memory()
            out.append((x, labels))
        return out

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True).long()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed):
            outputs = self.model(x)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        losses = []
        for output in outputs:
            stride = [t // o for t, o in zip(y.shape[2:], output.shape[2:], strict=True)]
            target = y[:, :, :: stride[0], :: stride[1], :: stride[2]]
            losses.append(self.loss(output.float(), target))
        loss = sum(w * term for w, term in zip(supervision_weights(len(losses)), losses, strict=True))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return float(loss.item())

    def time_steps(self, warmup: int, steps: int) -> dict:
        """Median and best seconds of ``steps`` steps after ``warmup`` untimed ones, over rotating batches."""
        batches = self.batches(4)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for i in range(warmup):
            self.step(*batches[i % len(batches)])
        synchronize()
        times = []
        for i in range(steps):
            start = time.perf_counter()
            self.step(*batches[i % len(batches)])
            times.append(time.perf_counter() - start)
        return {
            "step_ms": 1000 * float(np.median(times)),
            "best_step_ms": 1000 * float(np.min(times)),
            "steps": len(times),
            "samples_per_s": self.config["batch_size"] / float(np.median(times)),
            "parameters": count_parameters(self.model),
            **peak_memory(),
        }


def monai_inference(image: np.ndarray, model_args: dict, window, num_classes: int, mixed: bool, **options) -> dict:
    """Seconds and peak memory of MONAI's ``sliding_window_inference`` of ``image`` (Z, Y, X, C) with the recipe
    network (``model_args``; no deep supervision at inference): the image is moved to the device, windows of
    ``window`` are predicted ``options["batch_size"]`` at a time, blended there, and the probabilities copied back
    (Z, Y, X, K) to the host, as ours returns them. One untimed run, then ``options["reps"]`` timed ones.
    """
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    where = device()
    args = {**model_args, "deep_supervision": False}
    model = _network(args, num_classes, image.shape[-1]).to(where).eval()
    dtype = torch.float16 if where.type == "cuda" else torch.bfloat16

    def predictor(batch):
        with torch.autocast(where.type, dtype=dtype, enabled=mixed):
            return torch.softmax(model(batch).float(), dim=1)

    def run() -> np.ndarray:
        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))[None].to(where)
            out = sliding_window_inference(
                inputs,
                tuple(window),
                options["batch_size"],
                predictor,
                overlap=options["overlap"],
                mode="gaussian",
                sigma_scale=options["sigma_scale"],
            )
            return np.moveaxis(out[0].cpu().numpy(), 0, -1)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = run()
    seconds = []
    for _ in range(options["reps"]):
        synchronize()
        start = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - start)
    if out.shape != (*image.shape[:3], num_classes):
        raise RuntimeError(f"MONAI returned shape {out.shape}")
    return {
        "seconds": float(np.median(seconds)),
        "seconds_all": seconds,
        "parameters": count_parameters(model),
        **peak_memory(),
    }
