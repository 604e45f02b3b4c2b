"""load_data.py: the split, the export, the manifest, memory, killed runs (of every script's process pool),
and every bad input."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import psutil
import pytest
from PIL import Image

import galaxy10.export
import load_data
from galaxy10 import dataset, files, synthetic
from galaxy10.dataset import CHUNK_ROWS, CLASS_NAMES
from galaxy10.errors import run_cli
from galaxy10.export import split_rows

from helpers import (
    ROOT,
    assert_one_line_error,
    dead_pid,
    file_bytes,
    kill_when,
    random_galaxy10,
    read_manifest,
    write_galaxy10,
)

COUNTS = [6, 9, 14, 11, 3, 10, 9, 13, 7, 9]  # a miniature of the real class distribution


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    return random_galaxy10(tmp_path / "g.h5", COUNTS)


def export(h5: Path, out: Path, *extra: str) -> int:
    return run_cli(load_data.main, ["--h5", str(h5), "--out", str(out), "--workers", "1", *extra])


# ---------------------------------------------------------------- the split


def test_split_is_seeded_and_stratified() -> None:
    labels = np.repeat(np.arange(10), [108, 185, 264, 203, 33, 204, 183, 263, 142, 187])
    first, again = split_rows(labels, 0.2, seed=42), split_rows(labels, 0.2, seed=42)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, split_rows(labels, 0.2, seed=7))
    for c in range(10):
        in_class = labels == c
        assert abs(first[in_class].sum() - 0.2 * in_class.sum()) <= 1


def test_split_refuses_a_class_too_small_to_stratify(tmp_path: Path, capsys) -> None:
    h5 = random_galaxy10(tmp_path / "g.h5", [5, 5, 1, 5, 5, 5, 5, 5, 5, 5])
    assert export(h5, tmp_path / "out") == 2
    assert_one_line_error(capsys, "class 2", "at least 2")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the export


def test_export_writes_every_row_pixel_exact_with_a_correct_manifest(h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    assert export(h5, out) == 0
    rows = read_manifest(out)
    with h5py.File(h5) as f:
        images, labels, ra = f["images"][()], f["ans"][()], f["ra"][()]
    assert [int(r["index"]) for r in rows] == list(range(len(labels)))
    for row in rows:
        i, label = int(row["index"]), int(row["label"])
        assert label == labels[i] and row["class_name"] == CLASS_NAMES[label]
        assert row["path"] == f"{row['split']}/{label}/img_{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(out / row["path"])), images[i])
        assert float(row["ra"]) == ra[i]
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(r["path"] for r in rows)
    assert {r["split"] for r in rows} == {"train", "val"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_manifest_gives_each_images_own_dec_and_redshift(tmp_path: Path) -> None:
    """Values of full float64 precision, all different and in ranges that never overlap (dec < 0, redshift
    in (0, 1), ra > 100): a lost digit, a swapped column or a row out of place shows."""
    n = sum(COUNTS)
    rng = np.random.default_rng(7)
    labels = rng.permutation(np.repeat(np.arange(len(COUNTS)), COUNTS)).astype(np.uint8)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    dec = -rng.uniform(0.001, 20, n)
    redshift = rng.uniform(0.001, 0.999, n)
    h5 = write_galaxy10(tmp_path / "g.h5", images, labels, dec=dec, redshift=redshift,
                        ra=rng.uniform(100, 360, n))
    assert export(h5, tmp_path / "data") == 0
    rows = read_manifest(tmp_path / "data")
    assert sorted(int(r["index"]) for r in rows) == list(range(n))
    for row in rows:
        i = int(row["index"])
        assert (float(row["dec"]), float(row["redshift"])) == (dec[i], redshift[i]), row
        assert np.array_equal(np.asarray(Image.open(tmp_path / "data" / row["path"])), images[i])


def test_worker_processes_write_the_same_files(h5: Path, tmp_path: Path) -> None:
    assert export(h5, tmp_path / "one") == 0
    assert run_cli(load_data.main, ["--h5", str(h5), "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one = file_bytes(tmp_path / "one")
    assert len(one) == sum(COUNTS) + 2  # every image, the manifest and what the export came from
    assert json.loads(one["dataset.json"]) == {"h5": str(h5), "images": sum(COUNTS), "synthetic": False}
    assert file_bytes(tmp_path / "two") == one


def test_memory_stays_flat_the_images_are_never_read_whole(tmp_path: Path, monkeypatch) -> None:
    n, size = 6 * CHUNK_ROWS, 64
    h5 = random_galaxy10(tmp_path / "g.h5", [n // 10] * 10, size=size)
    read_sizes: list[int] = []
    getitem = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, key: object) -> np.ndarray:
        result = getitem(self, key)
        if self.name == "/images":
            read_sizes.append(len(result))
        return result

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    tracemalloc.start()
    try:
        assert export(h5, tmp_path / "data") == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = (n // 10) * 10 * size * size * 3
    assert read_sizes and max(read_sizes) <= CHUNK_ROWS
    assert sum(read_sizes) == (n // 10) * 10
    assert peak < whole / 3, f"peak {peak:,} B for a {whole:,} B image array"


def test_force_replaces_an_existing_export(h5: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert export(h5, out) == 2
    assert_one_line_error(capsys, "--force")
    assert (out / "precious.txt").read_text() == "keep me"
    assert export(h5, out, "--force") == 0
    assert not (out / "precious.txt").exists() and (out / "manifest.csv").is_file()


def test_a_failure_mid_export_leaves_no_output(h5: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing_save(image: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) == 20:
            raise OSError("disk full")
        Image.fromarray(image).save(path)

    monkeypatch.setattr(galaxy10.export, "save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        load_data.main(["--h5", str(h5), "--out", str(tmp_path / "data"), "--workers", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h5"]


class KilledRun(NamedTuple):
    """A script run with a process pool, SIGKILLed mid-way, and what it leaves for the next run."""

    script: str
    flags: list[str]
    out: str
    counts: list[int] | None  # images per class of the input file g.h5, if it reads one
    progress: str  # a glob that matches once the pool is at work
    leftover: str  # the hidden file or folder of the killed run, which the next one removes
    left_by: str  # how the next run names the killed one
    images: int  # images in the complete output


# Each still has far more work than one task per worker when it is killed.
KILLED_RUNS = {
    "export": KilledRun("load_data.py", ["--h5", "g.h5"], "data", [200] * 10,
                        ".data.partial-{pid}/*/*/img_*.png", ".data.partial-{pid}", "an export", 2000),
    "balancing": KilledRun("preprocess_and_balancing.py", ["--h5", "g.h5", "--target", "200"], "bal",
                           [20] * 10, ".bal.partial-{pid}/train/*/aug_*.png", ".bal.partial-{pid}",
                           "an export", 200 + 10 * (200 - 16)),
    "sample": KilledRun("sample_data.py", ["--n", "600", "--image-size", "64"], "s.h5", None,
                        ".s.h5.tmp-{pid}", ".s.h5.tmp-{pid}", "a run", 600),
}
POOL_WORKERS = 3


def pool_processes(pid: int) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The pool workers and the multiprocessing resource tracker that process ``pid`` started."""
    workers, trackers = [], []
    for child in psutil.Process(pid).children():
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:  # it ended meanwhile
            continue
        if "resource_tracker" in command:
            trackers.append(child)
        elif "spawn_main" in command:
            workers.append(child)
    return workers, trackers


