"""Training: DeepCNN-5Block (models.py) on class folders of galaxy images, with early stopping.

    python cnn.py                      # the original configuration: balanced_data/, 256 px
    python cnn.py --preset cpu         # a CPU-sized profile: 64 px, 6 epochs (the demo's)
    python cnn.py --recipe original    # the original project's initialisation, optimiser and schedule
    python cnn.py --resume             # continue an interrupted run where it stopped
    python cnn.py --init-from model.pth   # fine-tune any checkpoint, the original project's included
    python cnn.py --evaluate --model-path based_on_balanced_data_model.pth   # report only
    torchrun --nproc_per_node 4 cnn.py   # data-parallel on 4 GPUs: 4 x 32 images a step

Every image is decoded once into a uint8 tensor cache (on the GPU when it fits); batches are sliced
from it and augmented on the device, so no PIL work happens per step. Beside the checkpoint (the
best epoch by validation loss) it writes ``<stem>.history.json``, ``<stem>.curves.png``,
``<stem>.report.json`` and ``<stem>.confusion.png``, and while training ``<stem>.resume.pth``.

Measured (benchmarks/bench_train.py --n 2000 --image-size 64, 2-core CPU, 2 threads): 53 training
images/s against 50 for the original PIL/DataLoader pipeline; on CPU the model, not the data, is
the limit. GPU throughput is the benchmark's job (target on one H100: >= 4000 images/s at 256 px).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchsummary import summary
from tqdm import tqdm

from distributed import (
    DEVICES,
    from_main_process,
    is_main_process,
    join_process_group,
    launched_by_torchrun,
    native_bf16,
    rank,
    select_device,
    use_local_gpu,
    world_size,
)
from galaxy10 import CLASS_NAMES, Galaxy10Error, atomic_path, run_cli
from models import (  # CNNModel and load_checkpoint stay importable from cnn, as the README used to say
    ARCHITECTURES,
    DEFAULT_ARCH,
    IMAGE_EXTENSIONS,
    CNNModel,  # noqa: F401
    architecture,
    build_model,
    check_crop,
    checkpoint_architecture,
    checkpoint_crop,
    checkpoint_metadata,
    checkpoint_recipe,
    dihedral_views,
    image_to_tensor,
    load_checkpoint,
    load_pretrained,
    model_from_checkpoint,
    output_path,
    resume_path,
    save_checkpoint,
    to_model_input,
)

LABEL_SMOOTHING = 0.1
MAX_GRAD_NORM = 1.0
LR_FACTOR, LR_PATIENCE, MIN_LR = 0.5, 2, 1e-7
LOG_EVERY = 20  # batches between progress-bar refreshes (each one waits for the GPU)
# Evaluation keeps no activations, so on a GPU larger batches fit and run faster; on CPU they do not
# (measured at 64 px on 2 cores: 198 img/s at batch 32, 152 at 128).
EVAL_BATCH_FACTOR_GPU = 4
GPU_CACHE_SHARE = 0.5  # the image cache may take this share of free GPU memory
ECE_BINS = 15
# Rank r's augmentation and dropout streams start from seed + r * RANK_SEED_STRIDE, far from the
# seeds a user steps through (42, 43, ...), so no two processes share a stream.
RANK_SEED_STRIDE = 1000


@dataclass
class Config:
    """The original configuration, plus what a reproducible, resumable run needs."""

    train_dir: str = "balanced_data/train"
    val_dir: str = "balanced_data/val"
    model_path: str = "based_on_balanced_data_model.pth"
    image_size: int = 256
    batch_size: int = 32
    num_epochs: int = 100
    learning_rate: float = 0.001
    num_classes: int = 10
    patience: int = 10
    min_delta: float = 0.0001
    arch: str = DEFAULT_ARCH
    weights: str = ""
    recipe: str = "default"
    crop: float | None = None  # None: the recipe's
    augment: str | None = None  # None: the recipe's
    preset: str = ""
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    no_augment: bool = False
    no_dropout: bool = False
    sync_bn: bool = False
    resume: bool = False
    init_from: str = ""
    compile: bool = False
    evaluate: bool = False

    def settle(self) -> Config:
        """This configuration with the recipe's crop and augmentation where no flag chose them."""
        recipe = RECIPES[self.recipe]
        crop = recipe.crop if self.crop is None else self.crop
        augmentation = "none" if self.no_augment else self.augment or recipe.augment
        return dataclasses.replace(self, crop=crop, augment=augmentation)


