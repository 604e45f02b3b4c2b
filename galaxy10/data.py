"""Training data: class folders of images (`scan_image_folder`), their class names, and the cache every image
is decoded into once, as the model's uint8 input (`build_cache`: on the GPU when it fits, else in pinned
memory), from which batches are sliced (`iterate_batches`); and what a checkpoint records of the data
(`training_data`).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from galaxy10.dataset import CLASS_NAMES, DATASET_INFO
from galaxy10.distributed import is_main_process, this_process_part, this_process_share
from galaxy10.errors import Galaxy10Error
from galaxy10.images import IMAGE_SUFFIXES, ImageError, is_image_file, open_image
from galaxy10.models import TrainingData
from galaxy10.preprocessing import Preprocessing
from galaxy10.progress import progress_bar

GPU_CACHE_SHARE = 0.5  # the image cache may take this share of free GPU memory


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
        images = sorted(p for p in folder.iterdir() if is_image_file(p))
        paths += images
        labels += [label] * len(images)
    if not paths:
        raise Galaxy10Error(f"the class folders of {root} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return FolderScan(root, paths, labels, [p.name for p in folders])


def class_names_for(classes: Sequence[str], names_file: str | os.PathLike[str] = "") -> list[str]:
    """The class names of class folders: those of `names_file` (one per line, in folder order) where given;
    Galaxy10's for the folders 0 to 9 exactly (an export of the Galaxy10 file); else the folder names."""
    if names_file:
        return names_from_file(names_file, classes)
    if list(classes) == [str(i) for i in range(len(CLASS_NAMES))]:
        return list(CLASS_NAMES)
    return list(classes)


def names_from_file(path: str | os.PathLike[str], classes: Sequence[str]) -> list[str]:
    """--class-names: one non-empty line per class folder; another count is one line saying which."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise Galaxy10Error(f"--class-names {path} cannot be read ({err}): give a text file, one name a line"
                            ) from None
    if len(names) != len(classes) or len(set(names)) != len(names):
        raise Galaxy10Error(f"--class-names {path} has {len(names)} distinct name(s) for {len(classes)} "
                            f"class folders ({', '.join(classes)}): give one different name per folder, in "
                            "that order")
    return names


def check_classes(train: FolderScan, val: FolderScan, num_classes: int | None) -> None:
    """Same class folders in train and val, as many as the model has outputs, none empty in train.

    An empty val class is allowed: a small split can leave a rare class out; the report shows it.
    """
    if train.classes != val.classes:
        raise Galaxy10Error(
            f"{train.root} has classes {train.classes} but {val.root} has {val.classes}: "
            "both need the same class folders"
        )
    if len(train.classes) < 2:
        raise Galaxy10Error(f"{train.root} has one class folder: a classifier needs at least two")
    if num_classes is not None and len(train.classes) != num_classes:
        raise Galaxy10Error(
            f"{train.root} has {len(train.classes)} class folders {train.classes}, expected {num_classes}: "
            "re-export the data or drop --num-classes"
        )
    empty = sorted(set(range(len(train.classes))) - set(train.labels))
    if empty:
        raise Galaxy10Error(
            f"class folder {train.root / train.classes[empty[0]]} has no images, so the model could never "
            "learn that class; add images or re-export the data"
        )


def decode_images(paths: Sequence[Path], preprocessing: Preprocessing, workers: int, desc: str
                  ) -> tuple[torch.Tensor, dict[int, str]]:
    """Decode every image once into a uint8 (N, 3, S, S) tensor (Pillow releases the GIL, so threads scale),
    and say which could not be read, by position, with why."""
    side = preprocessing.image_size
    images = torch.empty((len(paths), 3, side, side), dtype=torch.uint8)
    failures: dict[int, str] = {}

    def load(i: int) -> None:
        try:
            images[i] = preprocessing(open_image(paths[i]))
        except (ImageError, OSError, ValueError) as err:
            failures[i] = str(err)

    pool = ThreadPoolExecutor(max_workers=max(workers, 1))
    try:
        for _ in progress_bar(pool.map(load, range(len(paths))), total=len(paths), desc=desc, unit="img",
                              disable=not is_main_process()):
            pass
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C, skip the rest of the queue
    return images, failures


def unreadable(scan: FolderScan, failures: dict[int, str], skip: bool) -> torch.Tensor | None:
    """The images to keep (a mask over the scan; None: all). Unreadable ones are one error listing every one
    of them, path and reason, unless `skip` (--skip-unreadable), which leaves them out with a count."""
    if not failures:
        return None
    listed = "; ".join(f"{scan.paths[i]} ({failures[i]})" for i in sorted(failures))
    if not skip:
        raise Galaxy10Error(f"{len(failures)} image(s) under {scan.root} cannot be read: {listed}; replace "
                            "or delete them, or add --skip-unreadable to train without them")
    print(f"skipped {len(failures)} unreadable image(s) under {scan.root} (--skip-unreadable): {listed}",
          file=sys.stderr)
    kept = torch.ones(len(scan.paths), dtype=torch.bool)
    kept[sorted(failures)] = False
    if not kept.any():
        raise Galaxy10Error(f"no image under {scan.root} can be read: {listed}")
    return kept


@dataclass
class ImageCache:
    """Decoded images and labels, on the training device or in pinned host memory."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)
    device: torch.device  # where batches are used
    kept: torch.Tensor | None = None  # which of its folder scan's images it holds (None: all of them)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def where(self) -> str:
        return f"{self.images.nbytes / 2**20:.0f} MB on {self.images.device.type}"

    def subset(self, chosen: torch.Tensor) -> ImageCache:
        """The images where the boolean mask `chosen` (N,) is true, in order."""
        index = chosen.nonzero().squeeze(1)
        images, labels = self.images[index.to(self.images.device)], self.labels[index.to(self.labels.device)]
        return ImageCache(images, labels, self.device)

    def this_process_part(self) -> ImageCache:
        """Under torchrun, this process's contiguous part (for evaluation); in one process, all of it."""
        return ImageCache(this_process_part(self.images), this_process_part(self.labels), self.device)


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
    scan: FolderScan, preprocessing: Preprocessing, device: torch.device, workers: int, desc: str,
    skip_unreadable: bool = False,
) -> ImageCache:
    """Every image of the scan decoded once (see `unreadable` for those that cannot be)."""
    images, failures = decode_images(scan.paths, preprocessing, workers, desc)
    labels = torch.tensor(scan.labels, dtype=torch.long)
    kept = unreadable(scan, failures, skip_unreadable)
    if kept is not None:
        images, labels = images[kept], labels[kept]
    cache = place_cache(images, labels, device)
    cache.kept = kept
    return cache


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


