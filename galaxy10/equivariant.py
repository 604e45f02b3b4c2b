"""A network whose answer is the same for an image and for that image turned by quarter turns or mirrored:
group convolutions over D4, the 8 symmetries of the square (Cohen & Welling 2016), in plain PyTorch.

Every feature map is a field over the group: C channels are stored as C x 8 planes of an ordinary
(B, C * 8, H, W) tensor, channel c's orientation g at plane c * 8 + g, so channels_last, bfloat16 and
every tool for ordinary convolutions still apply. The lifting layer convolves an image with its filters
turned and mirrored every way; a group convolution mixes the orientations as the group composes them; so
turning the input turns every feature map and permutes its orientations, exactly. Pooling the
orientations and the image at the end leaves features, and an answer, that do not change under the 8
symmetries. Downsampling is 2x2 average pooling, which maps the pixels of an even-sided map onto those of
its turned or mirrored self (a strided convolution would not), so the symmetry is exact, not approximate.

`D4ResNet` is ResNet-18's layout (two blocks per stage, four stages, at ResNet-18's resolutions) with an
eighth of its channels as fields: the same convolution work as ResNet-18 and an eighth of its weights.
networks.py offers it as `--arch d4resnet18`.
"""
from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

ORIENTATIONS = 8  # the order of D4: 4 quarter turns, each also mirrored
WIDTHS = (8, 16, 32, 64)  # fields per stage: x 8 orientations, ResNet-18's 64-512 channels


def transform(x: torch.Tensor, g: int) -> torch.Tensor:
    """Symmetry g (0-7) of the square applied to the last two axes: a mirror (g >= 4), then g % 4 quarter
    turns."""
    mirrored, turns = divmod(g, 4)
    return torch.rot90(x.flip(-1) if mirrored else x, turns, dims=(-2, -1))


@cache
def group_table() -> tuple[tuple[int, ...], ...]:
    """table[g][h] = the index of g^-1 h, read off what the symmetries do to an asymmetric 3x3 probe."""
    probe = torch.arange(9.0).view(3, 3)
    images = [transform(probe, g) for g in range(ORIENTATIONS)]

    def index(image: torch.Tensor) -> int:
        return next(i for i, other in enumerate(images) if torch.equal(image, other))

    # transform(transform(x, b), a) is symmetry a.b; the inverse of g is the one that undoes it.
    compose = [[index(transform(transform(probe, b), a)) for b in range(8)] for a in range(8)]
    inverse = [next(i for i in range(8) if compose[g][i] == 0) for g in range(8)]
    return tuple(tuple(compose[inverse[g]][h] for h in range(8)) for g in range(8))


def turned_positions(kernel_size: int, g: int) -> torch.Tensor:
    """For each position of a kernel turned by symmetry g, the position it comes from in the kernel."""
    return transform(torch.arange(kernel_size * kernel_size).view(kernel_size, kernel_size), g).flatten()


