"""Fixtures shared by the test files (each file is named after the script it tests)."""
from __future__ import annotations

import csv
import io
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cnn import CNNModel, checkpoint_metadata, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# ../shared sits beside a developer's checkout and CI's clone; a user's clone has none.
REAL_GALAXY10 = ROOT.parent / "shared" / "real_galaxy10"


def load(path: Path) -> dict:
    """A checkpoint as plain tensors, loaded the safe way every script loads it."""
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """32 px models gain nothing from threads, and OpenMP threads crawl on a CPU other jobs share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real_galaxies() -> list[tuple[Path, int]]:
    """The 60 real Galaxy10 DECaLS images as (path, label); skips where ../shared is absent."""
    labels = REAL_GALAXY10 / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"{REAL_GALAXY10} is absent (only developers and CI have it)")
    with labels.open(newline="") as f:
        return [(REAL_GALAXY10 / "images" / row["file"], int(row["label"])) for row in csv.DictReader(f)]


def write_galaxy10(path: Path, images: np.ndarray, labels: np.ndarray, /, **overrides: np.ndarray) -> Path:
    """Write a Galaxy10-format file from arrays; ``overrides`` replace or (as None) drop datasets."""
    n = len(images)
    rng = np.random.default_rng(0)
    datasets = {
        "images": images,
        "ans": labels,
        "ra": rng.uniform(0, 360, n),
        "dec": rng.uniform(-20, 35, n),
        "redshift": rng.uniform(0.01, 0.25, n),
        "pxscale": np.full(n, 0.262),
    }
    datasets.update(overrides)
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            if data is not None:
                f[name] = data
    return path


def random_galaxy10(path: Path, counts: list[int], size: int = 32, seed: int = 0) -> Path:
    """A small Galaxy10-format file of noise images with ``counts[c]`` images of class c, rows shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.uint8)
    images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
    return write_galaxy10(path, images, labels)


def assert_one_line_error(capsys: pytest.CaptureFixture, *words: str) -> None:
    """Exactly one line says what is wrong (progress bars may come before it), and no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1, err
    for word in words:
        assert word in last, err


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def save_model_checkpoint(path: Path, model: CNNModel, val_acc: float = 0.0) -> Path:
    """Save ``model`` in this project's checkpoint format, as if cnn.py had trained it for one epoch."""
    payload = {
        "epoch": 1,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": {},
        "train_history": {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []},
        "final_val_loss": 0.0,
        "final_val_acc": val_acc,
        **checkpoint_metadata(model.image_size),
    }
    save_checkpoint(payload, path)
    return path


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's weights under the original project's names: its features were five blocks of nine
    layers, each block followed by a max-pool, so flat layer n was ``features.<2 * (n // 10)>.<n % 10>``."""

    def original_name(key: str) -> str:
        parts = key.split(".")
        if parts[0] == "features":
            n = int(parts[1])
            parts[1:2] = [str(2 * (n // 10)), str(n % 10)]
        return ".".join(parts)

    return {original_name(key): value for key, value in state.items()}


def save_original_checkpoint(path: Path, state: dict[str, torch.Tensor], val_acc: float = 0.0) -> Path:
    """Save this project's weights as the original project's cnn.py saved its model after one epoch."""
    payload = {
        "epoch": 2,  # the original stored one more than the epochs it trained
        "model_state_dict": original_layout(state),
        "optimizer_state_dict": {"state": {}, "param_groups": []},
        "train_history": {"train_loss": [2.0], "train_acc": [0.2], "val_loss": [1.9], "val_acc": [val_acc]},
        "final_val_loss": 1.9,
        "final_val_acc": val_acc,
    }
    torch.save(payload, path)
    return path


def biased_checkpoint(path: Path, bias: tuple[float, ...], val_acc: float = 0.0) -> Path:
    """A seeded 32 px model whose last-layer bias sets its confidences (they hardly depend on the image)."""
    torch.manual_seed(0)
    model = CNNModel(image_size=32)
    with torch.no_grad():
        model.classifier[-1].bias.copy_(torch.tensor(bias))
    return save_model_checkpoint(path, model, val_acc)


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: tiny on disk, enormous if decoded."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC
    return bytes(data)


# ---------------------------------------------------------------- images and ports
# Imported here rather than at the top so that this section only appends to the file.
import socket  # noqa: E402


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    """An image encoded in memory (PNG, or any format PIL writes, such as "JPEG")."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    """The first half of an encoded image: its header promises pixels the data no longer holds."""
    return data[: len(data) // 2]


def listening_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port and listening, until the caller closes it.

    The port is held from the moment it is chosen: a server handed this socket (uvicorn's
    ``Server.run(sockets=[sock])``) cannot lose it to another process, as it could if the port were
    found free, let go and bound again.
    """
    return socket.create_server(("127.0.0.1", 0))
