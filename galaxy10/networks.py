"""The networks on offer, by their --arch name in `ARCHITECTURES`: DeepCNN-5Block (`deepcnn5`, `CNNModel`),
the original project's five blocks of three convolutions, and torchvision's networks built from scratch by
`torchvision.models.get_model` (`TorchvisionNet`, which normalises its input as ImageNet weights expect).
`build_model` makes any of them; `split_at_last_conv` cuts one where Grad-CAM looks; `staged` cuts one into
the stages whose features trust.py scores; `fold_batchnorm` prepares one for inference; `--weights` starts a
torchvision network from ImageNet's or a state-dict file's weights (`load_pretrained`). A new network goes
into `ARCHITECTURES`. It imports none of the scripts.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

from galaxy10.equivariant import D4ResNet, fold_field_norms
from galaxy10.errors import Galaxy10Error

ARCHITECTURE = "DeepCNN-5Block"  # the original's network, as its checkpoints name it
DEFAULT_ARCH = "deepcnn5"
# torchvision's networks on offer, each built from scratch or from --weights (docs/training.md).
TORCHVISION_ARCHS = ("resnet18", "resnet50", "convnext_tiny", "efficientnet_v2_s", "efficientnet_b0")
D4_ARCH = "d4resnet18"  # equivariant.D4ResNet: the same answer for an image turned or mirrored
# The normalisation torchvision's ImageNet weights expect (weights.transforms().mean and .std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNELS = (32, 64, 128, 256, 512)
HIDDEN = (2048, 512, 128, 32)
DROPOUT = (0.4, 0.3, 0.2, 0.1)
HEAD_INITS = ("normal", "kaiming")


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
# slower than in float32 on an AMX Xeon (docs/results.md, training throughput).
SLOW_CPU_BF16 = ("efficientnet_v2_s", "efficientnet_b0")
ARCHITECTURES: dict[str, Architecture] = {
    DEFAULT_ARCH: Architecture(DEFAULT_ARCH, ARCHITECTURE, torchvision=False),
    **{name: Architecture(name, name, torchvision=True, cpu_bf16=name not in SLOW_CPU_BF16)
       for name in TORCHVISION_ARCHS},
    D4_ARCH: Architecture(D4_ARCH, D4_ARCH, torchvision=False),
}


def architecture(name: str) -> Architecture:
    """The network called `name` (an --arch value); an unknown name is one line listing the choices."""
    if name not in ARCHITECTURES:
        raise Galaxy10Error(f"unknown --arch {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def by_title(title: str) -> Architecture | None:
    """The network a checkpoint names by its title (DeepCNN-5Block, resnet18, ...), or None."""
    return next((arch for arch in ARCHITECTURES.values() if arch.title == title), None)


def build_model(
    arch: str, num_classes: int, image_size: int, head_init: str = "normal",
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
) -> nn.Module:
    """A fresh network: DeepCNN-5Block (whose classifier `head_init` initialises), the D4-equivariant ResNet,
    or a torchvision one normalising its input with `mean` and `std` (ImageNet's by default)."""
    if arch == DEFAULT_ARCH:
        return CNNModel(num_classes, image_size, head_init)
    if image_size % 32 or image_size < 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    if arch == D4_ARCH:
        return D4ResNet(num_classes)
    return TorchvisionNet(architecture(arch).name, num_classes, mean, std)


def split_at_last_conv(model: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """The network as (body, head): the body maps images to the last convolutional stage's activations,
    where Grad-CAM looks; the head pools and classifies them, a flat Sequential of layers. head(body(x))
    is model(x)."""
    if isinstance(model, CNNModel):  # the last block's activations come before its max-pool
        return nn.Sequential(*model.features[:-1]), nn.Sequential(model.features[-1], *model.classifier)
    if isinstance(model, D4ResNet):  # the last stage's fields, their orientations pooled
        return nn.Sequential(*model.features), nn.Sequential(*model.classifier)
    children = dict(model.net.named_children())
    names = list(children)
    pool = names.index("avgpool")
    after = [children[name] for name in names[pool + 1:]]
    classifier = [layer for part in after for layer in (part if isinstance(part, nn.Sequential) else (part,))]
    # torchvision's forward() flattens after the pool, except where the classifier does it (ConvNeXt).
    flatten = [] if any(isinstance(layer, nn.Flatten) for layer in classifier) else [nn.Flatten(1)]
    body = nn.Sequential(model.normalize, *(children[name] for name in names[:pool]))
    return body, nn.Sequential(children["avgpool"], *flatten, *classifier)


class StagedNetwork(nn.Module):
    """A network as the stages of its body, each ending at the last activation of one resolution, then its
    head. forward(x) is (features, logits): logits as the network gives them, and features, what trust.py
    scores images by: every stage but the last averaged over the image (its statistics at that scale), then
    the penultimate features (the input of the output layer, which also summarise the last stage). The
    features come in float32 whatever the stages compute in. A network of D4 fields (`orientations` 8,
    equivariant.py) also averages each field's orientations, so that its features too stay the same when
    the image is turned or mirrored."""

    def __init__(self, stages: Sequence[nn.Module], head: nn.Sequential, orientations: int = 1) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.orientations = orientations

    def through_body(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The stage summaries and the last stage's activation, where Grad-CAM looks."""
        summaries = []
        for stage in self.stages[:-1]:
            x = stage(x)
            summary = spatial_mean(x)
            if self.orientations > 1:
                summary = summary.view(len(summary), -1, self.orientations).mean(2)
            summaries.append(summary)
        return summaries, self.stages[-1](x)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        summaries, activation = self.through_body(x)
        hidden = self.head[:-1](activation).float()
        return [*summaries, hidden], self.head[-1](hidden)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """The (N, C) float32 mean over the image of an (N, C, H, W) activation. Viewed as (N, HW, C), a
    channels-last activation is summed in memory order, which for bfloat16 is faster than average pooling or
    mean() (the prediction's time with and without these summaries: docs/results.md, "Inference, 256 px"),
    and as exact (the sum accumulates in float32; its one rounding is theirs too)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c).sum(1).float() / (h * w)


def staged(model: nn.Module, features: int | None = None) -> StagedNetwork:
    """The network cut into stages (StagedNetwork): staged(model)(x)[1] is model(x). With `features`, it
    gives only the last that many of its features (the leading stages run as one), for a record that scores
    fewer spaces; features=1, the penultimate only, runs the body in one piece, as fast as the plain model."""
    body, head = split_at_last_conv(model)
    stages = stages_by_resolution(body)
    if features is not None:
        leading = max(1, len(stages) - features + 1)
        stages = [nn.Sequential(*stages[:leading]), *stages[leading:]]
    return StagedNetwork(stages, head, getattr(model, "orientations", 1))


def stages_by_resolution(body: nn.Sequential) -> list[nn.Sequential]:
    """The body (its layers, with those of nested Sequentials: a ResNet's blocks, an EfficientNet's stages)
    cut after the last layer at each resolution; the input normalisation is no stage of its own. Where the
    resolution changes is read off one pass of a 256 px image on the meta device (shapes only, no work)."""
    layers = [inner for layer in body for inner in (layer if isinstance(layer, nn.Sequential) else (layer,))]
    x, sides = torch.zeros(1, 3, 256, 256, device="meta"), []
    for layer in layers:
        shapes = {name: torch.empty_like(t, device="meta")
                  for name, t in [*layer.named_parameters(), *layer.named_buffers()]}
        x = torch.func.functional_call(layer, shapes, (x,))
        sides.append(x.shape[-1])
    stages, current = [], []
    for i, layer in enumerate(layers):
        current.append(layer)
        last_at_side = i + 1 < len(layers) and sides[i + 1] != sides[i]
        if last_at_side and not isinstance(layer, Normalize):
            stages.append(nn.Sequential(*current))
            current = []
    return [*stages, nn.Sequential(*current)]


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm folded into the convolution before it (torch.fx traces the
    network and fuses each Conv2d -> BatchNorm2d pair; a D4 network's FieldNorms fold into their group
    convolutions first): exact up to float rounding, one pass less."""
    return fuse(fold_field_norms(copy.deepcopy(module).eval()), inplace=True)


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
    """The name of a network's output layer (resnet: fc, convnext: classifier.2; DeepCNN-5Block:
    classifier.13): its last Linear."""
    return [name for name, module in net.named_modules() if isinstance(module, nn.Linear)][-1]