class LiftingConv(nn.Module):
    """Image (B, C_in, H, W) -> fields (B, C_out * 8, H, W): each filter in its 8 orientations."""

    def __init__(self, in_channels: int, out_fields: int, kernel_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_fields, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.padding = kernel_size // 2
        self.bias: nn.Parameter | None = None  # one per field, once a FieldNorm is folded in
        # The filter bank is one gather of the weights: for orientation g, input channel c and position p,
        # the weight at c's position turned_positions(g)[p].
        area = kernel_size * kernel_size
        gather = [c * area + turned_positions(kernel_size, g) for g in range(ORIENTATIONS)
                  for c in range(in_channels)]
        self.register_buffer("gather", torch.cat(gather), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, channels, k = self.weight.shape[0], self.weight.shape[1], self.weight.shape[-1]
        bank = self.weight.reshape(out, -1).index_select(1, self.gather)
        return F.conv2d(x, bank.reshape(out * ORIENTATIONS, channels, k, k), field_bias(self.bias),
                        padding=self.padding)


class GroupConv(nn.Module):
    """Fields (B, C_in * 8, H, W) -> fields (B, C_out * 8, H, W): output orientation g of field o sums, over
    every input field i and orientation h, the input convolved with filter (o, i, g^-1 h) turned by g."""

    def __init__(self, in_fields: int, out_fields: int, kernel_size: int) -> None:
        super().__init__()
        # Stored as 4-D (out, in x 8, k, k), as a convolution's weights are, so channels_last applies.
        shape = (out_fields, in_fields * ORIENTATIONS, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.padding = kernel_size // 2
        self.bias: nn.Parameter | None = None  # one per field, once a FieldNorm is folded in
        # The filter bank is one gather of the weights: for output orientation g, input field i, input
        # orientation h and position p, the weight of (i, g^-1 h) at its position turned_positions(g)[p].
        table, area = group_table(), kernel_size * kernel_size
        gather = [(i * ORIENTATIONS + table[g][h]) * area + turned_positions(kernel_size, g)
                  for g in range(ORIENTATIONS) for i in range(in_fields) for h in range(ORIENTATIONS)]
        self.register_buffer("gather", torch.cat(gather), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, inputs, k = self.weight.shape[0], self.weight.shape[1], self.weight.shape[-1]
        bank = self.weight.reshape(out, -1).index_select(1, self.gather)
        return F.conv2d(x, bank.reshape(out * ORIENTATIONS, inputs, k, k), field_bias(self.bias),
                        padding=self.padding)


def field_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias per field as one per plane: each field's for its 8 orientations."""
    return None if bias is None else bias.repeat_interleave(ORIENTATIONS)


class FieldNorm(nn.Module):
    """BatchNorm with one mean, variance, scale and shift per field, shared by its 8 orientations."""

    def __init__(self, fields: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, h, w = x.shape
        per_field = x.reshape(n, channels // ORIENTATIONS, ORIENTATIONS * h, w)
        return self.norm(per_field).reshape(n, channels, h, w)


def fold_field_norms(module: nn.Module) -> nn.Module:
    """The module with every FieldNorm that follows a lifting or group convolution folded into it (its
    scale into the weights, its shift into a bias per field), in place, in eval mode: exact up to float
    rounding, one pass less, as networks.fold_batchnorm does for ordinary convolutions."""
    for parent in [module, *module.modules()]:
        children = list(parent.named_children())
        for (_, conv), (name, norm) in zip(children, children[1:], strict=False):
            if isinstance(conv, (LiftingConv, GroupConv)) and isinstance(norm, FieldNorm):
                fold(conv, norm.norm)
                setattr(parent, name, nn.Identity())
    return module.eval()


@torch.no_grad()
def fold(conv: LiftingConv | GroupConv, norm: nn.BatchNorm2d) -> None:
    scale = norm.weight / (norm.running_var + norm.eps).sqrt()
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    shift = norm.bias - norm.running_mean * scale
    conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift)


class OrientationPool(nn.Module):
    """Fields (B, C * 8, H, W) -> (B, C, H, W): each field's mean over its orientations, which a symmetry of
    the input only turns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, h, w = x.shape
        return x.reshape(n, channels // ORIENTATIONS, ORIENTATIONS, h, w).mean(2)


class GroupBlock(nn.Module):
    """ResNet's basic block over fields: two 3x3 group convolutions with FieldNorm, a residual, ReLU."""

    def __init__(self, in_fields: int, out_fields: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = GroupConv(in_fields, out_fields, 3), FieldNorm(out_fields)
        self.conv2, self.norm2 = GroupConv(out_fields, out_fields, 3), FieldNorm(out_fields)
        self.shortcut = nn.Identity() if in_fields == out_fields else nn.Sequential(
            GroupConv(in_fields, out_fields, 1), FieldNorm(out_fields))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class D4ResNet(nn.Module):
    """ResNet-18 over D4 fields: a 5x5 lifting stem at half the side (as ResNet's stride-2 stem sees it,
    but by pooling, which keeps the symmetry), pooled again to a quarter (ResNet's max-pool), then four
    stages of two GroupBlocks (each stage after the first halves the side first), the orientations pooled
    (where Grad-CAM looks), then the image, then the classifier. Its input is an image in [0, 1], as
    DeepCNN-5Block's; its answer is invariant under the 8 symmetries of the square."""

    orientations = ORIENTATIONS  # what networks.staged pools its stage summaries over

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.AvgPool2d(2), LiftingConv(3, widths[0], 5), FieldNorm(widths[0]),
                                   nn.ReLU(inplace=True), nn.AvgPool2d(2)]
        fields = widths[0]
        for stage, width in enumerate(widths):
            if stage:
                layers.append(nn.AvgPool2d(2))
            layers += [GroupBlock(fields, width), GroupBlock(width, width)]
            fields = width
        layers.append(OrientationPool())
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                        nn.Linear(fields, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
