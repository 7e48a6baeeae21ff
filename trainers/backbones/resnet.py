"""torchvision ResNets without the classifier, plus a narrow ResNet-18 for CPUs."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

from selfsup.trainers.backbones import BACKBONES


def small_input_stem(model: tv.ResNet, in_channels: int, width: int) -> None:
    """Swap the 7×7/2 conv + maxpool stem for a 3×3/1 conv (CIFAR-style, for 28–64 px inputs)."""
    model.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


class ResNetTrunk(nn.Module):
    """A torchvision ResNet with its fc dropped: images [B, C, H, W] → pooled features [B, out_dim]."""

    def __init__(self, model: tv.ResNet, out_dim: int) -> None:
        super().__init__()
        model.fc = nn.Identity()
        self.net = model
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, out_dim] of images [B, C, H, W]."""
        if x.ndim != 4:
            raise ValueError(f"resnet takes images [B, C, H, W]; got shape {tuple(x.shape)}")
        return self.net(x)  # [B, out_dim]


def build_resnet(
    block: type[tv.BasicBlock] | type[tv.Bottleneck], layers: list[int], in_channels: int, small_input: bool
) -> ResNetTrunk:
    """A standard-width torchvision ResNet trunk with the requested stem."""
    if in_channels < 1:
        raise ValueError(f"resnet in_channels={in_channels}; it must be positive")
    model = tv.ResNet(block, layers)
    if small_input:
        small_input_stem(model, in_channels, 64)
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return ResNetTrunk(model, 512 * block.expansion)


@BACKBONES.register("resnet18")
def resnet18(in_channels: int = 3, small_input: bool = False) -> ResNetTrunk:
    """ResNet-18 trunk, out_dim 512."""
    return build_resnet(tv.BasicBlock, [2, 2, 2, 2], in_channels, small_input)


@BACKBONES.register("resnet50")
def resnet50(in_channels: int = 3, small_input: bool = False) -> ResNetTrunk:
    """ResNet-50 trunk, out_dim 2048."""
    return build_resnet(tv.Bottleneck, [3, 4, 6, 3], in_channels, small_input)


def basic_stage(in_width: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` BasicBlocks at `width`, the first one downsampling by `stride`."""
    downsample = None
    if stride != 1 or in_width != width:
        downsample = nn.Sequential(
            nn.Conv2d(in_width, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
        )
    layers = [tv.BasicBlock(in_width, width, stride, downsample)]
    layers += [tv.BasicBlock(width, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


@BACKBONES.register("resnet18_narrow")
def resnet18_narrow(in_channels: int = 3, width: int = 32, small_input: bool = True) -> ResNetTrunk:
    """ResNet-18 layout at base width `width` (widths w, 2w, 4w, 8w), out_dim 8 * width."""
    if in_channels < 1 or width < 1:
        raise ValueError(f"resnet18_narrow in_channels={in_channels}, width={width}; both must be positive")
    model = tv.ResNet(tv.BasicBlock, [2, 2, 2, 2])
    if small_input:
        small_input_stem(model, in_channels, width)
    else:
        model.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    widths = [width, 2 * width, 4 * width, 8 * width]
    prev = width
    for i, w in enumerate(widths):
        setattr(model, f"layer{i + 1}", basic_stage(prev, w, 2, 1 if i == 0 else 2))
        prev = w
    for m in model.modules():  # the layers were rebuilt, so redo torchvision's init on them
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return ResNetTrunk(model, 8 * width)