# Config field -> (flag, help); the parser and the printed resume command both come from this table.
FLAGS: dict[str, tuple[str, str]] = {
    "train_dir": ("--train-dir", "training images, one folder per class id"),
    "val_dir": ("--val-dir", "validation images, one folder per class id"),
    "model_path": ("--model-path", "checkpoint to write (the best epoch by val loss)"),
    "image_size": ("--image-size", "side in pixels images are resized to (a multiple of 32)"),
    "batch_size": ("--batch-size", "images per training step and process: under torchrun with N "
                                   "processes a step takes N x this"),
    "num_epochs": ("--epochs", "most epochs to train"),
    "learning_rate": ("--lr", "base learning rate; the recipe's optimiser peaks at lr_scale x it"),
    "num_classes": ("--num-classes", "class folders expected in each data folder"),
    "patience": ("--patience", "epochs without val-loss improvement before stopping early"),
    "min_delta": ("--min-delta", "smallest val-loss decrease that counts as an improvement"),
    "arch": ("--arch", f"the network: {', '.join(ARCHITECTURES)} (DeepCNN-5Block is the original's; the "
                       "others are torchvision's, built from scratch)"),
    "weights": ("--weights", "start a torchvision network from imagenet (torchvision's weights, downloaded "
                             "once) or a state-dict FILE of the same network; its classifier is new"),
    "recipe": ("--recipe", "how the model is initialised, augmented and optimised: default, or original "
                           "(the original project's recipe exactly, for comparison)"),
    "crop": ("--crop", "keep the central fraction F of the shorter side before resizing; 1 is the whole "
                       "frame (default: the recipe's: 0.5 default, 1 original)"),
    "augment": ("--augment", "training augmentation: original, dihedral (the 8 flips and quarter turns, "
                             "exact), rotation (any angle) or none (default: the recipe's: dihedral default, "
                             "original original)"),
    "preset": ("--preset", "a named set of defaults: cpu (the demo: a few minutes on a CPU) or real-cpu "
                           "(a small set of real galaxies, 10 minutes on a CPU); explicit flags win"),
    "seed": ("--seed", "seed for weights, shuffling, augmentation and dropout"),
    "device": ("--device", "auto, cpu or cuda; auto picks cuda when available"),
    "precision": ("--precision", "auto, fp32 or bf16: bfloat16 autocast for training and validation; auto "
                                 "uses it on CUDA and on CPUs that compute it natively (AVX512-BF16, AMX)"),
    "workers": ("--workers", "threads decoding images into the cache"),
    "no_augment": ("--no-augment", "train on the images as they are (the same as --augment none)"),
    "no_dropout": ("--no-dropout", "train without dropout"),
    "sync_bn": ("--sync-bn", "under torchrun on GPUs, BatchNorm statistics over all processes' "
                             "batches (SyncBatchNorm); ignored in one process"),
    "resume": ("--resume", "continue from <model stem>.resume.pth"),
    "init_from": ("--init-from", "start from the weights of this checkpoint (cnn.py's or the original "
                                 "project's) with a fresh optimiser"),
    "compile": ("--compile", "torch.compile the model (slow to start, faster steps)"),
    "evaluate": ("--evaluate", "only write the evaluation report of --model-path on --val-dir"),
}
# Named sets of defaults for --preset.
PRESETS: dict[str, dict[str, Any]] = {
    # cpu: what `make demo` trains without a GPU, on the built-in sample (2,380 balanced training images).
    # 6 epochs in bfloat16 take the wall time 4 took in float32 on 2 cores (about 80 s) and reach 99.6%,
    # against 98.2% for 4 (README, "Results").
    "cpu": {"image_size": 64, "num_epochs": 6, "patience": 3},
    # real-cpu: the best measured on the 555 real galaxies of ../shared within 10 minutes of training on
    # 2 cores (README, "Results"; benchmarks/bench_real.py): 69.7% in under 3 minutes; 200 epochs or 96 px
    # did no better. Patience = epochs, so early stopping never cuts the cosine schedule short.
    "real-cpu": {"arch": "resnet18", "image_size": 64, "num_epochs": 100, "patience": 100,
                 "learning_rate": 0.0033},
}
# (preset, --arch) -> the preset's settings for that network, where its own differ: `--preset real-cpu
# --arch deepcnn5` is the real-cpu preset for DeepCNN-5Block, whose steps cost about twice resnet18's
# and which learns little at resnet18's learning rate (26.7% in bench_real.py's network sweep).
PRESET_NETWORKS: dict[tuple[str, str], dict[str, Any]] = {
    ("real-cpu", "deepcnn5"): {"num_epochs": 80, "patience": 80, "learning_rate": 0.001},
}
PRECISIONS = ("auto", "fp32", "bf16")
AUGMENTATIONS = ("original", "dihedral", "rotation", "none")


# ---------------------------------------------------------------- the training recipe


@dataclass(frozen=True)
class Recipe:
    """How the model is initialised and optimised; every checkpoint records which recipe made it.

    ``original`` is the original project's recipe exactly, kept so anyone can compare. ``default``
    departs from it only where a measurement showed it fails (README, "Why the recipe departs from the
    original"); each departure's field says what was measured.
    """

    name: str
    head_init: str  # CNNModel's head_init
    optimizer: str  # "adam" or "adamw" (decoupled weight decay)
    weight_decay: float
    lr_scale: float  # the optimiser's peak learning rate is --lr x lr_scale
    schedule: str  # "plateau": ReduceLROnPlateau on val loss; "cosine": per-step warm-up, then cosine
    warmup: float  # share of the planned steps spent warming up linearly from 0 (cosine only)
    crop: float  # the centre crop, unless --crop says otherwise
    augment: str  # one of AUGMENTATIONS, unless --augment says otherwise


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        name="default",
        # The original's N(0, 0.01) hidden layers shrink the signal ~1000x before the logits, and
        # Adam's sign-like steps then kill their ReLUs (54-77% dead measured): 28-45% val acc on the
        # built-in sample at 64 px. Kaiming init keeps the scale.
        head_init="kaiming",
        # Kaiming init with the original's Adam at 1e-3: 29% after 7 epochs (64 px sample). Warm-up and
        # cosine (below), built-in sample at 32 px, seed 0: AdamW (weight decay 0.05) at 0.3 x 1e-3,
        # 95.7% after 4 epochs; AdamW at 1e-3, 67.5%; AdamW 1e-3 with the classifier at 1e-4, 84.2%
        # after 5; Adam 1e-3 with the classifier at 1e-4, 65.2% after 3.
        optimizer="adamw",
        weight_decay=0.05,
        lr_scale=0.3,
        # A short CPU run never reaches ReduceLROnPlateau's first cut; warm-up then cosine decay
        # anneals within any epoch budget.
        schedule="cosine",
        warmup=0.1,
        # The galaxies fill the middle third of the frame (Dieleman et al. 2015 kept the central 207 of
        # 424 px). Real galaxies, resnet18, 64 px: README, "Results".
        crop=0.5,
        # A galaxy has no up or down: the 8 exact flips and quarter turns beat the original's
        # augmentations and full-circle rotation on real galaxies (README, "Results").
        augment="dihedral",
    ),
    "original": Recipe(name="original", head_init="normal", optimizer="adam", weight_decay=0.0, lr_scale=1.0,
                       schedule="plateau", warmup=0.0, crop=1.0, augment="original"),
}


