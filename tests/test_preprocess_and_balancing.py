"""preprocess_and_balancing.py: same split as load_data.py, balanced classes, seeded copies."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import load_data
import preprocess_and_balancing as pb
from galaxy10 import balancing
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import run_cli

from helpers import assert_one_line_error, dead_pid, file_bytes, random_galaxy10, read_manifest

COUNTS = [6, 9, 14, 11, 3, 10, 9, 13, 7, 9]


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_galaxy10(tmp_path_factory.mktemp("h5") / "g.h5", COUNTS)


def balance(h5: Path, out: Path, *extra: str) -> int:
    return run_cli(pb.main, ["--h5", str(h5), "--out", str(out), "--workers", "1", *extra])


def test_val_is_identical_to_load_data_and_train_keeps_the_originals(h5: Path, tmp_path: Path) -> None:
    assert run_cli(load_data.main, ["--h5", str(h5), "--out", str(tmp_path / "data"), "--workers", "1"]) == 0
    assert balance(h5, tmp_path / "balanced") == 0
    assert file_bytes(tmp_path / "balanced" / "val") == file_bytes(tmp_path / "data" / "val")
    plain_train = file_bytes(tmp_path / "data" / "train")
    balanced_train = file_bytes(tmp_path / "balanced" / "train")
    assert {k: balanced_train[k] for k in plain_train} == plain_train


def test_every_class_reaches_the_largest_class(h5: Path, tmp_path: Path) -> None:
    assert balance(h5, tmp_path / "b") == 0
    train = [len(list((tmp_path / "b" / "train" / str(c)).glob("*.png"))) for c in range(10)]
    originals = [r for r in read_manifest(tmp_path / "b") if r["split"] == "train" and not r["augmentation"]]
    largest = max(sum(1 for r in originals if r["label"] == str(c)) for c in range(10))
    assert train == [largest] * 10


def test_target_sets_the_class_size(h5: Path, tmp_path: Path, capsys) -> None:
    assert balance(h5, tmp_path / "b", "--target", "20") == 0
    assert [len(list((tmp_path / "b" / "train" / str(c)).glob("*.png"))) for c in range(10)] == [20] * 10
    assert balance(h5, tmp_path / "c", "--target", "2") == 2
    assert_one_line_error(capsys, "--target 2", "largest")
    assert not (tmp_path / "c").exists()


def test_manifest_names_each_copys_source(h5: Path, tmp_path: Path) -> None:
    assert balance(h5, tmp_path / "b") == 0
    rows = read_manifest(tmp_path / "b")
    with h5py.File(h5) as f:
        labels = f["ans"][()]
    copies = [r for r in rows if r["augmentation"]]
    originals = [r for r in rows if not r["augmentation"]]
    assert len(originals) == sum(COUNTS)
    assert all(r["source_index"] == r["index"] for r in originals)
    val_rows = {int(r["index"]) for r in originals if r["split"] == "val"}
    for row in copies:
        source = int(row["source_index"])
        assert row["index"] == "" and row["split"] == "train"
        assert labels[source] == int(row["label"]) and row["class_name"] == CLASS_NAMES[int(row["label"])]
        assert source not in val_rows, "a validation image leaked into training"
        assert (tmp_path / "b" / row["path"]).is_file()
        assert Path(row["path"]).name.startswith(f"aug_{row['label']}_")
    # Originals are used evenly: no source is copied twice before all of its class are copied once.
    for label in range(10):
        sources = [int(r["source_index"]) for r in copies if r["label"] == str(label)]
        if sources:
            uses = np.bincount(sources)
            assert uses[uses > 0].max() - uses[uses > 0].min() <= 1


def test_copies_are_seeded_and_independent_of_workers(h5: Path, tmp_path: Path) -> None:
    assert balance(h5, tmp_path / "a") == 0
    assert run_cli(pb.main, ["--h5", str(h5), "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert balance(h5, tmp_path / "c", "--seed", "7") == 0
    assert file_bytes(tmp_path / "a" / "train") != file_bytes(tmp_path / "c" / "train")


def test_the_partial_folder_of_a_killed_run_is_removed_and_a_running_ones_kept(
    h5: Path, tmp_path: Path, capsys
) -> None:
    killed = tmp_path / f".b.partial-{dead_pid()}"
    running = tmp_path / f".b.partial-{os.getppid()}"
    for folder in (killed, running):
        (folder / "train" / "0").mkdir(parents=True)
    assert balance(h5, tmp_path / "b") == 0
    assert not killed.exists() and running.is_dir()
    out = capsys.readouterr().out
    assert f"removed {killed.name} from {tmp_path}, left by an export that was killed" in out


def aug(angle: float, flip: bool = False, brightness: float = 1.0, contrast: float = 1.0
        ) -> balancing.Augmentation:
    return balancing.Augmentation(0, 0, 0, flip, angle, brightness, contrast)


def test_rotations_leave_no_black_corners() -> None:
    sky = np.full((64, 64, 3), 40, np.uint8)
    for angle in (10.0, 30.0, 45.0, 137.0, 222.5):
        assert np.array_equal(balancing.augment(sky, aug(angle)), sky)


def test_quarter_turns_and_flips_are_exact() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(balancing.augment(image, aug(90.0)), np.rot90(image))
    assert np.array_equal(balancing.augment(image, aug(180.0, flip=True)), np.rot90(np.fliplr(image), 2))


def test_brightness_and_contrast_are_mild() -> None:
    image = np.random.default_rng(0).integers(50, 200, (32, 32, 3), dtype=np.uint8)
    brighter = balancing.augment(image, aug(0.0, brightness=1.1))
    assert 1.05 < brighter.mean() / image.mean() < 1.15
    flatter = balancing.augment(image, aug(0.0, contrast=0.9))
    assert 0.85 < flatter.std() / image.std() < 0.95


def test_augmented_real_galaxy_has_no_black_corners(real_galaxies) -> None:
    image = np.asarray(Image.open(real_galaxies[0][0]).convert("RGB"))
    rotated = balancing.augment(image, aug(33.0))
    corner = rotated[:12, :12].mean()
    assert corner > 0.5 * image[:12, :12].mean()
