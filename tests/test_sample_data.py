"""sample_data.py: the Galaxy10 format, class counts, determinism, atomic writes, errors, and shapes."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter, maximum_filter

import sample_data
from galaxy10 import synthetic
from galaxy10.dataset import CLASS_NAMES, META_FIELDS, REAL_CLASS_COUNTS
from galaxy10.errors import Galaxy10Error, run_cli

from helpers import dead_pid

SIZE = 64
N = 40


def read_all(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "sample.h5"
    return synthetic.write_sample(path, n=N, seed=3, image_size=SIZE, workers=1, progress=False)


# ---------------------------------------------------------------- format and metadata


def test_file_has_the_galaxy10_datasets_shapes_and_dtypes(sample: Path) -> None:
    with h5py.File(sample, "r") as f:
        assert set(f) == {"images", "ans", *META_FIELDS}
        assert f["images"].shape == (N, SIZE, SIZE, 3)
        assert f["images"].dtype == np.uint8
        assert f["images"].chunks == (1, SIZE, SIZE, 3)
        assert f["images"].compression is None
        assert f["ans"].shape == (N,) and f["ans"].dtype == np.uint8
        for name in META_FIELDS:
            assert f[name].shape == (N,) and f[name].dtype == np.float64


def test_labels_follow_class_counts_and_are_interleaved(sample: Path) -> None:
    labels = read_all(sample)["ans"]
    assert np.bincount(labels, minlength=len(CLASS_NAMES)).tolist() == synthetic.class_counts(N)
    assert (np.diff(labels.astype(int)) < 0).any(), "rows must be shuffled, not sorted by class"


def test_metadata_is_plausible(sample: Path) -> None:
    data = read_all(sample)
    assert ((data["ra"] >= 0) & (data["ra"] < 360)).all()
    assert ((data["dec"] >= -20) & (data["dec"] <= 35)).all()
    assert ((data["redshift"] >= 0.01) & (data["redshift"] <= 0.25)).all()
    assert np.allclose(data["pxscale"], 0.262)
    assert len(np.unique(data["ra"])) == N


def test_images_are_dark_sky_with_a_bright_centre(sample: Path) -> None:
    images = read_all(sample)["images"].astype(float)
    border = np.concatenate([images[:, :4].reshape(N, -1), images[:, -4:].reshape(N, -1)], axis=1)
    centre = images[:, SIZE // 2 - 4:SIZE // 2 + 4, SIZE // 2 - 4:SIZE // 2 + 4].reshape(N, -1)
    assert np.median(border) < 60
    assert (centre.mean(axis=1) > np.median(border, axis=1) + 30).all()


# ---------------------------------------------------------------- class counts


@pytest.mark.parametrize("n", [20, 21, 37, 100, 2000, 5000])
def test_class_counts_sum_to_n_with_at_least_two_per_class(n: int) -> None:
    counts = synthetic.class_counts(n)
    assert len(counts) == len(CLASS_NAMES)
    assert sum(counts) == n
    assert min(counts) >= 2


def test_class_counts_at_full_size_are_the_real_counts() -> None:
    assert synthetic.class_counts(17736) == list(REAL_CLASS_COUNTS)


def test_class_counts_follow_the_real_proportions() -> None:
    quotas = 2000 * np.array(REAL_CLASS_COUNTS) / sum(REAL_CLASS_COUNTS)
    assert np.abs(np.array(synthetic.class_counts(2000)) - quotas).max() < 1


def test_too_few_images_for_every_class_is_an_error() -> None:
    with pytest.raises(Galaxy10Error, match="at least 20"):
        synthetic.class_counts(19)


# ---------------------------------------------------------------- determinism and atomic writes


def test_same_seed_gives_identical_files_with_any_worker_count(sample: Path, tmp_path: Path) -> None:
    again = synthetic.write_sample(tmp_path / "again.h5", n=N, seed=3, image_size=SIZE, workers=2,
                                     progress=False)
    assert again.read_bytes() == sample.read_bytes()


def test_different_seed_gives_different_images_and_order(sample: Path, tmp_path: Path) -> None:
    other = read_all(synthetic.write_sample(tmp_path / "other.h5", n=N, seed=4, image_size=SIZE,
                                              workers=1, progress=False))
    first = read_all(sample)
    assert not np.array_equal(first["images"], other["images"])
    assert not np.array_equal(first["ans"], other["ans"])


def test_a_failure_mid_write_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    render_rows = synthetic.render_rows

    def fail_after_first_block(seed: int, image_size: int, start: int, labels: np.ndarray) -> np.ndarray:
        if start > 0:
            raise OSError("disk full")
        return render_rows(seed, image_size, start, labels)

    monkeypatch.setattr(synthetic, "render_rows", fail_after_first_block)
    with pytest.raises(OSError, match="disk full"):
        synthetic.write_sample(tmp_path / "out.h5", n=N, image_size=32, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_file_of_a_killed_run_is_removed_and_a_running_ones_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    killed, running = tmp_path / f".s.h5.tmp-{dead_pid()}", tmp_path / f".s.h5.tmp-{os.getppid()}"
    other = tmp_path / f".other.h5.tmp-{dead_pid()}"  # another file's: not this run's business
    for tmp in (killed, running, other):
        tmp.write_bytes(b"half an HDF5 file")
    synthetic.write_sample(tmp_path / "s.h5", n=20, image_size=32, workers=1, progress=False)
    assert [tmp.exists() for tmp in (killed, running, other)] == [False, True, True]
    said = capsys.readouterr().out
    assert said == f"removed {killed.name} from {tmp_path}, left by a run that was killed\n"


# ---------------------------------------------------------------- command line


def test_main_writes_the_file_and_a_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, preview = tmp_path / "cli.h5", tmp_path / "sheet.png"
    argv = ["--out", str(out), "--n", "20", "--image-size", "32", "--workers", "1", "--preview", str(preview)]
    assert run_cli(sample_data.main, argv) == 0
    assert read_all(out)["images"].shape == (20, 32, 32, 3)
    with Image.open(preview) as sheet:
        assert sheet.size[1] == len(CLASS_NAMES) * 96
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n", "5"], "--n must be at least 20"),
        (["--image-size", "16"], "--image-size must be between 32 and 512"),
        (["--image-size", "1024"], "--image-size must be between 32 and 512"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--seed", "-1"], "--seed must be 0 or more"),
        (["--out", "{tmp}/missing/x.h5"], "does not exist"),
        (["--out", "{tmp}"], "is a folder"),
        (["--preview", "{tmp}/missing/x.png"], "does not exist"),
    ],
)
def test_bad_flags_give_one_line_errors_and_exit_code_2(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path / "x.h5"), "--image-size", "32", "--workers", "1"]
    argv += [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    assert run_cli(sample_data.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x.h5").exists()


# ---------------------------------------------------------------- each class looks like its name


def light(image: np.ndarray) -> np.ndarray:
    """The galaxy's brightness above a quarter of its peak: a noise-free isophote, field objects masked."""
    grey = gaussian_filter(image.astype(float).mean(axis=2), 1.0)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    grey = np.where(np.hypot(xx, yy) < 0.33 * SIZE, grey - np.median(grey), 0.0)
    return np.clip(grey - 0.25 * grey.max(), 0, None)


