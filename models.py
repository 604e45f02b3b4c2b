"""The networks, how an image becomes their input, and the checkpoint format: what training (cnn.py),
inference (cnn_use_model.py) and the web page (main.py) share. It imports none of the scripts.

- The networks, by their --arch name in `ARCHITECTURES`: DeepCNN-5Block (`deepcnn5`, `CNNModel`), the
  original project's five blocks of three convolutions, and torchvision's networks built from scratch by
  `torchvision.models.get_model` (`TorchvisionNet`, which normalises its input as ImageNet weights
  expect). `build_model` makes any of them; `split_at_last_conv` cuts one where Grad-CAM looks; `--weights`
  starts a torchvision network from ImageNet's or a state-dict file's weights (`load_pretrained`).
- Preprocessing: any image as 8-bit RGB (`to_rgb8`), its centre cropped and resized to the model's side as
  a uint8 tensor (`image_to_tensor`), scaled to [0, 1] for the network (`to_model_input`). Every
  checkpoint records it (`preprocessing`: the crop, and the normalisation of a torchvision network).
- Checkpoints: `save_checkpoint` writes atomically; `load_checkpoint` reads this project's checkpoints and
  the original project's (converted in memory) with `torch.load(weights_only=True)`; `checkpoint_metadata`
  is what a checkpoint must hold for inference to rebuild the model without guessing;
  `model_from_checkpoint` rebuilds it. The files beside a checkpoint are named by `output_path`.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.fx.experimental.optimization import fuse

from galaxy10 import CLASS_NAMES, Galaxy10Error, atomic_path

ARCHITECTURE = "DeepCNN-5Block"  # the original's network, as its checkpoints name it
DEFAULT_ARCH = "deepcnn5"
# torchvision's networks on offer, each built from scratch or from --weights (README, "The model").
TORCHVISION_ARCHS = ("resnet18", "resnet50", "convnext_tiny", "efficientnet_v2_s", "efficientnet_b0")
# How an image becomes model input; stored in every checkpoint so inference never guesses. A checkpoint
# without a crop (older ones, the original's) saw the whole frame.
PREPROCESSING = {"color": "RGB", "resize": "PIL bilinear", "scale": "uint8 / 255", "crop": 1.0}
# The normalisation torchvision's ImageNet weights expect (weights.transforms().mean and .std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std come from the checkpoint's preprocessing record."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TorchvisionNet(nn.Module):
    """One of torchvision's networks, built from scratch with `torchvision.models.get_model`, that
    normalises its [0, 1] input first, as ImageNet weights expect: every consumer that runs the model applies
    the normalisation, and training's augmentation still works on [0, 1] images. Its weights are
    torchvision's own under `net.`."""

    def __init__(self, name: str, num_classes: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


@dataclass(frozen=True)
class Architecture:
    """A network on offer: its --arch name, the name checkpoints record, whether it is torchvision's, and
    whether bfloat16 autocast speeds its training up on a CPU that computes bfloat16 natively."""

    name: str
    title: str
    torchvision: bool
    cpu_bf16: bool = True


# The EfficientNets' depthwise convolutions have no fast bfloat16 CPU kernel: under autocast they train
# at 0.95x (v2_s) and 0.55x (b0) the images/s of float32 on a 2-core AMX Xeon (benchmarks/bench_train.py).
SLOW_CPU_BF16 = ("efficientnet_v2_s", "efficientnet_b0")
ARCHITECTURES: dict[str, Architecture] = {
    DEFAULT_ARCH: Architecture(DEFAULT_ARCH, ARCHITECTURE, torchvision=False),
    **{name: Architecture(name, name, torchvision=True, cpu_bf16=name not in SLOW_CPU_BF16)
       for name in TORCHVISION_ARCHS},
}


def architecture(name: str) -> Architecture:
    """The network called `name` (an --arch value); an unknown name is one line listing the choices."""
    if name not in ARCHITECTURES:
        raise Galaxy10Error(f"unknown --arch {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def checkpoint_architecture(checkpoint: dict[str, Any]) -> Architecture | None:
    """The network a checkpoint's `architecture` names, or None for one this project does not know."""
    name = checkpoint.get("architecture")
    return next((arch for arch in ARCHITECTURES.values() if arch.title == name), None)


def build_model(
    arch: str, num_classes: int, image_size: int, head_init: str = "normal",
    preprocessing: dict[str, Any] | None = None,
) -> nn.Module:
    """A fresh network: DeepCNN-5Block (whose classifier `head_init` initialises), or a torchvision one
    normalising with the preprocessing's mean and std (ImageNet's unless it says otherwise)."""
    if not architecture(arch).torchvision:
        return CNNModel(num_classes, image_size, head_init)
    if image_size % 32 or image_size < 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    preprocessing = preprocessing or {}
    return TorchvisionNet(arch, num_classes, preprocessing.get("mean", IMAGENET_MEAN),
                          preprocessing.get("std", IMAGENET_STD))


def split_at_last_conv(model: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """The network as (body, head): the body maps images to the last convolutional stage's activations,
    where Grad-CAM looks; the head pools and classifies them, a flat Sequential of layers. head(body(x))
    is model(x)."""
    if isinstance(model, CNNModel):  # the last block's activations come before its max-pool
        return nn.Sequential(*model.features[:-1]), nn.Sequential(model.features[-1], *model.classifier)
    children = dict(model.net.named_children())
    names = list(children)
    pool = names.index("avgpool")
    after = [children[name] for name in names[pool + 1:]]
    classifier = [layer for part in after for layer in (part if isinstance(part, nn.Sequential) else (part,))]
    # torchvision's forward() flattens after the pool, except where the classifier does it (ConvNeXt).
    flatten = [] if any(isinstance(layer, nn.Flatten) for layer in classifier) else [nn.Flatten(1)]
    body = nn.Sequential(model.normalize, *(children[name] for name in names[:pool]))
    return body, nn.Sequential(children["avgpool"], *flatten, *classifier)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm folded into the convolution before it (torch.fx traces the
    network and fuses each Conv2d -> BatchNorm2d pair): exact up to float rounding, one pass less."""
    return fuse(module.eval(), inplace=False)


def load_pretrained(model: nn.Module, arch: str, weights: str) -> str:
    """Start a torchvision network from --weights: "imagenet" (torchvision's default ImageNet weights,
    downloaded once into torch's cache) or a state-dict file saved from the same torchvision network. The
    classifier's last layer stays as built, for these classes. Returns what the checkpoint records."""
    if not isinstance(model, TorchvisionNet):
        choices = " / ".join(TORCHVISION_ARCHS)
        raise Galaxy10Error(f"--weights needs a torchvision network (--arch {choices}); DeepCNN-5Block "
                            "starts from a checkpoint with --init-from")
    state, source = imagenet_state(arch) if weights == "imagenet" else (state_dict_file(weights), weights)
    output = last_linear_name(model.net)
    backbone = {key: value for key, value in state.items() if not key.startswith(f"{output}.")}
    try:
        missing, unexpected = model.net.load_state_dict(backbone, strict=False)
    except RuntimeError as err:  # a tensor of another shape: another network's weights
        missing, unexpected = [], [str(err).strip().splitlines()[1].strip()]
    wrong = [key for key in missing if not key.startswith(f"{output}.")] + unexpected
    if wrong:
        raise Galaxy10Error(f"--weights {weights} does not hold {arch}'s weights (first mismatch: "
                            f"{wrong[0]}); save them from torchvision.models.{arch}()")
    return source


def imagenet_state(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's default ImageNet weights for `arch` and their name; offline, one line says which file
    to put where."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=True), f"imagenet ({weights})"
    except Exception as err:  # URLError, OSError, HTTPError: the download failed
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise Galaxy10Error(
            f"cannot download the ImageNet weights of {arch} ({type(err).__name__}: {err}); without "
            f"internet, put {weights.url.rsplit('/', 1)[-1]} (from {weights.url}) into {folder}, or pass "
            "--weights FILE"
        ) from None


def state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save(model.state_dict(), path), read safely."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Galaxy10Error(f"--weights {path} not found: give imagenet or a state-dict file") from None
    except Exception as err:  # torch raises many types for foreign or damaged files
        raise Galaxy10Error(f"--weights {path} is not a state-dict file ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Galaxy10Error(f"--weights {path} is not a state dict: save one with "
                            "torch.save(model.state_dict(), path)")
    return state


def last_linear_name(net: nn.Module) -> str:
    """The name of a network's output layer (resnet: fc, convnext: classifier.2): its last Linear."""
    return [name for name, module in net.named_modules() if isinstance(module, nn.Linear)][-1]


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
    if not isinstance(checkpoint, dict) or checkpoint_architecture(checkpoint) is None:
        raise Galaxy10Error(
            f"{path} is not a checkpoint written by cnn.py (of {ARCHITECTURE} or another --arch network); "
            "train one with `python cnn.py`"
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


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the trained model, in eval mode, from the checkpoint's own configuration; weights that do
    not fit it (a damaged or hand-edited file) are a Galaxy10Error, not a RuntimeError deep in torch."""
    arch = checkpoint_architecture(checkpoint)
    size, classes = checkpoint["image_size"], len(checkpoint["class_names"])
    model = build_model(arch.name, classes, size, preprocessing=checkpoint["preprocessing"])
    try:
        model.load_state_dict(checkpoint["model_state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        raise Galaxy10Error(f"the weights do not fit a {size} px {arch.title} with {classes} classes "
                            f"({first}); use a checkpoint written by cnn.py") from None
    return model.eval()


def checkpoint_metadata(
    image_size: int, class_names: Sequence[str] = CLASS_NAMES, arch: str = DEFAULT_ARCH, crop: float = 1.0,
) -> dict[str, Any]:
    """What inference needs to rebuild the model and its preprocessing without guessing."""
    return {
        "architecture": architecture(arch).title,
        "image_size": image_size,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocessing": preprocessing_for(arch, crop),
    }


def preprocessing_for(arch: str, crop: float) -> dict[str, Any]:
    """The preprocessing record of a network: the crop, and for torchvision's the normalisation it applies."""
    if not architecture(arch).torchvision:
        return {**PREPROCESSING, "crop": crop}
    return {**PREPROCESSING, "crop": crop, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def checkpoint_crop(checkpoint: dict[str, Any]) -> float:
    """The centre crop a checkpoint's model was trained on; older checkpoints and the original's saw the
    whole frame."""
    return float(checkpoint["preprocessing"].get("crop", 1.0))


def checkpoint_recipe(checkpoint: dict[str, Any]) -> str:
    """The recipe that trained a checkpoint; those written before recipes were recorded used the original."""
    return checkpoint.get("recipe", "original")


def output_path(model_path: str | os.PathLike[str], kind: str) -> Path:
    """A file beside the checkpoint with the same stem: ``model.pth`` -> ``model.<kind>``."""
    return Path(model_path).with_suffix(f".{kind}")


RESUME_KIND = "resume.pth"


def resume_path(model_path: str | os.PathLike[str]) -> Path:
    return output_path(model_path, RESUME_KIND)
