"""Synthetic galaxies in the exact Galaxy10 DECaLS format (`write_sample`): each class rendered to look
like its name (round, cigar-shaped, barred, tightly or loosely wound, edge-on with or without a bulge...),
with the real file's class proportions, a point-spread function, sky noise and the surveys' asinh colour
stretch; the same seed gives a byte-identical file however many worker processes render it. Also a contact
sheet of a file's classes (`write_preview`).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from galaxy10.dataset import CLASS_NAMES, META_FIELDS, REAL_CLASS_COUNTS, SAMPLE_GENERATOR
from galaxy10.errors import Galaxy10Error
from galaxy10.files import atomic_path, remove_abandoned_temporaries
from galaxy10.progress import progress_bar
from galaxy10.workers import process_pool

MIN_PER_CLASS = 2
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 512
# Rows rendered per worker task: large enough to amortise inter-process transfer, small enough
# to keep the progress bar moving and the parent's memory flat (16 full-size images are 3 MB).
BLOCK_ROWS = 16
# Independent random streams derived from the seed (SeedSequence pads short keys with zeros,
# so the stream tag keeps the label stream apart from every image stream).
_LABEL_STREAM, _IMAGE_STREAM = 1, 2
_NOISE_POOL_SEED = 20240611

# Rendering constants, in pixels at 256 px (they scale with the image size).
PSF_SIGMA = 1.3
SKY_NOISE = 0.012
ASINH_SOFTENING = 0.02
ASINH_PEAK = 12.0
SKY_RGB = np.array([0.105, 0.09, 0.08], dtype=np.float32)
# Survey composites map z, r, g to R, G, B: old stars look yellow-red, young ones blue.
OLD_STARS = np.array([1.0, 0.78, 0.55], dtype=np.float32)
DISK_LIGHT = np.array([0.8, 0.86, 1.0], dtype=np.float32)
YOUNG_STARS = np.array([0.55, 0.72, 1.0], dtype=np.float32)


# ---------------------------------------------------------------- labels and metadata


def class_counts(n: int) -> list[int]:
    """Images per class for an n-image file: the real proportions, at least 2 each, summing to n."""
    k = len(REAL_CLASS_COUNTS)
    if n < MIN_PER_CLASS * k:
        raise Galaxy10Error(f"--n must be at least {MIN_PER_CLASS * k} ({MIN_PER_CLASS} images per class), "
                            f"got {n}")
    weights = np.array(REAL_CLASS_COUNTS, dtype=np.float64)
    at_minimum = np.zeros(k, dtype=bool)
    while True:  # classes whose share falls below the minimum get the minimum; the rest share the remainder
        free = np.flatnonzero(~at_minimum)
        budget = n - MIN_PER_CLASS * int(at_minimum.sum())
        quotas = budget * weights[free] / weights[free].sum()
        if (quotas >= MIN_PER_CLASS).all():
            break
        at_minimum[free[quotas < MIN_PER_CLASS]] = True
    counts = np.full(k, MIN_PER_CLASS)
    counts[free] = _largest_remainder(quotas, budget)
    return counts.tolist()


def _largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Round quotas down, then give the leftover units to the largest fractional parts."""
    counts = np.floor(quotas).astype(int)
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def sample_labels_and_metadata(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Shuffled class ids (interleaved, as in the real file) and plausible sky positions and redshifts."""
    rng = np.random.default_rng([seed, _LABEL_STREAM])
    labels = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), class_counts(n))).astype(np.uint8)
    # Uniform on the sphere within the DECaLS declination band.
    sin_dec = rng.uniform(np.sin(np.radians(-20.0)), np.sin(np.radians(35.0)), n)
    meta = {
        "ra": rng.uniform(0.0, 360.0, n),
        "dec": np.degrees(np.arcsin(sin_dec)),
        "redshift": np.clip(rng.gamma(4.0, 0.02, n), 0.01, 0.25),
        "pxscale": np.full(n, 0.262),  # DECam's native arcsec per pixel
    }
    return labels, {name: meta[name] for name in META_FIELDS}


# ---------------------------------------------------------------- rendering


class _Canvas:
    """Linear-flux RGB planes (3, S, S) plus pixel coordinates, in units that scale with S."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.unit = size / 256.0  # one pixel of a 256 px image
        self.flux = np.zeros((3, size, size), dtype=np.float32)
        self.y, self.x = _pixel_grid(size)

    def frame(self, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (along, across) of every pixel in a frame centred at (cx, cy), rotated by angle."""
        dx, dy = self.x - np.float32(cx), self.y - np.float32(cy)
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        return dx * c + dy * s, dy * c - dx * s

    def add(self, intensity: np.ndarray, color: np.ndarray) -> None:
        self.flux += color[:, None, None] * intensity

    def blob(self, cx: float, cy: float, sigma: float, amp: float, color: np.ndarray,
             q: float = 1.0, angle: float = 0.0) -> None:
        """A small elliptical Gaussian, drawn only in its own neighbourhood (cheap for stars and knots)."""
        half = 4.0 * sigma
        x0, x1 = max(int(cx - half), 0), min(int(cx + half) + 2, self.size)
        y0, y1 = max(int(cy - half), 0), min(int(cy + half) + 2, self.size)
        if x0 >= x1 or y0 >= y1:
            return
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        along, across = dx * c + dy * s, (dy * c - dx * s) / np.float32(q)
        g = np.exp((along * along + across * across) * np.float32(-0.5 / sigma**2))
        self.flux[:, y0:y1, x0:x1] += (amp * color)[:, None, None] * g


@lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as a column and a row that broadcast to (size, size)."""
    axis = np.arange(size, dtype=np.float32)
    return axis[:, None], axis[None, :]


def _sersic(r: np.ndarray, re: float, n: float) -> np.ndarray:
    """Sersic profile with central intensity 1 (n=1 exponential disk, n=4 de Vaucouleurs)."""
    b = 2.0 * n - 1.0 / 3.0
    return np.exp(np.float32(-b) * (r * np.float32(1.0 / re)) ** np.float32(1.0 / n))


def _tint(rng: np.random.Generator, color: np.ndarray, spread: float = 0.06) -> np.ndarray:
    return (color * rng.uniform(1.0 - spread, 1.0 + spread, 3)).astype(np.float32)


def _smooth_galaxy(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float,
                   q_range: tuple[float, float]) -> None:
    """A structureless Sersic elliptical; the axis ratio range is what separates classes 2, 3 and 4."""
    u, v = canvas.frame(cx, cy, rng.uniform(0, np.pi))
    q = rng.uniform(*q_range)
    re = canvas.size * rng.uniform(0.075, 0.11) / q**0.3
    n = rng.uniform(1.5, 3.0)
    r = np.sqrt(u * u + (v / np.float32(q)) ** 2)
    # Fix the brightness at re rather than at the centre, so the visible size does not depend on n.
    brightness_at_re = rng.uniform(0.08, 0.16)
    canvas.add(np.float32(brightness_at_re * np.exp(2.0 * n - 1.0 / 3.0)) * _sersic(r, re, n),
               _tint(rng, OLD_STARS))


def render_round(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    _smooth_galaxy(canvas, rng, cx, cy, (0.9, 1.0))


def render_in_between(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    _smooth_galaxy(canvas, rng, cx, cy, (0.5, 0.68))


def render_cigar(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    _smooth_galaxy(canvas, rng, cx, cy, (0.2, 0.34))


def _edge_on_disk(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float, angle: float) -> float:
    """A thin exponential disk seen edge-on; returns its scale length in pixels."""
    u, v = canvas.frame(cx, cy, angle)
    h = canvas.size * rng.uniform(0.06, 0.085)
    hz = h * rng.uniform(0.07, 0.1)
    soft = np.float32(0.5 * hz)
    disk = np.exp(-np.sqrt(u * u + np.float32(h * h * 0.04)) / np.float32(h)
                  - np.sqrt(v * v + soft * soft) / np.float32(hz))
    if rng.random() < 0.5:  # a dark dust lane along the mid-plane
        disk *= 1.0 - np.float32(rng.uniform(0.3, 0.6)) * np.exp(-((v / np.float32(0.4 * hz)) ** 2))
    canvas.add(rng.uniform(1.5, 3.0) * disk, _tint(rng, DISK_LIGHT))
    return h


def render_edge_on(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    _edge_on_disk(canvas, rng, cx, cy, rng.uniform(0, np.pi))


def render_edge_on_bulge(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    angle = rng.uniform(0, np.pi)
    h = _edge_on_disk(canvas, rng, cx, cy, angle)
    u, v = canvas.frame(cx, cy, angle)
    q = rng.uniform(0.75, 0.95)
    r = np.sqrt(u * u + (v / np.float32(q)) ** 2)
    canvas.add(rng.uniform(4.0, 8.0) * _sersic(r, h * rng.uniform(0.4, 0.55), 1.5), _tint(rng, OLD_STARS))


@dataclass(frozen=True)
class _Disk:
    """An inclined disk: maps between disk-plane polar coordinates and image pixels."""

    cx: float
    cy: float
    angle: float  # position angle of the major axis
    incl: float  # apparent axis ratio, cos(inclination)
    handedness: float  # +1 or -1: which way the arms wind on the sky

    def plane(self, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Disk-plane radius, angle and Cartesian coordinates for every pixel."""
        x, y = canvas.frame(self.cx, self.cy, self.angle)
        y = y / np.float32(self.incl)
        r = np.sqrt(x * x + y * y) + np.float32(1e-3)
        return r, np.arctan2(y, x) * np.float32(self.handedness), (x, y)

    def pixel(self, r: float, theta: float) -> tuple[float, float]:
        along = r * np.cos(theta * self.handedness)
        across = r * np.sin(theta * self.handedness) * self.incl
        c, s = np.cos(self.angle), np.sin(self.angle)
        return self.cx + along * c - across * s, self.cy + along * s + across * c


def _spiral(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float, *,
            pitch_deg: tuple[float, float], bulge: tuple[float, float], bar: bool) -> None:
    """Bulge, disk and two logarithmic arms (leaving from the bar's ends when there is a bar)."""
    disk = _Disk(cx, cy, rng.uniform(0, np.pi), rng.uniform(0.7, 1.0), rng.choice((-1.0, 1.0)))
    r, theta, (x, y) = disk.plane(canvas)
    r_out = canvas.size * rng.uniform(0.2, 0.28)
    h = r_out / 2.6
    canvas.add(rng.uniform(0.12, 0.2) * np.exp(-r / np.float32(h)), _tint(rng, DISK_LIGHT))
    arm_start = r_out * (rng.uniform(0.32, 0.4) if bar else rng.uniform(0.12, 0.2))
    arm_angle = rng.uniform(0, np.pi)
    winding = 1.0 / np.tan(np.radians(rng.uniform(*pitch_deg)))
    # Arm crests lie where theta = arm_angle + winding * ln(r / arm_start) + k pi.
    phase = np.float32(2.0) * (theta - np.log(r / np.float32(arm_start)) * np.float32(winding)
                               - np.float32(arm_angle))
    crest = (np.float32(0.5) + np.float32(0.5) * np.cos(phase)) ** np.float32(rng.uniform(4.0, 7.0))
    window = (np.float32(1.0) - np.exp(-((r / np.float32(arm_start)) ** 4))) * np.exp(-r / np.float32(h))
    canvas.add(rng.uniform(0.8, 1.3) * crest * window, _tint(rng, YOUNG_STARS))
    for _ in range(rng.integers(4, 10)):  # star-forming knots strung along the arms
        radius = arm_start * np.exp(rng.uniform(0.2, 1.0) * np.log(r_out / arm_start))
        arm = np.pi * rng.integers(2)
        kx, ky = disk.pixel(radius, arm_angle + arm + winding * np.log(radius / arm_start))
        canvas.blob(kx, ky, canvas.unit * rng.uniform(1.2, 2.2), rng.uniform(0.2, 0.6), YOUNG_STARS)
    if bar:
        bar_angle = arm_angle * disk.handedness
        c, s = np.float32(np.cos(bar_angle)), np.float32(np.sin(bar_angle))
        along, across = x * c + y * s, y * c - x * s
        half_width = arm_start * rng.uniform(0.18, 0.25)
        canvas.add(rng.uniform(1.2, 2.0) * np.exp(-(along / np.float32(arm_start)) ** 4
                                                  - (across / np.float32(half_width)) ** 2),
                   _tint(rng, OLD_STARS))
    bulge_re = canvas.size * rng.uniform(*bulge)
    canvas.add(rng.uniform(2.0, 4.0) * _sersic(r, bulge_re, 1.5), _tint(rng, OLD_STARS))


def render_barred_spiral(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    _spiral(canvas, rng, cx, cy, pitch_deg=(16, 24), bulge=(0.02, 0.03), bar=True)


def render_tight_spiral(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    _spiral(canvas, rng, cx, cy, pitch_deg=(8, 12), bulge=(0.04, 0.055), bar=False)


def render_loose_spiral(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    _spiral(canvas, rng, cx, cy, pitch_deg=(28, 38), bulge=(0.015, 0.025), bar=False)


def render_disturbed(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    """A lopsided, irregular body of offset blobs, its light and blue star-forming knots piled to one side."""
    size = canvas.size
    lean = rng.uniform(0, 2 * np.pi)
    lean_x, lean_y = np.cos(lean), np.sin(lean)
    for _ in range(rng.integers(3, 6)):
        offset = size * rng.uniform(0.0, 0.14)
        bx = cx + offset * lean_x + size * rng.normal(0, 0.025)
        by = cy + offset * lean_y + size * rng.normal(0, 0.025)
        u, v = canvas.frame(bx, by, rng.uniform(0, np.pi))
        q = np.float32(rng.uniform(0.35, 0.9))
        r = np.sqrt(u * u + (v / q) ** 2)
        canvas.add(rng.uniform(0.2, 0.6) * np.exp(-r / np.float32(size * rng.uniform(0.035, 0.07))),
                   _tint(rng, DISK_LIGHT, 0.1))
    for _ in range(rng.integers(8, 16)):
        spread = size * rng.uniform(0.03, 0.1)
        kx = cx + size * 0.08 * lean_x + rng.normal(0, spread)
        ky = cy + size * 0.08 * lean_y + rng.normal(0, spread)
        canvas.blob(kx, ky, canvas.unit * rng.uniform(1.5, 4.0), rng.uniform(0.3, 1.5),
                    _tint(rng, YOUNG_STARS, 0.1))


def render_merging(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    """Two distinct galaxies, with tidal tails flung out in opposite directions and a faint bridge."""
    size = canvas.size
    axis = rng.uniform(0, 2 * np.pi)
    half_sep = size * rng.uniform(0.1, 0.16)
    spin = rng.choice((-1.0, 1.0))
    ends = []
    for side, bright in ((1.0, 1.0), (-1.0, rng.uniform(0.4, 1.0))):
        gx = cx + side * half_sep * np.cos(axis)
        gy = cy + side * half_sep * np.sin(axis)
        ends.append((gx, gy))
        u, v = canvas.frame(gx, gy, rng.uniform(0, np.pi))
        q = np.float32(rng.uniform(0.6, 1.0))
        r = np.sqrt(u * u + (v / q) ** 2)
        canvas.add(bright * rng.uniform(4.0, 7.0) * _sersic(r, size * rng.uniform(0.04, 0.06), 1.5),
                   _tint(rng, OLD_STARS))
        _tidal_tail(canvas, rng, gx, gy, axis + (0.0 if side > 0 else np.pi), spin)
    if rng.random() < 0.6:
        (x0, y0), (x1, y1) = ends
        for t in np.linspace(0.2, 0.8, 8):
            canvas.blob(x0 + t * (x1 - x0), y0 + t * (y1 - y0), canvas.unit * 3.5, 0.12,
                        DISK_LIGHT)


def _tidal_tail(canvas: _Canvas, rng: np.random.Generator, gx: float, gy: float, heading: float,
                spin: float) -> None:
    """A curved, widening, fading stream of light leaving a galaxy along ``heading``."""
    length = canvas.size * rng.uniform(0.14, 0.22)
    bend = spin * rng.uniform(0.6, 1.6)
    color = _tint(rng, DISK_LIGHT, 0.1)
    for t in np.linspace(0.15, 1.0, 18):
        angle = heading + bend * t
        radius = length * t
        canvas.blob(gx + radius * np.cos(angle), gy + radius * np.sin(angle),
                    canvas.unit * (1.5 + 3.0 * t), 0.2 * (1.1 - t), color)


RENDERERS: tuple[Callable[[_Canvas, np.random.Generator, float, float], None], ...] = (
    render_disturbed,
    render_merging,
    render_round,
    render_in_between,
    render_cigar,
    render_barred_spiral,
    render_tight_spiral,
    render_loose_spiral,
    render_edge_on,
    render_edge_on_bulge,
)


def _field_objects(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> None:
    """Foreground stars and small background galaxies, kept clear of the target galaxy."""
    size = canvas.size
    for is_star in [True] * rng.poisson(4) + [False] * rng.poisson(2):
        radius, angle = size * rng.uniform(0.36, 0.7), rng.uniform(0, 2 * np.pi)
        x, y = cx + radius * np.cos(angle), cy + radius * np.sin(angle)
        if is_star:
            hue = rng.random()
            color = (1.0 - hue) * YOUNG_STARS + hue * np.array([1.0, 0.6, 0.4], dtype=np.float32)
            canvas.blob(x, y, canvas.unit * 0.7, float(np.exp(rng.uniform(np.log(0.1), np.log(8.0)))), color)
        else:
            canvas.blob(x, y, canvas.unit * rng.uniform(1.5, 3.0), rng.uniform(0.05, 0.3),
                        _tint(rng, OLD_STARS, 0.1), q=rng.uniform(0.4, 1.0), angle=rng.uniform(0, np.pi))


def render_galaxy(label: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One synthetic DECaLS-like cutout of class ``label`` as an (size, size, 3) uint8 image."""
    canvas = _Canvas(size)
    cx = size / 2 + size * float(np.clip(rng.normal(0, 0.02), -0.05, 0.05))
    cy = size / 2 + size * float(np.clip(rng.normal(0, 0.02), -0.05, 0.05))
    RENDERERS[label](canvas, rng, cx, cy)
    _field_objects(canvas, rng, cx, cy)
    flux = gaussian_filter(canvas.flux, (0, PSF_SIGMA * canvas.unit, PSF_SIGMA * canvas.unit), truncate=3.0)
    flux *= np.float32(rng.uniform(0.7, 1.4))
    _add_sky_noise(flux, rng)
    return _stretch(flux)


@lru_cache(maxsize=4)
def _noise_pool(size: int) -> np.ndarray:
    """Sky noise on a (3, 2S, 2S) field; drawing fresh normals for every image would double its cost."""
    rng = np.random.default_rng(_NOISE_POOL_SEED)
    return rng.standard_normal((3, 2 * size, 2 * size), dtype=np.float32) * np.float32(SKY_NOISE)


def _add_sky_noise(flux: np.ndarray, rng: np.random.Generator) -> None:
    """Add a randomly placed window of the noise field to each channel, in place."""
    size = flux.shape[-1]
    pool = _noise_pool(size)
    for channel, (y0, x0) in enumerate(rng.integers(0, size, (3, 2))):
        flux[channel] += pool[channel, y0:y0 + size, x0:x0 + size]


def _stretch(flux: np.ndarray) -> np.ndarray:
    """asinh stretch of linear flux onto a dark sky, as survey colour composites do (overwrites flux)."""
    flux *= np.float32(1.0 / ASINH_SOFTENING)
    np.arcsinh(flux, out=flux)
    flux *= np.float32(255.0 / np.arcsinh(ASINH_PEAK / ASINH_SOFTENING))
    flux += (SKY_RGB * 255.0 + 0.5)[:, None, None]
    np.clip(flux, 0, 255, out=flux)
    return flux.astype(np.uint8).transpose(1, 2, 0)


def render_rows(seed: int, image_size: int, start: int, labels: np.ndarray) -> np.ndarray:
    """Images for rows start.. of the file; each row's randomness depends only on (seed, row)."""
    return np.stack([
        render_galaxy(int(label), np.random.default_rng([seed, _IMAGE_STREAM, start + i]), image_size)
        for i, label in enumerate(labels)
    ])


# ---------------------------------------------------------------- writing


def write_sample(path: str | os.PathLike[str], n: int = 2000, seed: int = 0, image_size: int = 256,
                 workers: int | None = None, progress: bool = True) -> Path:
    """Render n galaxies into a Galaxy10-format HDF5 file at ``path``; it appears only when complete."""
    path = Path(path)
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_request(path, n, seed, image_size, workers)
    remove_abandoned_temporaries(path)
    labels, meta = sample_labels_and_metadata(n, seed)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["generator"] = SAMPLE_GENERATOR  # so checkpoints trained on it say they are synthetic
        images = f.create_dataset("images", (n, image_size, image_size, 3), dtype=np.uint8,
                                  chunks=(1, image_size, image_size, 3))
        f.create_dataset("ans", data=labels)
        for name, values in meta.items():
            f.create_dataset(name, data=values.astype(np.float64))
        with progress_bar(total=n, unit="img", desc=f"rendering {path.name}", disable=not progress) as bar:
            for start, block in _render_blocks(labels, seed, image_size, workers):
                images[start:start + len(block)] = block
                bar.update(len(block))
    return path


def _check_request(path: Path, n: int, seed: int, image_size: int, workers: int) -> None:
    class_counts(n)
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise Galaxy10Error(f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} px, "
                            f"got {image_size}")
    if seed < 0:
        raise Galaxy10Error(f"--seed must be 0 or more, got {seed}")
    if workers < 1:
        raise Galaxy10Error(f"--workers must be at least 1, got {workers}")
    check_output_path(path)
    needed = n * image_size * image_size * 3
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise Galaxy10Error(f"{path.parent} has {free / 1e9:.1f} GB free but {n} images of {image_size} px "
                            f"need {needed / 1e9:.1f} GB: free some space or use a smaller --n")


def check_output_path(path: Path) -> None:
    if path.is_dir():
        raise Galaxy10Error(f"{path} is a folder: give a file name, e.g. {path / 'galaxy10_sample.h5'}")
    if not path.parent.is_dir():
        raise Galaxy10Error(f"folder {path.parent} does not exist: create it or choose another path")


def _render_blocks(labels: np.ndarray, seed: int, image_size: int,
                   workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, images) blocks in row order, rendered by ``workers`` processes."""
    starts = range(0, len(labels), BLOCK_ROWS)
    if workers == 1:
        for start in starts:
            yield start, render_rows(seed, image_size, start, labels[start:start + BLOCK_ROWS])
        return
    pool = process_pool(min(workers, len(starts)))
    try:
        blocks = pool.map(render_rows, [seed] * len(starts), [image_size] * len(starts), starts,
                          [labels[s:s + BLOCK_ROWS] for s in starts])
        yield from zip(starts, blocks, strict=True)
    finally:
        # On an error or Ctrl-C, drop the queued blocks instead of rendering them all first.
        pool.shutdown(wait=True, cancel_futures=True)


def write_preview(h5_path: str | os.PathLike[str], png_path: str | os.PathLike[str], per_class: int = 8,
                  tile: int = 96) -> Path:
    """A contact sheet of the first ``per_class`` images of each class in a Galaxy10-format file."""
    png_path = Path(png_path)
    label_width = 190
    sheet = Image.new("RGB", (label_width + per_class * tile, len(CLASS_NAMES) * tile), "black")
    draw = ImageDraw.Draw(sheet)
    with h5py.File(h5_path, "r") as f:
        labels = f["ans"][:]
        for label, name in enumerate(CLASS_NAMES):
            rows = np.flatnonzero(labels == label)[:per_class]
            draw.text((6, label * tile + tile // 2 - 6), f"{label} {name}", fill="white")
            for col, image in enumerate(f["images"][rows]):
                thumb = Image.fromarray(image).resize((tile, tile), Image.BILINEAR)
                sheet.paste(thumb, (label_width + col * tile, label * tile))
    with atomic_path(png_path) as tmp:
        sheet.save(tmp, format="PNG")
    return png_path


