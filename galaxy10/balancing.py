"""The balancing of an export's training classes with augmented copies: every copy planned up front from one
seeded generator (`plan_augmentations`), so the output never depends on the worker count; each copy a flip,
a rotation by any angle (the corners filled by reflecting the sky, never black) and a mild change of
brightness and contrast (`augment`), written by worker processes beside the originals
(`write_augmented_copies`), with its source row in the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from galaxy10.dataset import CHUNK_ROWS, Galaxy10File
from galaxy10.errors import Galaxy10Error
from galaxy10.export import MANIFEST_FIELDS, save_png
from galaxy10.workers import read_worker_rows, run_tasks

BALANCED_FIELDS = (*MANIFEST_FIELDS, "source_index", "augmentation")


@dataclass(frozen=True)
class Augmentation:
    """One augmented copy: which row it comes from and how it is changed."""

    label: int
    counter: int
    source_index: int
    flip: bool
    angle: float  # degrees, any value in [0, 360)
    brightness: float
    contrast: float

    @property
    def filename(self) -> str:
        return f"aug_{self.label}_{self.counter:05d}.png"

    def describe(self) -> str:
        return (f"flip={int(self.flip)};angle={self.angle:.1f};"
                f"brightness={self.brightness:.3f};contrast={self.contrast:.3f}")


def plan_augmentations(train_labels: np.ndarray, train_rows: np.ndarray, target: int | None,
                       seed: int) -> list[Augmentation]:
    """Decide every copy up front from one seeded generator, so the output never depends on workers.

    Each class's originals are used in turn (a seeded permutation, cycled), so no image is copied
    twice before every image of its class has been copied once.
    """
    counts = np.bincount(train_labels)
    goal = int(counts.max()) if target is None else target
    if goal < counts.max():
        largest = int(counts.argmax())
        raise Galaxy10Error(
            f"--target {goal} is below the largest training class (class {largest}: "
            f"{counts.max()} images): pass a larger --target or leave it out"
        )
    rng = np.random.default_rng(seed)
    plan: list[Augmentation] = []
    for label in np.flatnonzero(counts):
        rows = rng.permutation(train_rows[train_labels == label])
        for counter in range(goal - int(counts[label])):
            plan.append(Augmentation(
                label=int(label),
                counter=counter,
                source_index=int(rows[counter % len(rows)]),
                flip=bool(rng.random() < 0.5),
                angle=float(rng.uniform(0, 360)),
                brightness=float(rng.uniform(0.9, 1.1)),
                contrast=float(rng.uniform(0.9, 1.1)),
            ))
    return plan


def augment(image: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Apply one planned augmentation to an (H, W, 3) uint8 image."""
    out = np.fliplr(image) if aug.flip else image
    # Quarter turns are exact; only the residual angle (within +-45 degrees) is interpolated.
    quarter_turns = int(round(aug.angle / 90)) % 4
    residual = aug.angle - 90 * round(aug.angle / 90)
    out = np.rot90(out, quarter_turns).astype(np.float32)
    if abs(residual) > 0.05:
        out = ndimage.rotate(out, residual, axes=(1, 0), reshape=False, order=1, mode="reflect")
    mean = out.mean()
    out = (out - mean) * aug.contrast + mean * aug.brightness
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _write_copies(task: tuple[list[Augmentation], str]) -> int:
    plan, stage = task
    rows = sorted({aug.source_index for aug in plan})
    images = dict(zip(rows, read_worker_rows(rows), strict=True))
    for aug in plan:
        path = Path(stage) / "train" / str(aug.label) / aug.filename
        save_png(augment(images[aug.source_index], aug), path)
    return len(plan)


def write_augmented_copies(source: Galaxy10File, plan: list[Augmentation], stage: Path,
                           workers: int) -> list[dict]:
    """Write the planned copies into ``stage/train``; return their manifest rows."""
    # Sorting by source row lets each task read a compact, increasing set of rows from the file.
    ordered = sorted(plan, key=lambda aug: aug.source_index)
    # A task's copies come from about as many source rows as one HDF5 read of the export.
    tasks = [(ordered[i:i + CHUNK_ROWS], str(stage)) for i in range(0, len(ordered), CHUNK_ROWS)]
    run_tasks(source.path, _write_copies, tasks, workers, "augment", len(plan))
    return [augmentation_row(source, aug) for aug in plan]


def augmentation_row(source: Galaxy10File, aug: Augmentation) -> dict:
    i = aug.source_index
    return {
        "index": "",  # a copy is no row of the file; its source row is `source_index`
        "label": aug.label,
        "class_name": source.class_name(aug.label),
        "split": "train",
        "path": f"train/{aug.label}/{aug.filename}",
        **{name: repr(float(source.meta[name][i])) for name in ("ra", "dec", "redshift")},
        "source_index": i,
        "augmentation": aug.describe(),
    }


