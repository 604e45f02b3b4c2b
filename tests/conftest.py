"""Fixtures shared by the test files (each file is named after the script it tests); the plain helpers
they use are in helpers.py."""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from galaxy10 import inference
from galaxy10.networks import CNNModel

from helpers import REAL_GALAXY10, colour_folders, spread_checkpoint


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """32 px models gain nothing from threads, and OpenMP threads crawl on a CPU other jobs share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference on the CPU where it would pick a GPU (--device auto), as the tests' float32 references are
    computed; a test that asks for a device by name still gets it."""
    choose = inference.select_device
    monkeypatch.setattr(inference, "select_device",
                        lambda name: torch.device("cpu") if name == "auto" else choose(name))


@pytest.fixture
def no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AVX512-BF16 or AMX, where PyTorch emulates bfloat16 (slower than float32): patched in
    torch itself, so whichever module asks gets the answer."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ folders of two colour classes (4 and 2 images a class) for short training runs."""
    root = tmp_path_factory.mktemp("data")
    colour_folders(root / "train", per_class=4, seed=0)
    colour_folders(root / "val", per_class=2, seed=1)
    return root


@pytest.fixture(scope="session")
def real_galaxies() -> list[tuple[Path, int]]:
    """The 60 real Galaxy10 DECaLS images as (path, label); skips where ../shared is absent."""
    labels = REAL_GALAXY10 / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"{REAL_GALAXY10} is absent (only developers and CI have it)")
    with labels.open(newline="") as f:
        return [(REAL_GALAXY10 / "images" / row["file"], int(row["label"])) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def original_model() -> CNNModel:
    """A seeded 32 px model whose weights the original-checkpoint tests save in the original's layout."""
    torch.manual_seed(3)
    return CNNModel(image_size=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 px spread_checkpoint that the inference and catalog tests of a module share."""
    return spread_checkpoint(tmp_path_factory.mktemp("model") / "model.pth")