def make_optimizer(
    model: nn.Module, recipe: Recipe, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=lr * recipe.lr_scale, weight_decay=recipe.weight_decay,
                     fused=device.type == "cuda")


Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int) -> Scheduler:
    """The recipe's learning-rate schedule; a cosine one is planned over ``total_steps`` optimiser steps."""
    if recipe.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=LR_FACTOR, patience=LR_PATIENCE, min_lr=MIN_LR
        )
    warmup = max(1, round(recipe.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Optimiser steps in an epoch over num_images; under torchrun each process takes an equal share."""
    return math.ceil(num_images // world_size() / batch_size)


# ---------------------------------------------------------------- checkpoints beside the run


def to_cpu(obj: Any) -> Any:
    """A CPU copy of nested state, so it can be written while training goes on changing the original."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


class CheckpointWriter:
    """Saves checkpoints on a background thread, so a 0.9 GB write does not stall the GPU."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: list[Future[None]] = []

    def save(self, payload: dict[str, Any], path: str | os.PathLike[str]) -> None:
        self._pending.append(self._pool.submit(save_checkpoint, to_cpu(payload), path))

    def wait(self) -> None:
        """Block until every write has landed; re-raises a failed write."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


# ---------------------------------------------------------------- data: folders, cache, batches


@dataclass(frozen=True)
class FolderScan:
    """Image files of a ``root/<class>/`` tree; classes are folder names in class-id order."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]


def class_folders(root: Path) -> list[Path]:
    """The class folders of root, numeric names in numeric order (``2`` before ``10``)."""
    if not root.is_dir():
        raise Galaxy10Error(
            f"{root} is not a folder: export the data with `python preprocess_and_balancing.py` "
            "or point --train-dir/--val-dir at a folder of class folders"
        )
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not folders:
        raise Galaxy10Error(f"{root} has no class folders: expected {root}/0 ... {root}/9 holding images")
    return sorted(folders, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def scan_image_folder(root: str | os.PathLike[str]) -> FolderScan:
    """Every image under root's class folders; a root without any image is an error."""
    root = Path(root)
    paths: list[Path] = []
    labels: list[int] = []
    folders = class_folders(root)
    for label, folder in enumerate(folders):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths += images
        labels += [label] * len(images)
    if not paths:
        raise Galaxy10Error(f"the class folders of {root} hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return FolderScan(root, paths, labels, [p.name for p in folders])


def class_names_for(classes: Sequence[str]) -> list[str]:
    """Galaxy10 names for class-id folders 0..9; any other folder names are their own class names."""
    if all(c.isdigit() and int(c) < len(CLASS_NAMES) for c in classes):
        return [CLASS_NAMES[int(c)] for c in classes]
    return list(classes)


def check_classes(train: FolderScan, val: FolderScan, num_classes: int) -> None:
    """Same class folders in train and val, as many as the model has outputs, none empty in train.

    An empty val class is allowed: a small split can leave a rare class out; the report shows it.
    """
    if train.classes != val.classes:
        raise Galaxy10Error(
            f"{train.root} has classes {train.classes} but {val.root} has {val.classes}: "
            "both need the same class folders"
        )
    if len(train.classes) != num_classes:
        raise Galaxy10Error(
            f"{train.root} has {len(train.classes)} class folders {train.classes}, expected {num_classes}: "
            "re-export the data or pass --num-classes"
        )
    empty = sorted(set(range(len(train.classes))) - set(train.labels))
    if empty:
        raise Galaxy10Error(
            f"class folder {train.root / train.classes[empty[0]]} has no images, so the model could never "
            "learn that class; add images or re-export the data"
        )


def read_image(path: Path, image_size: int, crop: float) -> torch.Tensor:
    """One image file as the model's uint8 input; an unreadable file is a user error naming it."""
    try:
        with Image.open(path) as image:
            return image_to_tensor(image, image_size, crop)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise Galaxy10Error(f"cannot read image {path} ({err}); replace or delete it") from None


def decode_images(paths: Sequence[Path], image_size: int, crop: float, workers: int, desc: str
                  ) -> torch.Tensor:
    """Decode every image once into a uint8 (N, 3, S, S) tensor; Pillow releases the GIL, so threads scale."""
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)

    def load(i: int) -> None:
        images[i] = read_image(paths[i], image_size, crop)

    pool = ThreadPoolExecutor(max_workers=max(workers, 1))
    try:
        for _ in tqdm(pool.map(load, range(len(paths))), total=len(paths), desc=desc, unit="img",
                      disable=not is_main_process()):
            pass
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad image or Ctrl-C, skip the rest of the queue
    return images


@dataclass
class ImageCache:
    """Decoded images and labels, on the training device or in pinned host memory."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)
    device: torch.device  # where batches are used

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def where(self) -> str:
        return f"{self.images.nbytes / 2**20:.0f} MB on {self.images.device.type}"


def place_cache(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> ImageCache:
    """Keep the cache on the GPU when it fits comfortably, else in pinned memory for async copies."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes <= GPU_CACHE_SHARE * free:
            images, labels = images.to(device), labels.to(device)
        else:
            images, labels = images.pin_memory(), labels.pin_memory()
    return ImageCache(images, labels, device)


def build_cache(
    scan: FolderScan, image_size: int, crop: float, device: torch.device, workers: int, desc: str
) -> ImageCache:
    images = decode_images(scan.paths, image_size, crop, workers, desc)
    return place_cache(images, torch.tensor(scan.labels, dtype=torch.long), device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device.type == device.type:
        return tensor
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def iterate_batches(
    cache: ImageCache, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) batches on the cache's device; when a generator is given, shuffled, and
    under torchrun only this process's share."""
    order = None
    count = len(cache)
    if generator is not None:
        order = this_process_share(torch.randperm(len(cache), generator=generator).to(cache.images.device))
        count = len(order)
    for start in range(0, count, batch_size):
        index: slice | torch.Tensor = slice(start, start + batch_size)
        if order is not None:
            index = order[index]
        yield to_device(cache.images[index], cache.device), to_device(cache.labels[index], cache.device)


# ---------------------------------------------------------------- augmentation on the device


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


# ---------------------------------------------------------------- training


def uses_bf16(precision: str, device: torch.device, arch: str) -> bool:
    """Whether --precision means bfloat16 autocast for network `arch` on this device. auto takes it on CUDA,
    and on CPUs that compute bfloat16 natively for the networks it speeds up there (2-core AMX Xeon, 64 px:
    DeepCNN-5Block 1.6x the images/s of float32; README, "Results"); elsewhere bfloat16 is emulated and
    slower, so auto stays float32."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return True
    if native_bf16(device):
        return precision == "bf16" or ARCHITECTURES[arch].cpu_bf16
    if precision == "bf16":
        raise Galaxy10Error("--precision bf16 needs a CUDA GPU or a CPU with AVX512-BF16 or AMX, which this "
                            "one lacks; use --precision fp32 (or auto)")
    return False


def mixed_precision(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast where `bf16`; float32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None,
    augmentation: str = "original",
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a uint8 batch, augmented as `augmentation` says unless generator is None;
    returns (loss, correct count) without waiting for the GPU."""
    x = to_model_input(images)
    if generator is not None:
        x = augment(x, generator, augmentation)
    x = x.contiguous(memory_format=torch.channels_last)
    with mixed_precision(images.device, bf16):
        logits = model(x)
        loss = criterion(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


@torch.inference_mode()
def predict_logits(model: nn.Module, cache: ImageCache, batch_size: int, bf16: bool = False) -> torch.Tensor:
    """fp32 logits for every cached image, in cache order."""
    model.eval()
    outputs = []
    for images, _ in iterate_batches(cache, batch_size):
        with mixed_precision(cache.device, bf16):
            outputs.append(model(to_model_input(images).contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(outputs)


@torch.inference_mode()
def predict_tta(model: nn.Module, cache: ImageCache, batch_size: int, bf16: bool = False) -> torch.Tensor:
    """Class probabilities for every cached image, averaged over its 8 flips and quarter turns; each forward
    pass takes about batch_size images, as predict_logits's do."""
    model.eval()
    outputs = []
    for images, _ in iterate_batches(cache, max(1, batch_size // 8)):
        with mixed_precision(cache.device, bf16):
            views = dihedral_views(to_model_input(images)).contiguous(memory_format=torch.channels_last)
            probs = model(views).float().softmax(1)
        outputs.append(probs.view(8, len(images), -1).mean(0))
    return torch.cat(outputs)


def evaluate(
    model: nn.Module, cache: ImageCache, criterion: nn.Module, batch_size: int, bf16: bool = False
) -> tuple[float, float]:
    """Mean loss and accuracy over the whole cache."""
    logits = predict_logits(model, cache, batch_size, bf16)
    loss = criterion(logits, cache.labels.to(logits.device)).item()
    accuracy = (logits.argmax(1).cpu() == cache.labels.cpu()).float().mean().item()
    return loss, accuracy


@dataclass
class EarlyStopping:
    """Stops after `patience` epochs whose val loss is not `min_delta` below the best so far."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, loss: float, epoch: int) -> bool:
        """Record an epoch's val loss; True when it is the new best."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def new_history() -> dict[str, list[float]]:
    return {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": [], "lr": []}


@dataclass
class Run:
    """Everything one training run holds; the fields the resume file restores are marked."""

    config: Config
    device: torch.device
    class_names: list[str]
    model: nn.Module  # restored
    forward: nn.Module  # the model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer  # restored
    scheduler: Scheduler  # restored
    criterion: nn.Module
    train: ImageCache
    val: ImageCache
    shuffle_rng: torch.Generator  # restored
    augment_rng: torch.Generator  # restored
    stopper: EarlyStopping  # restored
    bf16: bool = False  # bfloat16 autocast (--precision)
    weights: str | None = None  # what --weights started the network from
    history: dict[str, list[float]] = field(default_factory=new_history)  # restored
    epoch: int = 0  # last finished epoch; restored

    @property
    def eval_batch_size(self) -> int:
        return eval_batch_size(self.config.batch_size, self.device)


def eval_batch_size(batch_size: int, device: torch.device) -> int:
    return batch_size * EVAL_BATCH_FACTOR_GPU if device.type == "cuda" else batch_size


def finite(value: float, what: str, run: Run, epoch: int) -> float:
    """Stop with one clear line once the loss is NaN or infinite: the run has diverged."""
    if not math.isfinite(value):
        raise Galaxy10Error(
            f"{what} became {value} in epoch {epoch}: training diverged; "
            f"lower --lr (now {run.config.learning_rate}) or check the images in {run.config.train_dir}"
        )
    return value


def train_one_epoch(run: Run, epoch: int) -> tuple[float, float]:
    """One pass over the shuffled training cache; returns the epoch's mean loss and accuracy."""
    run.forward.train()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), dtype=torch.long, device=run.device)
    seen = 0
    num_batches = steps_per_epoch(len(run.train), run.config.batch_size)
    batches = iterate_batches(run.train, run.config.batch_size, run.shuffle_rng)
    desc = f"epoch {epoch}/{run.config.num_epochs}"
    bar = tqdm(batches, total=num_batches, desc=desc, unit="batch", leave=False,
               disable=not is_main_process())
    for step, (images, labels) in enumerate(bar, 1):
        loss, hits = train_step(run.forward, run.optimizer, run.criterion, images, labels, run.augment_rng,
                                run.config.augment, run.bf16)
        if not isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            run.scheduler.step()
        loss_sum += loss * len(labels)
        correct += hits
        seen += len(labels)
        if step % LOG_EVERY == 0 or step == num_batches:
            mean_loss = finite(loss_sum.item() / seen, "the training loss", run, epoch)
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{correct.item() / seen:.1%}")
    bar.close()
    loss_total, hits_total, seen_total = sum_over_processes([loss_sum, correct, seen], run.device)
    return loss_total / seen_total, hits_total / seen_total


def make_run(
    config: Config, device: torch.device, class_names: list[str], train: ImageCache, val: ImageCache
) -> Run:
    """A fresh model (from --weights where given), optimiser and schedule for config; seeded, so the same seed
    gives the same run."""
    config = config.settle()
    torch.manual_seed(config.seed)
    recipe = RECIPES[config.recipe]
    model = build_model(config.arch, len(class_names), config.image_size, head_init=recipe.head_init)
    weights = load_pretrained(model, config.arch, config.weights) if config.weights else None
    print_model_summary(model, config.image_size)
    model = model.to(device, memory_format=torch.channels_last)
    if config.no_dropout:
        switch_off_dropout(model)
    if config.sync_bn and world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_dropout_per_process(config.seed)
    forward = data_parallel(model)
    optimizer = make_optimizer(model, recipe, config.learning_rate, device)
    total_steps = config.num_epochs * steps_per_epoch(len(train), config.batch_size)
    return Run(
        config=config,
        device=device,
        class_names=class_names,
        model=model,
        forward=torch.compile(forward) if config.compile else forward,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, recipe, total_steps),
        criterion=nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING),
        train=train,
        val=val,
        shuffle_rng=torch.Generator().manual_seed(config.seed),
        augment_rng=torch.Generator(device).manual_seed(config.seed + 1 + RANK_SEED_STRIDE * rank()),
        stopper=EarlyStopping(config.patience, config.min_delta),
        bf16=uses_bf16(config.precision, device, config.arch),
        weights=weights,
    )


def print_model_summary(model: nn.Module, image_size: int) -> None:
    """torchsummary's table, computed on CPU in eval mode so it changes no BatchNorm statistics."""
    model.eval()
    summary(model, (3, image_size, image_size), device="cpu")


def switch_off_dropout(model: nn.Module) -> None:
    """--no-dropout: every Dropout layer passes its input through."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def rng_state(run: Run) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "shuffle": run.shuffle_rng.get_state(),
             "augment": run.augment_rng.get_state(), "device_type": run.device.type}
    if run.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(run: Run, state: dict[str, Any]) -> None:
    """Restore the random streams; the device's streams only when resuming on the same kind of device."""
    torch.set_rng_state(state["torch"])
    run.shuffle_rng.set_state(state["shuffle"])
    if state["device_type"] == run.device.type:
        run.augment_rng.set_state(state["augment"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])


def run_record(run: Run) -> dict[str, Any]:
    """What a checkpoint of this run says of it: the network, its preprocessing and classes (inference
    rebuilds the model from these), the starting weights, the recipe and every setting."""
    config = run.config
    return {
        **checkpoint_metadata(config.image_size, run.class_names, config.arch, config.crop),
        "weights": run.weights,
        "recipe": config.recipe,
        "config": dataclasses.asdict(config),
    }


def best_payload(run: Run, epoch: int) -> dict[str, Any]:
    """The model checkpoint: the original keys plus what inference and reproduction need."""
    return {
        **run_record(run),
        "epoch": epoch,
        "best_epoch": epoch,
        "model_state_dict": run.model.state_dict(),
        "optimizer_state_dict": run.optimizer.state_dict(),
        "train_history": run.history,
        "final_val_loss": run.history["val_loss"][epoch - 1],
        "final_val_acc": run.history["val_acc"][epoch - 1],
    }


def resume_payload(run: Run) -> dict[str, Any]:
    """Everything needed to continue after the last finished epoch as if never stopped."""
    return {
        **run_record(run),
        "epoch": run.epoch,
        "model_state_dict": run.model.state_dict(),
        "optimizer_state_dict": run.optimizer.state_dict(),
        "scheduler_state_dict": run.scheduler.state_dict(),
        "early_stopping": dataclasses.asdict(run.stopper),
        "train_history": run.history,
        "rng": rng_state(run),
        **rng_states_of_every_process(run),
    }


def load_resume_state(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    path = resume_path(model_path)
    if not path.is_file():
        raise Galaxy10Error(f"--resume: {path} not found; it is written after each epoch and removed when "
                            "a run finishes, so start without --resume (or check --model-path)")
    return load_checkpoint(path)  # on CPU: RNG states must stay there


def restore(run: Run, state: dict[str, Any]) -> None:
    """Continue from a resume file written by the same kind of run."""
    if state["image_size"] != run.config.image_size or state["class_names"] != run.class_names:
        raise Galaxy10Error(
            f"the resume file is for {state['image_size']} px images of classes {state['class_names']}, "
            f"not {run.config.image_size} px of {run.class_names}; use the interrupted run's settings"
        )
    if checkpoint_recipe(state) != run.config.recipe:
        raise Galaxy10Error(f"the resume file was trained with --recipe {checkpoint_recipe(state)}, not "
                            f"{run.config.recipe}; use the interrupted run's settings")
    arch, crop = checkpoint_architecture(state), checkpoint_crop(state)
    if arch.name != run.config.arch or crop != run.config.crop:
        raise Galaxy10Error(f"the resume file is of --arch {arch.name} with --crop {crop:g}, not --arch "
                            f"{run.config.arch} with --crop {run.config.crop:g}; use the interrupted run's "
                            "settings")
    run.model.load_state_dict(state["model_state_dict"])
    run.optimizer.load_state_dict(state["optimizer_state_dict"])
    run.scheduler.load_state_dict(state["scheduler_state_dict"])
    saved = state["early_stopping"]
    run.stopper = EarlyStopping(run.config.patience, run.config.min_delta, saved["best_loss"],
                                saved["best_epoch"], saved["bad_epochs"])
    run.history = state["train_history"]
    run.epoch = state["epoch"]
    restore_rng_of_this_process(run, state)


def epoch_line(run: Run, epoch: int, seconds: float, improved: bool) -> str:
    h = run.history
    return (
        f"epoch {epoch}/{run.config.num_epochs}  "
        f"train loss {h['train_loss'][-1]:.4f} acc {h['train_acc'][-1]:.2%}  "
        f"val loss {h['val_loss'][-1]:.4f} acc {h['val_acc'][-1]:.2%}  "
        f"lr {h['lr'][-1]:.2e}  patience {run.stopper.bad_epochs}/{run.stopper.patience}  "
        f"{seconds:.0f}s" + ("  * saved best" if improved else "")
    )


def run_epoch(run: Run, epoch: int, writer: CheckpointWriter) -> None:
    """Train, validate, schedule, keep the best checkpoint and the resume state, print one line."""
    started = time.perf_counter()
    train_loss, train_acc = train_one_epoch(run, epoch)
    lr = run.optimizer.param_groups[0]["lr"]  # where a per-step schedule left it; the plateau's is unchanged
    val_loss, val_acc = validate(run)
    finite(val_loss, "the validation loss", run, epoch)
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(val_loss)
    record = {"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
              "lr": lr}
    for key, value in record.items():
        run.history[key].append(value)
    run.epoch = epoch
    improved = run.stopper.update(val_loss, epoch)
    resume = resume_payload(run)  # on every process: it gathers each one's random streams
    if not is_main_process():
        return
    writer.wait()  # one write in flight at a time bounds the host memory the snapshots take
    if improved:
        writer.save(best_payload(run, epoch), run.config.model_path)
    writer.save(resume, resume_path(run.config.model_path))
    write_history(run.history, run.config.model_path)
    print(epoch_line(run, epoch, time.perf_counter() - started, improved), flush=True)


def resume_command(config: Config) -> str:
    """The command line that continues this run: every non-default setting, plus --resume."""
    defaults = Config()
    words = ["cnn.py"]
    for name, (flag, _) in FLAGS.items():
        value = getattr(config, name)
        if name in ("resume", "evaluate") or value == getattr(defaults, name):
            continue
        words += [flag] if isinstance(value, bool) else [flag, str(value)]
    return f"{launcher()} {shlex.join([*words, '--resume'])}"


def launcher() -> str:
    """How this process was started: python, or torchrun with this run's process counts (on several
    machines with a placeholder for the rendezvous flags, which the processes cannot see)."""
    if not launched_by_torchrun():
        return "python"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nodes = int(os.environ["WORLD_SIZE"]) // per_node
    where = "--standalone" if nodes == 1 else f"--nnodes {nodes} <the same rendezvous flags>"
    return f"torchrun {where} --nproc_per_node {per_node}"


def train_epochs(run: Run) -> None:
    """Epochs until the configured count or early stopping; Ctrl-C keeps the last finished epoch."""
    writer = CheckpointWriter()
    epoch = run.epoch + 1
    try:
        for epoch in range(run.epoch + 1, run.config.num_epochs + 1):
            run_epoch(run, epoch, writer)
            if run.stopper.should_stop:
                print(f"early stopping: val loss has not improved for {run.stopper.patience} epochs")
                break
    except KeyboardInterrupt:
        writer.close()  # the resume file named below must be complete
        if run.epoch and is_main_process():
            print(f"\ninterrupted in epoch {epoch}; epochs 1-{run.epoch} are saved in "
                  f"{resume_path(run.config.model_path)}. Continue with:\n  {resume_command(run.config)}",
                  file=sys.stderr)
        raise
    finally:
        writer.close()


def finish_checkpoint(run: Run) -> dict[str, Any]:
    """Give the best checkpoint the whole history, drop the resume file, load the best weights back."""
    best = load_checkpoint(run.config.model_path)
    best["train_history"] = run.history
    best["epochs_trained"] = run.epoch
    save_checkpoint(best, run.config.model_path)
    resume_path(run.config.model_path).unlink(missing_ok=True)
    run.model.load_state_dict(best["model_state_dict"])
    return best


def initial_weights(config: Config, class_names: list[str]) -> dict[str, torch.Tensor] | None:
    """--init-from's weights, checked against the run before any image is decoded; a resumed run
    continues from its own weights instead."""
    if not config.init_from or config.resume:
        return None
    checkpoint = load_checkpoint(config.init_from, mmap=True)
    arch = checkpoint_architecture(checkpoint)
    if arch.name != config.arch:
        raise Galaxy10Error(f"--init-from: {config.init_from} is a {arch.title}; pass --arch {arch.name}")
    if checkpoint["image_size"] != config.image_size:
        raise Galaxy10Error(f"--init-from: {config.init_from} was trained at {checkpoint['image_size']} px; "
                            f"pass --image-size {checkpoint['image_size']}")
    if checkpoint["class_names"] != class_names:
        raise Galaxy10Error(f"--init-from: {config.init_from} was trained on the classes "
                            f"{checkpoint['class_names']}, not {class_names}; "
                            "train on data with the same class folders")
    return checkpoint["model_state_dict"]


def training_device(name: str) -> torch.device:
    """The device to train on; on CUDA with the fast kernels: cuDNN autotuning for the fixed batch shapes,
    TF32 matrix products (training runs under bf16 autocast there anyway)."""
    device = select_device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return device


def fit(config: Config) -> dict[str, Any]:
    """Train as configured; returns the evaluation report of the best epoch on the val set."""
    device = training_device(config.device)
    precision = "bf16" if uses_bf16(config.precision, device, config.arch) else "fp32"
    config = dataclasses.replace(config.settle(), precision=precision)  # the checkpoint records what ran
    train_scan, val_scan = scan_image_folder(config.train_dir), scan_image_folder(config.val_dir)
    check_classes(train_scan, val_scan, config.num_classes)
    check_images_per_process(train_scan, val_scan)
    class_names = class_names_for(train_scan.classes)
    initial = initial_weights(config, class_names)
    train = build_cache(train_scan, config.image_size, config.crop, device, config.workers, "decoding train")
    val = build_cache(val_scan, config.image_size, config.crop, device, config.workers, "decoding val")
    print(f"train {len(train)} images ({train.where}), val {len(val)} images ({val.where}), "
          f"{len(class_names)} classes, device {device.type}, {precision}, {config.arch}, "
          f"crop {config.crop:g}, augmentation {config.augment}")
    run = make_run(config, device, class_names, train, val)
    if config.resume:
        restore(run, load_resume_state(config.model_path))
        print(f"resuming after epoch {run.epoch} of {config.num_epochs}")
    elif initial is not None:
        run.model.load_state_dict(initial)
        print(f"starting from the weights of {config.init_from}")
    started, first_epoch = time.perf_counter(), run.epoch
    try:
        train_epochs(run)
    finally:
        if run.history["val_loss"] and is_main_process():
            write_curves(run.history, run.stopper.best_epoch, config.model_path)
    if not is_main_process():
        return from_main_process(None)  # the report, once rank 0 has written it
    # Training and validation time of this run's epochs, and training images per second over them (each
    # epoch takes the whole training set, shared among the processes under torchrun).
    seconds = time.perf_counter() - started
    best = finish_checkpoint(run)
    context = {"epoch": best["best_epoch"], "val_dir": config.val_dir, "recipe": config.recipe,
               "train_seconds": seconds,
               "train_images_per_s": len(train) * (run.epoch - first_epoch) / seconds}
    report = write_evaluation(run.model, val, class_names, config.model_path, run.eval_batch_size, context,
                              run.bf16)
    return from_main_process(report)


# ---------------------------------------------------------------- several processes (torchrun)


@contextlib.contextmanager
def distributed(config: Config) -> Iterator[None]:
    """Under torchrun, join the other processes (NCCL on CUDA, one GPU each by LOCAL_RANK; gloo on CPU)
    and silence stdout on all but rank 0. A single process is left as it is."""
    if not launched_by_torchrun():
        yield
        return
    if select_device(config.device).type == "cuda":
        join_process_group("nccl", use_local_gpu())
    elif config.sync_bn:
        raise Galaxy10Error("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); "
                            "drop it on CPU")
    else:
        join_process_group("gloo")
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if rank() else sys.stdout):
            print(f"{world_size()} processes ({dist.get_backend()}), {world_size()} x {config.batch_size} "
                  "images per step")
            yield
    finally:
        dist.destroy_process_group()


def resume_after_restart(config: Config) -> Config:
    """When torchrun restarts the processes (--max-restarts) after one died, continue from the resume file
    the failed attempt left; without one (it died in its first epoch) start again. Rank 0 looks, so all
    processes agree."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restarts or config.resume or not from_main_process(resume_path(config.model_path).is_file()):
        return config
    print(f"torchrun restart {restarts}: continuing from {resume_path(config.model_path)}")
    return dataclasses.replace(config, resume=True)


def check_images_per_process(train: FolderScan, val: FolderScan) -> None:
    """Every process needs at least one training and one validation image."""
    for scan in (train, val):
        if len(scan.paths) < world_size():
            raise Galaxy10Error(f"{scan.root} has {len(scan.paths)} images, fewer than the {world_size()} "
                                "processes; start fewer with torchrun --nproc_per_node")


def this_process_share(order: torch.Tensor) -> torch.Tensor:
    """Rank r's part order[r::N] of an order every process drew alike, cut to len(order) // N so that all
    take the same number of steps, as DDP needs; the up to N - 1 images left over sit the epoch out (the
    next epoch's permutation leaves out others). One process keeps the whole order."""
    n = world_size()
    return order[rank()::n][: len(order) // n]


def this_process_part(cache: ImageCache) -> ImageCache:
    """This process's contiguous part of an evaluation cache; parts differ in size by at most one."""
    n, r = world_size(), rank()
    return ImageCache(cache.images.tensor_split(n)[r], cache.labels.tensor_split(n)[r], cache.device)


def sum_over_processes(values: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
    """Each value summed over the processes (in float64, so counts stay exact), the same on every one."""
    totals = [float(value) for value in values]
    if world_size() == 1:
        return totals
    tensor = torch.tensor(totals, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics to every process: DDP sends them before each training step,
    so after the last one each process holds its own."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def validate(run: Run) -> tuple[float, float]:
    """Val loss and accuracy of the model rank 0 saves, the same numbers on every process, so all take the
    same schedule and early-stopping decisions. Under torchrun each process evaluates its part of val
    (validation time shrinks with the process count like training time) and the sums are added up."""
    if world_size() == 1:
        return evaluate(run.forward, run.val, run.criterion, run.eval_batch_size, run.bf16)
    broadcast_buffers(run.model)
    part = this_process_part(run.val)
    loss, accuracy = evaluate(run.forward, part, run.criterion, run.eval_batch_size, run.bf16)
    loss_sum, hits, count = sum_over_processes([loss * len(part), round(accuracy * len(part)), len(part)],
                                               run.device)
    return loss_sum / count, hits / count


def seed_dropout_per_process(seed: int) -> None:
    """Under torchrun, give each process its own dropout masks (torch's global stream) once the model,
    which starts the same everywhere, is built. One process keeps the stream it has."""
    if world_size() > 1:
        torch.manual_seed(seed + 2 + RANK_SEED_STRIDE * rank())


def data_parallel(model: nn.Module) -> nn.Module:
    """Under torchrun, the model in DistributedDataParallel, which starts every process from rank 0's
    weights and averages the gradients; in one process the model itself."""
    if world_size() == 1:
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def rng_states_of_every_process(run: Run) -> dict[str, Any]:
    """Under torchrun, each process's random streams (augmentation and dropout differ per process) for the
    resume file rank 0 writes; nothing more in one process."""
    if world_size() == 1:
        return {}
    states: list[Any] = [None] * world_size()
    dist.all_gather_object(states, rng_state(run))
    return {"rng_per_process": states}


def restore_rng_of_this_process(run: Run, state: dict[str, Any]) -> None:
    """This process's random streams from a resume file. Written by as many processes as run now, each
    continues its own; by another count, only the shuffling (the same in all) continues, and augmentation
    and dropout keep this run's fresh streams: the processes' shares of the data differ anyway."""
    states = state.get("rng_per_process", [state["rng"]])
    if len(states) == world_size():
        set_rng_state(run, states[rank()])
        return
    run.shuffle_rng.set_state(state["rng"]["shuffle"])
    print(f"the resume file holds the random streams of {len(states)} process(es), not {world_size()}: "
          "augmentation and dropout continue with fresh ones")


# ---------------------------------------------------------------- reports


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins (lo, hi] of |bin| / n * |accuracy - mean confidence|."""
    confidence = y_prob.max(1)
    correct = (y_prob.argmax(1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, confidence, n_bins)
    return float(np.abs(gap).sum() / len(y_true))


def evaluation_report(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix and ECE."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    y_pred = y_prob.argmax(1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "n_samples": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1.mean()),
        "ece": expected_calibration_error(y_true, y_prob),
        "ece_bins": ECE_BINS,
        "class_names": list(class_names),
        "per_class": [
            {"class_id": i, "class_name": name, "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        ],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def write_json(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_history(history: dict[str, list[float]], model_path: str | os.PathLike[str]) -> None:
    write_json(history, output_path(model_path, "history.json"))


def save_figure(figure: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_curves(
    history: dict[str, list[float]], best_epoch: int, model_path: str | os.PathLike[str]
) -> None:
    """Loss and accuracy against epoch, train and val, the best epoch marked."""
    from matplotlib.figure import Figure  # the object API renders with Agg and touches no global backend

    figure = Figure(figsize=(11, 4))
    epochs = range(1, len(history["val_loss"]) + 1)
    for ax, metric in zip(figure.subplots(1, 2), ("loss", "acc"), strict=True):
        ax.plot(epochs, history[f"train_{metric}"], marker=".", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker=".", label="val")
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
        ax.set(xlabel="epoch", ylabel="accuracy" if metric == "acc" else "loss")
        ax.legend()
    save_figure(figure, output_path(model_path, "curves.png"))


def write_confusion(report: dict[str, Any], model_path: str | os.PathLike[str]) -> None:
    """The confusion matrix as an annotated heat map, rows true class, columns predicted."""
    from matplotlib.figure import Figure

    matrix = np.array(report["confusion_matrix"])
    k = len(matrix)
    figure = Figure(figsize=(2 + 0.8 * k, 1.5 + 0.7 * k))
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    ticks = range(k)
    ax.set_xticks(ticks, report["class_names"], rotation=45, ha="right")
    ax.set_yticks(ticks, report["class_names"])
    title = f"accuracy {report['accuracy']:.1%} (n={report['n_samples']})"
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    save_figure(figure, output_path(model_path, "confusion.png"))


def write_evaluation(
    model: nn.Module, val: ImageCache, class_names: list[str], model_path: str | os.PathLike[str],
    batch_size: int, context: dict[str, Any], bf16: bool = False,
) -> dict[str, Any]:
    """Evaluate model on the val cache, write the report JSON and confusion PNG, print a summary. The report
    also scores test-time augmentation: probabilities averaged over the 8 flips and quarter turns, as
    cnn_use_model's --tta computes them."""
    truth = val.labels.cpu().numpy()
    probs = predict_logits(model, val, batch_size, bf16).softmax(1).cpu().numpy()
    tta = predict_tta(model, val, batch_size, bf16).cpu().numpy()
    tta_report = evaluation_report(truth, tta, class_names)
    report = {"checkpoint": str(model_path), **context, **evaluation_report(truth, probs, class_names),
              "tta": {"accuracy": tta_report["accuracy"], "macro_f1": tta_report["macro_f1"]}}
    write_json(report, output_path(model_path, "report.json"))
    write_confusion(report, model_path)
    worst = min(report["per_class"], key=lambda c: c["f1"])
    print(f"evaluation on {report['n_samples']} val images: accuracy {report['accuracy']:.2%} (with TTA "
          f"{report['tta']['accuracy']:.2%}), macro-F1 {report['macro_f1']:.3f}, ECE {report['ece']:.3f}; "
          f"weakest class {worst['class_name']} (F1 {worst['f1']:.3f}); report in "
          f"{output_path(model_path, 'report.json')}")
    return report


def evaluate_checkpoint(config: Config) -> dict[str, Any]:
    """--evaluate: the report of an existing checkpoint on config.val_dir, at the checkpoint's image size."""
    device = select_device(config.device)
    checkpoint = load_checkpoint(config.model_path)
    scan = scan_image_folder(config.val_dir)
    class_names = class_names_for(scan.classes)
    if class_names != checkpoint["class_names"]:
        raise Galaxy10Error(
            f"{config.val_dir} has classes {class_names} but {config.model_path} was trained on "
            f"{checkpoint['class_names']}; point --val-dir at data with the same class folders"
        )
    model = model_from_checkpoint(checkpoint).to(device, memory_format=torch.channels_last)
    val = build_cache(scan, checkpoint["image_size"], checkpoint_crop(checkpoint), device, config.workers,
                      "decoding val")
    context = {"epoch": checkpoint.get("best_epoch", checkpoint.get("epoch")), "val_dir": config.val_dir,
               "recipe": checkpoint_recipe(checkpoint)}
    return write_evaluation(model, val, class_names, config.model_path,
                            eval_batch_size(config.batch_size, device), context,
                            uses_bf16(config.precision, device, checkpoint_architecture(checkpoint).name))


# ---------------------------------------------------------------- command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default except an empty one (an unset path or preset) or one the recipe decides."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in ("", None) else super()._get_help_string(action)


# The flags whose default (None: the recipe's) does not give their type.
FLAG_TYPES: dict[str, type] = {"crop": float, "augment": str}


def parse_config(argv: Sequence[str] | None) -> Config:
    """The flags as a Config; a --preset replaces the defaults, so flags given explicitly still win."""
    parser = argparse.ArgumentParser(
        description="Train DeepCNN-5Block (or another --arch) on class folders of galaxy images, or "
                    "--evaluate a checkpoint.",
        formatter_class=HelpFormatter,
    )
    for f in dataclasses.fields(Config):
        flag, help_text = FLAGS[f.name]
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=FLAG_TYPES.get(f.name, type(f.default)),
                                default=f.default, help=help_text, metavar=flag[2:].upper(),
                                choices=DEVICES if f.name == "device" else None)
    preset = parser.parse_args(argv).preset
    if preset:
        if preset not in PRESETS:
            raise Galaxy10Error(f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        parser.set_defaults(**PRESETS[preset])
        # The preset's settings for the network the command line chose, where they differ.
        parser.set_defaults(**PRESET_NETWORKS.get((preset, parser.parse_args(argv).arch), {}))
    return Config(**vars(parser.parse_args(argv)))


def check_config(config: Config) -> None:
    """Settings that would otherwise fail deep inside PyTorch with a traceback."""
    if config.recipe not in RECIPES:
        raise Galaxy10Error(f"unknown --recipe {config.recipe!r}; choose one of: {', '.join(RECIPES)}")
    architecture(config.arch)  # an unknown name is one line listing the choices
    for name, choices in (("augment", AUGMENTATIONS), ("precision", PRECISIONS)):
        value = getattr(config, name)
        if value is not None and value not in choices:
            raise Galaxy10Error(f"unknown {FLAGS[name][0]} {value!r}; choose one of: {', '.join(choices)}")
    if config.crop is not None:
        check_crop(config.crop)
    if config.weights and not ARCHITECTURES[config.arch].torchvision:
        raise Galaxy10Error(f"--weights starts a torchvision network: add --arch (one of "
                            f"{', '.join(a for a in ARCHITECTURES if a != DEFAULT_ARCH)}); DeepCNN-5Block "
                            "starts from a checkpoint with --init-from")
    if config.image_size < 32 or config.image_size % 32:
        raise Galaxy10Error(f"--image-size must be a positive multiple of 32 (the model halves it 5 times), "
                            f"not {config.image_size}")
    for name in ("batch_size", "num_epochs", "num_classes", "patience"):
        if getattr(config, name) < 1:
            raise Galaxy10Error(f"{FLAGS[name][0]} must be at least 1, not {getattr(config, name)}")
    if not config.learning_rate > 0 or config.min_delta < 0:
        raise Galaxy10Error("--lr must be positive and --min-delta not negative")
    if config.evaluate and launched_by_torchrun():
        raise Galaxy10Error("--evaluate runs in one process: use `python cnn.py --evaluate`, not torchrun")


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    check_config(config)
    if config.evaluate:
        evaluate_checkpoint(config)
    else:
        with distributed(config):
            fit(resume_after_restart(config))


if __name__ == "__main__":
    sys.exit(run_cli(main))
