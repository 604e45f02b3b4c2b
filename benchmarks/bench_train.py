"""Training throughput: cnn.py's tensor-cache pipeline, in float32 and bfloat16 for every --arch, against
the original PIL/DataLoader pipeline.

    python benchmarks/bench_train.py                              # 17,736 images at 256 px (GPU sizes)
    python benchmarks/bench_train.py --n 400 --image-size 64 --steps 20 --warmup 3   # a CPU-sized run
    python benchmarks/bench_train.py --archs deepcnn5 --n 400 --image-size 64 --steps 20 --warmup 3

All train with batch 32 on the same synthetic balanced set of PNG files (written to a temporary folder,
deleted afterwards), for a fixed number of steps after a warm-up: (a) cnn.py: images decoded once into
a uint8 cache on the device, batches sliced from it and augmented there (the default recipe's
dihedral augmentation), the default recipe's optimiser and per-step schedule, channels_last, cuDNN
autotuning on CUDA, each network once in float32 and once under bfloat16 autocast, alternating over
--rounds so that the ratio compares like with like; (b) the original DeepCNN-5Block pipeline:
torchvision ImageFolder with PIL transforms, DataLoader with 2 workers, fp32.
Target on one H100: (a) >= 4000 images/s and >= 10x (b). Figures go to stdout and, one row per
network and size, to benchmarks/results/bench_train.json (`make results` renders it).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import datasets, transforms
from tqdm import tqdm

from galaxy10.config import RECIPES, Config
from galaxy10.data import ImageCache, build_cache, iterate_batches, scan_image_folder
from galaxy10.dataset import CLASS_NAMES
from galaxy10.distributed import (
    DEVICES,
    native_bf16,
)
from galaxy10.errors import Galaxy10Error, run_cli
from galaxy10.fitting import training_device
from galaxy10.networks import ARCHITECTURES, CNNModel, build_model
from galaxy10.preprocessing import Preprocessing
from galaxy10.training import MAX_GRAD_NORM, make_optimizer, make_scheduler, train_step

import record

COLUMNS = [
    {"key": "fp32_images_per_s", "label": "float32 images/s", "format": ".1f"},
    {"key": "bf16_images_per_s", "label": "bfloat16 images/s", "format": ".1f"},
    {"key": "ratio", "label": "bf16 / fp32", "format": ".2f"},
    {"key": "vs_original", "label": "best / original pipeline", "format": ".2f"},
]


def write_image(task: tuple[Path, int, int, int]) -> None:
    """One noisy PNG whose colour and blob size depend on its class, so decoding costs what real ones do."""
    path, label, index, size = task
    rng = np.random.default_rng([label, index])
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    blob = np.exp(-(xx**2 + yy**2) / (0.01 + 0.004 * label))
    colour = np.array([0.5 + 0.05 * label, 0.6, 1.0 - 0.05 * label])
    pixels = 20 + 200 * blob[..., None] * colour + rng.normal(0, 8, (size, size, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def write_balanced_set(root: Path, n: int, image_size: int, workers: int) -> None:
    """root/<class id>/img_<i>.png, n // 10 images per class."""
    tasks = []
    for label in range(len(CLASS_NAMES)):
        (root / str(label)).mkdir(parents=True)
        tasks += [(root / str(label) / f"img_{i:05d}.png", label, i, image_size)
                  for i in range(n // len(CLASS_NAMES))]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in tqdm(pool.map(write_image, tasks, chunksize=64), total=len(tasks), desc="writing PNGs"):
            pass


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(step: Callable[[], None], warmup: int, steps: int, batch_size: int, device: torch.device,
                 desc: str) -> float:
    """Steady-state training images/s: `steps` timed steps after `warmup` untimed ones."""
    for _ in tqdm(range(warmup), desc=f"{desc} warm-up", leave=False):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def forever(batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches epoch after epoch, so any step count works on a small set."""
    while True:
        yield from batches()


def build_train_cache(root: Path, args: argparse.Namespace) -> tuple[ImageCache, float]:
    """(a)'s uint8 cache on the device, and the seconds it took to decode."""
    device = training_device(args.device)
    start = time.perf_counter()
    scan = scan_image_folder(root)
    cache = build_cache(scan, Preprocessing(args.image_size), device, args.workers, "decoding")
    return cache, time.perf_counter() - start


def bench_pipeline(cache: ImageCache, arch: str, bf16: bool, args: argparse.Namespace) -> float:
    """(a) cnn.py's path for one network and precision: the cache, device-side augmentation (the default
    recipe's), channels_last, bfloat16 autocast or float32; training images/s."""
    device = cache.device
    torch.manual_seed(0)
    recipe = RECIPES["default"]
    model = build_model(arch, len(CLASS_NAMES), args.image_size, head_init=recipe.head_init)
    model = model.to(device, memory_format=torch.channels_last)
    forward = torch.compile(model) if args.compile else model
    forward.train()
    optimizer = make_optimizer(model, recipe, Config.learning_rate, device)
    scheduler = make_scheduler(optimizer, recipe, args.warmup + args.steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=Config().label_smoothing)
    shuffle, augment = torch.Generator().manual_seed(0), torch.Generator(device).manual_seed(1)
    batches = forever(lambda: iterate_batches(cache, args.batch_size, shuffle))

    def step() -> None:
        train_step(forward, optimizer, criterion, *next(batches), augment, recipe.augment, bf16)
        scheduler.step()

    precision = "bf16" if bf16 else "fp32"
    return images_per_s(step, args.warmup, args.steps, args.batch_size, device, f"{arch} {precision}")


def bench_precisions(cache: ImageCache, arch: str, args: argparse.Namespace) -> dict[str, float]:
    """float32 against bfloat16 for one network, alternating `rounds` times so that a machine that speeds
    up or slows down during the run favours neither; the best round of each."""
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for precision in rates:
            rates[precision].append(bench_pipeline(cache, arch, precision == "bf16", args))
    best = {precision: max(values) for precision, values in rates.items()}
    return {**best, "ratio": best["bf16"] / best["fp32"], "rounds": rates}


def original_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.RandomHorizontalFlip(0.5),
        transforms.RandomRotation(15),
        transforms.ColorJitter(brightness=0.2, contrast=0.2),
        transforms.RandomAffine(degrees=0, translate=(0.1, 0.1)),
        transforms.RandomPerspective(distortion_scale=0.2, p=0.3),
        transforms.ToTensor(),
    ])


def bench_original(root: Path, args: argparse.Namespace) -> float:
    """(b) the original: ImageFolder + PIL transforms, DataLoader(2 workers, pinned), fp32, default cuDNN."""
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dataset = datasets.ImageFolder(str(root), transform=original_transform(args.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=2,
                                         pin_memory=device.type == "cuda", persistent_workers=True)
    torch.manual_seed(0)
    model = CNNModel(len(CLASS_NAMES), args.image_size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=Config().label_smoothing)
    batches = forever(lambda: iter(loader))

    def step() -> None:
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()

    return images_per_s(step, args.warmup, args.steps, args.batch_size, device, "original pipeline")


def device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=17736, help="images in the synthetic set (default: 17736)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps (default: 100)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto picks cuda when available (default: auto)")
    parser.add_argument("--workers", type=int, default=cpus,
                        help=f"processes writing, threads decoding the PNGs (default: the CPU count, {cpus})")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model in (a) (default: off)")
    parser.add_argument("--archs", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES),
                        help="networks for (a), each in float32 and bfloat16 (default: all)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating float32/bfloat16 measurements per network (default: 2)")
    args = parser.parse_args(argv)
    if args.n < len(CLASS_NAMES) or args.image_size % 32 or args.steps < 1:
        raise Galaxy10Error("--n must be >= 10, --image-size a multiple of 32 and --steps >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train-") as folder:
        root = Path(folder) / "train"
        write_balanced_set(root, args.n, args.image_size, args.workers)
        original = bench_original(root, args)
        cache, cache_s = build_train_cache(root, args)
        pipelines = {arch: bench_precisions(cache, arch, args) for arch in args.archs}
    device = cache.device
    result = {
        "device": device_name(args.device), "native_bf16": native_bf16(device), "n": args.n,
        "image_size": args.image_size, "batch_size": args.batch_size, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "rounds": args.rounds, "compile": args.compile, "torch": torch.__version__,
        "cache_build_s": cache_s, "cache_mb": cache.images.nbytes / 2**20, "cache_device": device.type,
        "pipelines": pipelines, "original_images_per_s": original,
    }
    rows = [
        ("device", f"{result['device']} (native bfloat16: {result['native_bf16']})"),
        ("images x size", f"{args.n} x {args.image_size} px"),
        ("batch, timed steps", f"{args.batch_size}, {args.steps} (after {args.warmup}), best of "
                               f"{args.rounds}"),
        ("(a) cache build (s)", f"{cache_s:.1f}"),
        ("(a) cache", f"{result['cache_mb']:.0f} MB on {device.type}"),
        ("(b) original images/s", f"{original:.1f} (DeepCNN-5Block, float32)"),
        *((f"(a) {arch} images/s",
           f"fp32 {rates['fp32']:.1f}, bf16 {rates['bf16']:.1f}: {rates['ratio']:.2f}x")
          for arch, rates in pipelines.items()),
    ]
    if "deepcnn5" in pipelines:
        best = max(pipelines["deepcnn5"]["fp32"], pipelines["deepcnn5"]["bf16"])
        rows.append(("(a) DeepCNN-5Block / (b)", f"{best / original:.2f}x"))
    print()
    for name, value in rows:
        print(f"{name:<28}{value:>60}")
    cmd, where = record.command(__file__, argv), f"{args.image_size} px, {device.type}"
    result_rows = []
    for arch, rates in pipelines.items():
        metrics = {"fp32_images_per_s": rates["fp32"], "bf16_images_per_s": rates["bf16"],
                   "ratio": rates["ratio"]}
        if arch == "deepcnn5":
            metrics["vs_original"] = max(rates["fp32"], rates["bf16"]) / original
        result_rows.append(record.row(f"{arch} ({where})", cmd, metrics))
    result_rows.append(record.row(f"original ImageFolder/PIL pipeline ({where})", cmd,
                                  {"fp32_images_per_s": original}))
    record.write("bench_train", result_rows, title="Training throughput", columns=COLUMNS, last_run=result)


if __name__ == "__main__":
    sys.exit(run_cli(main))
