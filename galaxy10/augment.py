"""Training's augmentation, on the device, per sample, on float batches in [0, 1]: the original project's
(flip, rotation, shift, perspective, brightness and contrast, as torchvision's transforms draw them but one
resample per batch), the dihedral group's exact flips and quarter turns, and rotation by any angle.
`augment(x, generator, mode)` applies one of `config.AUGMENTATIONS`; `mix_batch` then mixes images and
labels (--mixup, --cutmix)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device
             ) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def _matrices(n: int, device: torch.device, **entries: torch.Tensor | float) -> torch.Tensor:
    """(n, 3, 3) identity matrices with entries named ``m<row><col>`` replaced."""
    m = torch.eye(3, device=device).repeat(n, 1, 1)
    for name, value in entries.items():
        m[:, int(name[1]), int(name[2])] = value
    return m


def perspective_warps(
    n: int, generator: torch.Generator, device: torch.device, distortion: float, p: float
) -> torch.Tensor:
    """Homographies as RandomPerspective draws them: each corner moves inward by up to distortion."""
    apply = (torch.rand(n, generator=generator, device=device) < p).float().view(n, 1, 1)
    inward = torch.rand(n, 4, 2, generator=generator, device=device) * distortion * apply
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], device=device)
    moved = corners - corners.sign() * inward
    # Solve for H mapping each moved corner (output) back to its original corner (input).
    x, y = moved.unbind(-1)
    u, v = corners.expand(n, 4, 2).unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], -1)
    a = torch.cat([rows_u, rows_v], 1)
    coeffs = torch.linalg.solve_ex(a, torch.cat([u, v], 1))[0]  # solve_ex: no error check, no GPU sync
    return torch.cat([coeffs, torch.ones(n, 1, device=device)], 1).view(n, 3, 3)


def sampling_grid(warps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """grid_sample's (n, H, W, 2) grid: each output pixel centre mapped through its sample's warp."""
    device = warps.device
    xs = (torch.arange(width, device=device) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=device) * 2 + 1) / height - 1
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    points = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3) @ warps.transpose(1, 2)
    return (points[..., :2] / points[..., 2:]).view(-1, height, width, 2)


def jitter_brightness_contrast(
    x: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float
) -> torch.Tensor:
    """ColorJitter's brightness and contrast, one factor per image."""
    n = x.shape[0]
    b = _uniform(n, 1 - brightness, 1 + brightness, generator, x.device).view(n, 1, 1, 1)
    c = _uniform(n, 1 - contrast, 1 + contrast, generator, x.device).view(n, 1, 1, 1)
    x = (x * b).clamp_(0, 1)
    grey = x[:, 0] * 0.2989 + x[:, 1] * 0.587 + x[:, 2] * 0.114
    mean = grey.mean(dim=(1, 2)).view(n, 1, 1, 1)
    return ((x - mean) * c + mean).clamp_(0, 1)


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    flip_p: float = 0.5,
    degrees: float = 15.0,
    translate: float = 0.1,
    distortion: float = 0.2,
    perspective_p: float = 0.3,
    brightness: float = 0.2,
    contrast: float = 0.2,
) -> torch.Tensor:
    """The original augmentations, drawn per sample, applied to a float batch in [0, 1] on its device.

    Flip, rotation, shift and perspective compose into one homography per sample, so the batch is
    resampled once (bilinear, black outside, like torchvision). The generator must live on x's device.
    """
    n, _, height, width = x.shape
    d = x.device
    flip = torch.where(torch.rand(n, generator=generator, device=d) < flip_p, -1.0, 1.0)
    angle = _uniform(n, -math.radians(degrees), math.radians(degrees), generator, d)
    shift = _uniform(2 * n, -2 * translate, 2 * translate, generator, d).view(2, n)  # [-1, 1] spans 2
    cos, sin = angle.cos(), angle.sin()
    warps = (
        _matrices(n, d, m00=flip)
        @ _matrices(n, d, m00=cos, m01=-sin, m10=sin, m11=cos)
        @ _matrices(n, d, m02=shift[0], m12=shift[1])
        @ perspective_warps(n, generator, d, distortion, perspective_p)
    )
    x = F.grid_sample(x, sampling_grid(warps, height, width), mode="bilinear", align_corners=False)
    return jitter_brightness_contrast(x, generator, brightness, contrast)