def shape(image: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Axis ratio from second moments, and each pixel's (along, across) coordinates on the major axis."""
    w = light(image)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    dx, dy = xx - cx, yy - cy
    cov = np.cov(np.stack([dx.ravel(), dy.ravel()]), aweights=w.ravel())
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    major = eigenvectors[:, 1]
    along = dx * major[0] + dy * major[1]
    across = dy * major[0] - dx * major[1]
    return float(np.sqrt(eigenvalues[0] / eigenvalues[1])), along, across


def bulge_thickness_ratio(image: np.ndarray) -> float:
    """RMS thickness of the light at the centre over that further out along the disk."""
    w = light(image)
    _, along, across = shape(image)

    def thickness(mask: np.ndarray) -> float:
        return float(np.sqrt((w * across**2 * mask).sum() / (w * mask).sum()))

    centre = np.abs(along) < 0.04 * SIZE
    outer = (np.abs(along) > 0.08 * SIZE) & (np.abs(along) < 0.16 * SIZE)
    return thickness(centre) / thickness(outer)


def peaks(image: np.ndarray, fraction: float, smoothing: float, window: int) -> int:
    """Local maxima of the smoothed central light that reach ``fraction`` of the brightest."""
    grey = gaussian_filter(image.astype(float).mean(axis=2), smoothing)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    grey = np.where(np.hypot(xx, yy) < 0.3 * SIZE, grey - np.median(grey), 0.0)
    return int(((grey == maximum_filter(grey, size=window)) & (grey > fraction * grey.max())).sum())


def blueness(image: np.ndarray) -> float:
    """Blue over red light of the galaxy (survey composites put g in blue and z in red)."""
    mask = light(image) > 0
    rgb = image.astype(float)[mask] - np.median(image.reshape(-1, 3), axis=0)
    return float(rgb[:, 2].clip(0).sum() / rgb[:, 0].clip(0).sum())


@pytest.fixture(scope="module")
def by_class() -> dict[int, list[np.ndarray]]:
    return {
        label: [synthetic.render_galaxy(label, np.random.default_rng([7, label, i]), SIZE)
                for i in range(10)]
        for label in range(len(CLASS_NAMES))
    }


def test_smooth_classes_are_ordered_by_axis_ratio(by_class: dict[int, list[np.ndarray]]) -> None:
    round_, in_between, cigar = ([shape(im)[0] for im in by_class[label]] for label in (2, 3, 4))
    assert min(round_) > 0.8
    assert min(round_) > max(in_between) and min(in_between) > max(cigar)
    assert max(cigar) < 0.45


def test_edge_on_classes_are_thin_and_only_one_has_a_bulge(by_class: dict[int, list[np.ndarray]]) -> None:
    assert max(shape(im)[0] for im in by_class[8]) < 0.25
    without = [bulge_thickness_ratio(im) for im in by_class[8]]
    with_bulge = [bulge_thickness_ratio(im) for im in by_class[9]]
    assert min(with_bulge) > max(without)


def test_merging_galaxies_show_two_bodies(by_class: dict[int, list[np.ndarray]]) -> None:
    def bodies(image: np.ndarray) -> int:
        return peaks(image, fraction=0.5, smoothing=1.5, window=7)

    assert all(bodies(im) == 2 for im in by_class[1])
    assert all(bodies(im) == 1 for label in (2, 3, 4, 9) for im in by_class[label])


def test_disturbed_galaxies_are_clumpy(by_class: dict[int, list[np.ndarray]]) -> None:
    def knots(image: np.ndarray) -> int:
        return peaks(image, fraction=0.3, smoothing=0.7, window=3)

    disturbed = [knots(im) for im in by_class[0]]
    assert min(disturbed) >= 2 and np.median(disturbed) >= 4
    assert all(knots(im) == 1 for label in (2, 3, 4) for im in by_class[label])


def test_spirals_are_bluer_than_smooth_galaxies(by_class: dict[int, list[np.ndarray]]) -> None:
    spirals = [blueness(im) for label in (5, 6, 7) for im in by_class[label]]
    smooth = [blueness(im) for label in (2, 3, 4) for im in by_class[label]]
    assert min(spirals) > max(smooth)
