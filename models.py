"""The networks, how an image becomes their input, and the checkpoint format: what training (cnn.py),
inference (cnn_use_model.py) and the web page (main.py) share. It imports none of the scripts.

- The networks: DeepCNN-5Block (`CNNModel`), the original project's five blocks of three convolutions.
- Preprocessing: any image as 8-bit RGB (`to_rgb8`), resized to the model's side as a uint8 tensor
  (`image_to_tensor`), scaled to [0, 1] for the network (`to_model_input`). Every checkpoint records it.
- Checkpoints: `save_checkpoint` writes atomically; `load_checkpoint` reads this project's checkpoints and
  the original project's (converted in memory) with `torch.load(weights_only=True)`; `checkpoint_metadata`
  is what a checkpoint must hold for inference to rebuild the model without guessing;
  `model_from_checkpoint` rebuilds it. The files beside a checkpoint are named by `output_path`.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from galaxy10 import CLASS_NAMES, Galaxy10Error, atomic_path

ARCHITECTURE = "DeepCNN-5Block"
# How an image becomes model input; stored in every checkpoint so inference never guesses.
PREPROCESSING = {"color": "RGB", "resize": "PIL bilinear", "scale": "uint8 / 255"}
CHANNELS = (32, 64, 128, 256, 512)
HIDDEN = (2048, 512, 128, 32)
DROPOUT = (0.4, 0.3, 0.2, 0.1)
HEAD_INITS = ("normal", "kaiming")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
# The original project's checkpoints (its model.pth and based_on_balanced_data_model.pth) hold exactly
# these keys: no architecture record, and weights named after its nested blocks.
ORIGINAL_KEYS = frozenset(
    {"epoch", "model_state_dict", "optimizer_state_dict", "train_history", "final_val_loss", "final_val_acc"}
)
# The original's features were Sequential(block, MaxPool2d, block, MaxPool2d, ...), each block a
# Sequential of 3 x (Conv2d, BatchNorm2d, ReLU), so its weights are `features.<2 x block>.<layer>.<param>`.
NESTED_FEATURE = re.compile(r"(features\.(\d+)\.(\d+))\.\w+")


# ---------------------------------------------------------------- the networks


class CNNModel(nn.Module):
    """Five blocks of three 3x3 conv+BN+ReLU layers and a max-pool, then a five-layer classifier.

    ``head_init`` initialises the classifier's Linear layers: ``"normal"`` is the original's N(0, 0.01);
    ``"kaiming"`` keeps the signal's scale through the hidden layers (see cnn.py's RECIPES).
    """

    def __init__(self, num_classes: int = 10, image_size: int = 256, head_init: str = "normal") -> None:
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
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
        self._initialize_weights(head_init)

    def _initialize_weights(self, head_init: str) -> None:
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
        if head_init == "kaiming":
            # Hidden layers keep the activations' scale (std sqrt(2 / fan_in) for ReLU); the output
            # layer keeps N(0, 0.01), so training starts from near-uniform class probabilities.
            for m in [m for m in self.classifier if isinstance(m, nn.Linear)][:-1]:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

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
    """Write a checkpoint atomically."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load one of this project's checkpoints, or the original project's converted to one, safely (no
    arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise Galaxy10Error(f"checkpoint {path} not found: train one with `python cnn.py`")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise Galaxy10Error(
            f"{path} is not a checkpoint of this project ({type(err).__name__}); "
            "use a .pth file written by cnn.py"
        ) from None
    if isinstance(checkpoint, dict) and checkpoint.keys() == ORIGINAL_KEYS:
        checkpoint = from_original_checkpoint(checkpoint)
    if not isinstance(checkpoint, dict) or checkpoint.get("architecture") != ARCHITECTURE:
        raise Galaxy10Error(
            f"{path} is not a {ARCHITECTURE} checkpoint written by cnn.py; train one with `python cnn.py`"
        )
    return checkpoint


def from_original_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The original project's checkpoint as one of this project's (marked ``"source": "original"``), or
    None when its weights are not DeepCNN-5Block's.

    The original trained on Galaxy10's classes with this project's preprocessing; its image size is
    read from the weights.
    """
    state = checkpoint["model_state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        return None
    image_size = image_size_from_classifier(state)
    if image_size is None:
        return None
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation work
        expected = CNNModel(len(CLASS_NAMES), image_size).state_dict()
    weights = flatten_feature_names(state, expected)
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in expected.items()}:
        return None
    return {
        **checkpoint,
        **checkpoint_metadata(image_size),
        "model_state_dict": weights,
        "epoch": checkpoint["epoch"] - 1,  # it stored one more than the last epoch, whose weights it kept
        "source": "original",
        "recipe": "original",
    }


def image_size_from_classifier(state: dict[str, torch.Tensor]) -> int | None:
    """The input side a DeepCNN-5Block state implies: the first Linear layer (after the Flatten) reads
    CHANNELS[-1] maps of (side / 32)^2 cells, so 32768 inputs mean 256 px. None when no side fits."""
    first_linear = state.get("classifier.1.weight")
    if first_linear is None or first_linear.dim() != 2:
        return None
    cells = first_linear.shape[1] // CHANNELS[-1]
    side = math.isqrt(cells)
    if side < 1 or side * side * CHANNELS[-1] != first_linear.shape[1]:
        return None
    return side * 2 ** len(CHANNELS)


def flatten_feature_names(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with the original's nested feature layers renamed to this model's flat ones.

    Both list the same conv and BatchNorm layers in network order, so the k-th nested layer with weights
    becomes the k-th flat one; a state of any other layout keeps names that the caller's check rejects.
    """
    nested = sorted({(int(m[2]), int(m[3]), m[1]) for key in state if (m := NESTED_FEATURE.fullmatch(key))})
    flat = sorted({key.rsplit(".", 1)[0] for key in expected if key.startswith("features.")},
                  key=lambda name: int(name.split(".")[1]))
    renamed = {old: new for (_, _, old), new in zip(nested, flat, strict=False)}

    def rename(key: str) -> str:
        layer, _, param = key.rpartition(".")
        return f"{renamed.get(layer, layer)}.{param}"

    return {rename(key): value for key, value in state.items()}


def model_from_checkpoint(checkpoint: dict[str, Any]) -> CNNModel:
    """Rebuild the trained model, in eval mode, from the checkpoint's own configuration; weights that do
    not fit it (a damaged or hand-edited file) are a Galaxy10Error, not a RuntimeError deep in torch."""
    model = CNNModel(num_classes=len(checkpoint["class_names"]), image_size=checkpoint["image_size"])
    try:
        model.load_state_dict(checkpoint["model_state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        size, classes = checkpoint["image_size"], len(checkpoint["class_names"])
        raise Galaxy10Error(f"the weights do not fit a {size} px {ARCHITECTURE} with {classes} classes "
                            f"({first}); use a checkpoint written by cnn.py") from None
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


def checkpoint_recipe(checkpoint: dict[str, Any]) -> str:
    """The recipe that trained a checkpoint; those written before recipes were recorded used the original."""
    return checkpoint.get("recipe", "original")


def output_path(model_path: str | os.PathLike[str], kind: str) -> Path:
    """A file beside the checkpoint with the same stem: ``model.pth`` -> ``model.<kind>``."""
    return Path(model_path).with_suffix(f".{kind}")


RESUME_KIND = "resume.pth"
def resume_path(model_path: str | os.PathLike[str]) -> Path:
    return output_path(model_path, RESUME_KIND)