def dihedral_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each square image in one of the 8 symmetries of the square, drawn per sample: a mirror with p = 0.5,
    then 0-3 quarter turns. Exact: pixels move, none is interpolated."""
    n = x.shape[0]
    mirror = torch.rand(n, generator=generator, device=x.device) < 0.5
    turns = torch.randint(0, 4, (n,), generator=generator, device=x.device)
    x = torch.where(mirror.view(n, 1, 1, 1), x.flip(3), x)
    for k in (1, 2, 3):
        x = torch.where((turns == k).view(n, 1, 1, 1), torch.rot90(x, k, dims=(2, 3)), x)
    return x


def rotate_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A mirror with p = 0.5 and a rotation by any angle, per sample, in one bilinear resample; the sky is
    reflected into the corners, never black."""
    n, _, height, width = x.shape
    d = x.device
    flip = torch.where(torch.rand(n, generator=generator, device=d) < 0.5, -1.0, 1.0)
    angle = _uniform(n, 0.0, 2 * math.pi, generator, d)
    cos, sin = angle.cos(), angle.sin()
    warps = _matrices(n, d, m00=flip) @ _matrices(n, d, m00=cos, m01=-sin, m10=sin, m11=cos)
    grid = sampling_grid(warps, height, width)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment(x: torch.Tensor, generator: torch.Generator, mode: str) -> torch.Tensor:
    """A float batch in [0, 1] augmented per sample as `mode` (one of AUGMENTATIONS) says, on its device."""
    if mode == "original":
        return augment_batch(x, generator)
    if mode == "dihedral":
        return dihedral_batch(x, generator)
    if mode == "rotation":
        return rotate_batch(x, generator)
    return x


def beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha), seeded from the run's own random stream (torch draws no Beta from a
    generator of ours), so a resumed run draws the same."""
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


@dataclass(frozen=True)
class Mixing:
    """How a run mixes its batches: the Beta parameters of mixup and cutmix (0: off), over its classes."""

    mixup: float
    cutmix: float
    classes: int

    def __bool__(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def mix_batch(x: torch.Tensor, labels: torch.Tensor, mixing: Mixing, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with itself reversed: images blended
    by a weight w ~ Beta(a, a), or a box of the reversed batch pasted in (w: the area left), and the one-hot
    labels blended by w. With both on, each batch takes one of the two. Returns the images and the soft
    targets (B, C)."""
    one_hot = F.one_hot(labels, mixing.classes).to(x.dtype)
    use_cutmix = mixing.cutmix > 0 and (mixing.mixup <= 0 or bool(
        torch.rand(1, generator=generator, device=generator.device) < 0.5))
    weight = beta(mixing.cutmix if use_cutmix else mixing.mixup, generator)
    partner = x.flip(0)
    if use_cutmix:
        x, weight = paste_box(x, partner, weight, generator)
    else:
        x = x * weight + partner * (1 - weight)
    return x, one_hot * weight + one_hot.flip(0) * (1 - weight)


def paste_box(x: torch.Tensor, partner: torch.Tensor, weight: float, generator: torch.Generator
              ) -> tuple[torch.Tensor, float]:
    """`partner`'s pixels in a box of 1 - weight of the area, centred at random (cut at the edges); returns
    the images and the share of each image left its own."""
    height, width = x.shape[2:]
    side = math.sqrt(1 - weight)
    cy, cx = torch.rand(2, generator=generator, device=generator.device).cpu() * torch.tensor([height, width])
    top, bottom = int(max(cy - side * height / 2, 0)), int(min(cy + side * height / 2, height))
    left, right = int(max(cx - side * width / 2, 0)), int(min(cx + side * width / 2, width))
    x = x.clone()
    x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    return x, 1 - (bottom - top) * (right - left) / (height * width)