def ended(process: psutil.Process) -> bool:
    """Whether it has exited (an orphan may stay a zombie until init reaps it)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def images_in(out: Path) -> int:
    if out.suffix == ".h5":
        with h5py.File(out) as f:
            return len(f["images"])
    return len(read_manifest(out))


@pytest.mark.parametrize("name", KILLED_RUNS)
@pytest.mark.distributed
def test_a_run_killed_mid_way_leaves_no_process_and_the_next_run_cleans_up(name: str, tmp_path: Path) -> None:
    """SIGKILL the main process alone, as an out-of-memory killer or a scheduler does, once its pool works."""
    run = KILLED_RUNS[name]
    if run.counts is not None:
        random_galaxy10(tmp_path / "g.h5", run.counts, size=64)
    command = [sys.executable, str(ROOT / run.script), *run.flags, "--out", run.out,
               "--workers", str(POOL_WORKERS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pool: list[psutil.Process] = []

    def pool_at_work() -> bool:
        workers, trackers = pool_processes(killed.pid)
        pool[:] = [*workers, *trackers]
        return (len(workers) == POOL_WORKERS and len(trackers) == 1
                and any(tmp_path.glob(run.progress.format(pid=killed.pid))))

    kill_when(killed, pool_at_work)
    try:
        deadline = time.monotonic() + 10
        while not all(ended(p) for p in pool) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [repr(p) for p in pool if not ended(p)]
    finally:
        for process in pool:  # never leave orphans of the test running, whatever happened
            if not ended(process):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
    assert survivors == [], "still running 10 s after their parent was killed"
    leftover = tmp_path / run.leftover.format(pid=killed.pid)
    assert leftover.exists()

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not leftover.exists()
    assert [line for line in done.stdout.splitlines() if line.startswith("removed ")] == [
        f"removed {leftover.name} from ., left by {run.left_by} that was killed"
    ]
    assert images_in(tmp_path / run.out) == run.images


def test_only_partial_folders_of_dead_processes_are_removed(h5: Path, tmp_path: Path, capsys) -> None:
    leftovers = [tmp_path / f".data.partial-{dead_pid()}", tmp_path / f".data.partial-{os.getppid()}",
                 tmp_path / ".data.partial-notapid", tmp_path / ".other.partial-999999999"]
    for folder in leftovers:
        folder.mkdir()
    assert export(h5, tmp_path / "data") == 0
    assert [folder.exists() for folder in leftovers] == [False, True, True, True]
    assert f"removed {leftovers[0].name} from {tmp_path}," in capsys.readouterr().out


def test_an_output_a_killed_export_had_replaced_is_removed(h5: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    assert export(h5, out) == 0
    killed = tmp_path / f".data.old-{dead_pid()}"  # killed after its second rename, during the rmtree
    running = tmp_path / f".data.old-{os.getppid()}"  # an export mid-swap: must be kept
    for old in (killed, running):
        (old / "train").mkdir(parents=True)
    capsys.readouterr()
    assert export(h5, out, "--force") == 0
    assert not killed.exists() and running.is_dir()
    assert len(read_manifest(out)) == sum(COUNTS)
    assert f"removed {killed.name} from {tmp_path}, the old data left by an export killed just after " \
           "replacing it\n" in capsys.readouterr().out


def test_an_output_a_killed_export_was_replacing_is_restored(h5: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    assert export(h5, out) == 0
    (out / "notes.txt").write_text("mine")
    pid = dead_pid()
    old, stage = tmp_path / f".data.old-{pid}", tmp_path / f".data.partial-{pid}"
    os.replace(out, old)  # killed between its two renames: out is gone, its stage not yet renamed
    stage.mkdir()
    capsys.readouterr()
    assert export(h5, out) == 2  # restored first, so the output is found and not overwritten
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [
        f"removed {stage.name} from {tmp_path}, left by an export that was killed",
        f"restored {out} from {old.name}, left by an export killed while replacing it",
    ]
    assert printed.err.startswith(f"error: {out} already holds files") and printed.err.count("\n") == 1
    assert (out / "notes.txt").read_text() == "mine" and len(read_manifest(out)) == sum(COUNTS)
    assert not old.exists() and not stage.exists()
    assert export(h5, out) == 2
    assert capsys.readouterr().out == ""  # nothing left to clean up or restore


def test_a_process_of_another_user_counts_as_alive(monkeypatch) -> None:
    def not_permitted(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    assert files.process_alive(os.getpid())
    monkeypatch.setattr(files.os, "kill", not_permitted)
    assert files.process_alive(1)


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path, capsys) -> None:
    assert export(tmp_path / "nope.h5", tmp_path / "out") == 2
    assert_one_line_error(capsys, "not found", "sample_data.py")


def test_not_hdf5(tmp_path: Path, capsys) -> None:
    (tmp_path / "g.h5").write_text("these are not the galaxies you are looking for")
    assert export(tmp_path / "g.h5", tmp_path / "out") == 2
    assert_one_line_error(capsys, "not an HDF5 file")


@pytest.mark.parametrize("keep", [0.3, 0.8, 0.97])
def test_truncated_file(h5: Path, tmp_path: Path, capsys, keep: float) -> None:
    cut = tmp_path / "cut.h5"
    data = h5.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    assert export(cut, tmp_path / "out") == 2
    assert_one_line_error(capsys, "download it again")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"ans": None}, ["lacks", "ans"]),
        ({"redshift": None, "ra": None}, ["lacks", "ra", "redshift"]),
        ({"images": np.zeros((4, 32, 32), np.uint8)}, ["shape", "(N, H, W, 3)"]),
        ({"images": np.zeros((4, 32, 32, 4), np.uint8)}, ["shape"]),
        ({"images": np.zeros((4, 32, 32, 3), np.float32)}, ["float32", "uint8"]),
        ({"ans": np.zeros(5, np.uint8)}, ["`ans`", "shape"]),
        ({"ans": np.array([0, 1, -1, 3], np.int16)}, ["label -1"]),
        ({"ans": np.array([0.0, 1.0, 2.0, 3.0])}, ["float64", "integer"]),
        ({"dec": np.zeros(3)}, ["`dec`", "shape"]),
    ],
)
def test_malformed_datasets(tmp_path: Path, capsys, override: dict, words: list[str]) -> None:
    h5 = write_galaxy10(tmp_path / "g.h5", np.zeros((4, 32, 32, 3), np.uint8),
                        np.array([0, 1, 2, 3], np.uint8), **override)
    assert export(h5, tmp_path / "out") == 2
    assert_one_line_error(capsys, *words)
    assert not (tmp_path / "out").exists()


def test_bad_flags(h5: Path, tmp_path: Path, capsys) -> None:
    assert export(h5, tmp_path / "out", "--val-size", "1.5") == 2
    assert_one_line_error(capsys, "--val-size")
    assert run_cli(load_data.main, ["--h5", str(h5), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert_one_line_error(capsys, "--workers")


def test_verify_compares_the_official_checksum(h5: Path, tmp_path: Path, capsys) -> None:
    assert export(h5, tmp_path / "out", "--verify") == 2
    assert_one_line_error(capsys, "SHA-256", dataset.OFFICIAL_SHA256)
    galaxy10.export.verify_checksum(h5, hashlib.sha256(h5.read_bytes()).hexdigest())  # passes


# ---------------------------------------------------------------- the script


def test_help_names_every_flag_and_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """(Every script's --help and import side effects, in fresh interpreters: test_scripts.py.)"""
    with pytest.raises(SystemExit) as exit_info:
        load_data.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--h5", "--out", "--val-size", "--seed", "--workers", "--force", "--verify", "--download"):
        assert flag in help_text
    assert "default: Galaxy10_DECals.h5" in help_text and "default: data" in help_text


def test_real_galaxies_round_trip_pixel_for_pixel(real_galaxies, tmp_path: Path) -> None:
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in real_galaxies])
    labels = np.array([label for _, label in real_galaxies], np.uint8)
    assert images.shape == (60, 256, 256, 3)
    h5 = write_galaxy10(tmp_path / "real.h5", images, labels)
    assert export(h5, tmp_path / "data", "--val-size", "0.5") == 0
    rows = read_manifest(tmp_path / "data")
    assert len(rows) == 60 and sum(r["split"] == "val" for r in rows) == 30
    for row in rows:
        exported = np.asarray(Image.open(tmp_path / "data" / row["path"]))
        assert np.array_equal(exported, images[int(row["index"])])