def merge_scans(first: FolderScan, second: FolderScan) -> FolderScan:
    """Two scans of the same class folders as one (a committee's labelled images: both data folders)."""
    return FolderScan(first.root, first.paths + second.paths, first.labels + second.labels, first.classes)


def source_groups(scan: FolderScan) -> tuple[list[int], list[bool]]:
    """For each image, the row of the HDF5 file it was made from, and whether it is an augmented copy, where
    the export's manifest.csv beside the folders says (preprocess_and_balancing.py's copies name their source
    row): a copy never sits in another fold than its original, and is never scored. Elsewhere each image is
    a group of its own, and an original."""
    manifest = scan.root.parent / "manifest.csv"
    sources: dict[str, tuple[int, bool]] = {}
    if manifest.is_file():
        with manifest.open(newline="") as f:
            for row in csv.DictReader(f):
                source = row.get("source_index") or row.get("index")
                if source:
                    sources[row["path"]] = int(source), not row.get("index")
    groups, copies = [], []
    for i, path in enumerate(scan.paths):
        inside = path.is_relative_to(scan.root.parent)
        relative = path.relative_to(scan.root.parent).as_posix() if inside else ""
        group, copy = sources.get(relative, (-1 - i, False))  # negative: an image of its own
        groups.append(group)
        copies.append(copy)
    return groups, copies


def training_data(scan: FolderScan) -> TrainingData:
    """What a checkpoint records of its training images: the folder, the count, and whether they are the
    built-in synthetic sample, as the export beside them says (load_data.py and preprocess_and_balancing.py
    write DATASET_INFO into their output folder); images of the user's own count as real."""
    info_file = scan.root.parent / DATASET_INFO
    try:
        synthetic = bool(json.loads(info_file.read_text()).get("synthetic", False))
    except (OSError, ValueError):
        synthetic = False
    return TrainingData(str(scan.root), len(scan.paths), synthetic)
