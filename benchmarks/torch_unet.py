"""The toolkit's ``unet3d`` (``stem_stride=1``, max-pooling, transposed convolutions) written in plain PyTorch.

Layer for layer the network of ``model.build_model("unet3d", ..., filters=16, depth=4, norm=NORM, stem_stride=1)``:
per level two 3x3x3 convolutions without bias, each followed by the norm and LeakyReLU(0.01); 2x2x2 max-pooling
down, a 2x2x2 transposed convolution (with bias) up, the skip concatenated before the up-sampled features, a 1x1x1
output convolution. The same parameter count is checked by the benchmarks. Inputs ``(B, C, D, H, W)``, channels first
as PyTorch users write them; the output is logits (the softmax belongs to the loss or to inference).
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        # Keras GroupNormalization(groups=-1): per-channel scale and offset, epsilon 1e-3.
        return nn.InstanceNorm3d(channels, eps=1e-3, affine=True)
    if norm == "batch":
        return nn.BatchNorm3d(channels, eps=1e-3, momentum=0.01)
    raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")


class ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, norm: str, convs: int = 2):
        layers = []
        for i in range(convs):
            layers += [
                nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                _norm(norm, out_channels),
                nn.LeakyReLU(0.01),
            ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """Args: in_channels, num_classes, filters (level 1), depth (levels), norm (``instance`` or ``batch``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, filters: int = 16, depth: int = 4, norm="instance"):
        super().__init__()
        features = [filters * 2**i for i in range(depth)]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for channels in features:
            self.encoder.append(ConvBlock(previous, channels, norm))
            previous = channels
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(depth - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(previous, features[level], 2, stride=2))
            self.decoder.append(ConvBlock(2 * features[level], features[level], norm))
            previous = features[level]
        self.head = nn.Conv3d(previous, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.ConvTranspose3d) and module is not self.head:
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
