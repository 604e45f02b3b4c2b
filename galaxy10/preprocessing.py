"""How an image becomes a model's input, as training and every consumer make it: any image as 8-bit RGB
(`to_rgb8`), its centre cropped and resized to the model's side as a uint8 tensor (`image_to_tensor`), scaled
to [0, 1] for the network (`to_model_input`); and `Preprocessing`, the record of it a checkpoint keeps and
applies by being called, as torchvision's `Weights.transforms()` does. Also the 8 flips and quarter turns of
a batch (`dihedral_views`), which test-time augmentation averages over.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from galaxy10.errors import Galaxy10Error
from galaxy10.networks import IMAGENET_MEAN, IMAGENET_STD, architecture

# How an image becomes model input, as every checkpoint records it beside the crop (and a torchvision
# network's normalisation).
PREPROCESSING = {"color": "RGB", "resize": "PIL bilinear", "scale": "uint8 / 255"}


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any ordinary PIL image (greyscale, 16-bit, palette, RGBA, CMYK) as 8-bit RGB."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: scale the full range down to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            peak = max(float(array.max(initial=0)), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become black sky, not whatever colour they happened to store.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def image_to_tensor(image: Image.Image, image_size: int, crop: float = 1.0) -> torch.Tensor:
    """The model's input for one image, as uint8 (3, size, size); training and inference share it. With
    `crop` < 1 only the central square of crop x the shorter side is kept (one resample: PIL's resize reads
    the box); with 1, as the original did, the whole frame is resized, squashed if it is not square."""
    image = to_rgb8(image)
    box = crop_box(image.size, crop)
    if box is not None or image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR, box=box)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def crop_box(size: tuple[int, int], crop: float) -> tuple[float, float, float, float] | None:
    """(left, top, right, bottom) of the centred square of crop x the shorter side; None for the whole
    frame (crop 1)."""
    if crop >= 1:
        return None
    width, height = size
    side = crop * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def check_crop(crop: float) -> float:
    if not 0 < crop <= 1:
        raise Galaxy10Error(f"--crop must be a fraction in (0, 1] of the image's shorter side, not {crop}")
    return crop


def dihedral_views(x: torch.Tensor) -> torch.Tensor:
    """The 8 symmetries of the square (4 quarter turns, each also mirrored), stacked view-major: (8B, ...)."""
    turns = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return torch.cat(turns + [turn.flip(3) for turn in turns])


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1], the only scaling the model was trained with."""
    return batch.float().div_(255)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input, stored with the weights and applied by calling it: the centre
    crop (a fraction of the shorter side; 1 is the whole frame), a bilinear resize to the model's side, uint8
    RGB. The network scales it to [0, 1]; a torchvision one then normalises with `mean` and `std` itself."""

    image_size: int
    crop: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The uint8 (3, S, S) input for one image, as training and every consumer make it."""
        return image_to_tensor(image, self.image_size, self.crop)

    @classmethod
    def for_network(cls, arch: str, image_size: int, crop: float = 1.0) -> Preprocessing:
        if architecture(arch).torchvision:
            return cls(image_size, crop, IMAGENET_MEAN, IMAGENET_STD)
        return cls(image_size, crop)

    def to_dict(self) -> dict[str, Any]:
        normalisation = {} if self.mean is None else {"mean": list(self.mean), "std": list(self.std or ())}
        return {**PREPROCESSING, "crop": self.crop, **normalisation}

    @classmethod
    def from_dict(cls, image_size: int, record: Mapping[str, Any]) -> Preprocessing:
        """A checkpoint's preprocessing; one without a crop (older ones, the original's) saw it all."""
        mean, std = record.get("mean"), record.get("std")
        return cls(int(image_size), float(record.get("crop", 1.0)),
                   None if mean is None else tuple(mean), None if std is None else tuple(std))


