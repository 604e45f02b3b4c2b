"""DeepCNN-5Block: the model, its input preprocessing, its checkpoints, and its training.

    python cnn.py                      # the original configuration: balanced_data/, 256 px
    python cnn.py --image-size 64      # a CPU-sized profile
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from load_data import CLASS_NAMES, Galaxy10Error

ARCHITECTURE = "DeepCNN-5Block"
# How an image becomes model input; stored in every checkpoint so inference never guesses.
PREPROCESSING = {"color": "RGB", "resize": "PIL bilinear", "scale": "uint8 / 255"}
CHANNELS = (32, 64, 128, 256, 512)
HIDDEN = (2048, 512, 128, 32)
DROPOUT = (0.4, 0.3, 0.2, 0.1)


class CNNModel(nn.Module):
    """Five blocks of three 3x3 conv+BN+ReLU layers and a max-pool, then a five-layer classifier."""

    def __init__(self, num_classes: int = 10, image_size: int = 256) -> None:
        super().__init__()
        if image_size % 32 or image_size < 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
        self.num_classes = num_classes
        self.image_size = image_size
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in CHANNELS:
            for _ in range(3):
                layers += [
                    nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                in_channels = out_channels
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(CHANNELS)
        head: list[nn.Module] = [nn.Flatten()]
        in_features = CHANNELS[-1] * side * side
        for width, p in zip(HIDDEN, DROPOUT, strict=True):
            head += [nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Dropout(p)]
            in_features = width
        head.append(nn.Linear(in_features, num_classes))
        self.classifier = nn.Sequential(*head)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- preprocessing


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


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """The model's input for one image, as uint8 (3, size, size); training and inference share it."""
    image = to_rgb8(image)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1], the only scaling the model was trained with."""
    return batch.float().div_(255)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated file under the real name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of this project's checkpoints safely (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise Galaxy10Error(f"checkpoint {path} not found: train one with `python cnn.py`")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise Galaxy10Error(
            f"{path} is not a checkpoint of this project ({type(err).__name__}); "
            "use a .pth file written by cnn.py"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("architecture") != ARCHITECTURE:
        raise Galaxy10Error(
            f"{path} is not a {ARCHITECTURE} checkpoint written by cnn.py; train one with `python cnn.py`"
        )
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> CNNModel:
    """Rebuild the trained model, in eval mode, from the checkpoint's own configuration."""
    model = CNNModel(num_classes=len(checkpoint["class_names"]), image_size=checkpoint["image_size"])
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.eval()


def checkpoint_metadata(
    image_size: int, class_names: list[str] | tuple[str, ...] = CLASS_NAMES
) -> dict[str, Any]:
    """What inference needs to rebuild the model and its preprocessing without guessing."""
    return {
        "architecture": ARCHITECTURE,
        "image_size": image_size,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocessing": dict(PREPROCESSING),
    }