def test_an_export_of_the_built_in_sample_says_it_is_synthetic_and_training_records_it(
    tmp_path: Path
) -> None:
    """sample_data.py marks its file; the export says so beside its manifest; a run on it records it."""
    from galaxy10 import data

    h5 = synthetic.write_sample(tmp_path / "sample.h5", n=60, image_size=64, workers=1, progress=False)
    assert dataset.open_galaxy10(h5).synthetic
    assert run_cli(load_data.main, ["--h5", str(h5), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["synthetic"] is True
    scan = data.scan_image_folder(tmp_path / "out" / "train")
    trained_on = data.training_data(scan)
    assert trained_on.synthetic is True and trained_on.images == len(scan.paths)
    assert trained_on.describe() == f"the built-in synthetic sample ({len(scan.paths)} images)"


def test_a_file_of_other_classes_exports_them_by_their_labels(tmp_path: Path) -> None:
    """Not Galaxy10's ten classes (here three, one of them numbered 12): the folders and the manifest name
    them by their labels, as training will."""
    h5 = random_galaxy10(tmp_path / "three.h5", [6, 6])
    with h5py.File(h5, "r+") as f:
        labels = f["ans"][()]
        labels[labels == 1] = 12
        labels[:3] = 5
        f["ans"][...] = labels
    assert export(h5, tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["0", "12", "5"]
    assert {row["class_name"] for row in read_manifest(tmp_path / "out")} == {"0", "5", "12"}
