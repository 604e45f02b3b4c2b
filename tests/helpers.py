"""Plain helpers and constants the test files share (fixtures live in conftest.py): imported as
``from helpers import ...`` (pyproject's pytest pythonpath holds tests/)."""
from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from galaxy10 import models
from galaxy10.config import Config
from galaxy10.data import ImageCache
from galaxy10.dataset import CLASS_NAMES
from galaxy10.models import Checkpoint, Metrics, ModelRecord, TrainingState
from galaxy10.networks import DEFAULT_ARCH, CNNModel
from galaxy10.preprocessing import Preprocessing, to_model_input
from galaxy10.run import Run
from galaxy10.training import make_run, new_record

ROOT = Path(__file__).resolve().parents[1]
# ../shared sits beside a developer's checkout and CI's clone; a user's clone has none.
REAL_GALAXY10 = ROOT.parent / "shared" / "real_galaxy10"
SIZE = 32  # the side of the tests' models: fast on any CPU


def load(path: Path) -> dict:
    """A checkpoint as plain tensors, loaded the safe way every script loads it."""
    return torch.load(path, map_location="cpu", weights_only=True)


def recorded_precision(path: Path) -> str:
    """The precision ("fp32" or "bf16") that a checkpoint cnn.py saved records its run trained in."""
    return models.read_record(path).precision


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_thread_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess of one OpenMP thread each (torchrun's workers and the agent, or
    a script beside the tests, share a small CI machine); ``extra`` adds variables."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


COLOURS = ((220, 40, 40), (40, 40, 220), (40, 200, 40))


def colour_folders(root: Path, classes: tuple[str, ...] = ("0", "1"), per_class: int = 4, seed: int = 0,
                   same: bool = False) -> Path:
    """root/<class>/img_i.png: noisy 32 px squares of one clear colour per class, or with same=True one
    noisy square under every name, so that nothing but the labels tells the images apart."""
    rng = np.random.default_rng(seed)
    one = rng.normal(128, 40, (32, 32, 3))
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = one if same else np.array(COLOURS[label % len(COLOURS)]) + rng.normal(0, 25, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i}.png")
    return root


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


def save_model_checkpoint(path: Path, model: CNNModel, val_acc: float = 0.0) -> Path:
    """Save ``model`` in this project's checkpoint format, as if cnn.py had trained it for one epoch."""
    record = ModelRecord(DEFAULT_ARCH, CLASS_NAMES, Preprocessing(model.image_size),
                         metrics=Metrics(epoch=1, val_loss=0.0, val_acc=val_acc))
    history = {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []}
    Checkpoint(record, model.state_dict(), TrainingState({}, history)).save(path)
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


class MakesDirectory:
    """Unpickled the unsafe way, this runs os.mkdir(path): code a hostile checkpoint could hide."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.path),)


def unsafe_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a checkpoint whose pickle would run os.mkdir(marker) on a plain torch.load."""
    payload = {"architecture": "DeepCNN-5Block", "model_state_dict": {}, "payload": MakesDirectory(marker)}
    torch.save(payload, path)
    return path


def biased_checkpoint(path: Path, bias: tuple[float, ...], val_acc: float = 0.0) -> Path:
    """A seeded 32 px model whose last-layer bias sets its confidences (they hardly depend on the image)."""
    torch.manual_seed(0)
    model = CNNModel(image_size=32)
    with torch.no_grad():
        model.classifier[-1].bias.copy_(torch.tensor(bias))
    return save_model_checkpoint(path, model, val_acc)


def spread_checkpoint(path: Path, seed: int = 0, size: int = SIZE, centred: bool = True) -> Path:
    """A random checkpoint whose last layer is rescaled so that logits spread over a few units, as a
    trained model's do (a freshly initialised one gives every class 0.1000, which would hide any error).
    `centred` also removes the logits' mean over images, so that different images get different classes
    even at 32 px, where a random network's features hardly depend on the image."""
    torch.manual_seed(seed)
    model = CNNModel(image_size=size).eval()
    probe = torch.from_numpy(np.stack([galaxy_array(s, size) for s in range(16)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(to_model_input(probe))
        mean = logits.mean(dim=0) if centred else torch.zeros(logits.shape[1])
        scale = 3.0 / (logits - mean).std()
        model.classifier[-1].weight.mul_(scale)
        model.classifier[-1].bias.copy_(-mean * scale)
    return save_model_checkpoint(path, model)


def galaxy_array(seed: int, size: int = SIZE) -> np.ndarray:
    """A synthetic, asymmetric blob (so rotations change the plain prediction) as uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    sx, sy = rng.uniform(0.05, 0.2, size=2)
    blob = np.exp(-((x - cx) ** 2 / sx**2 + (y - cy) ** 2 / sy**2))
    rgb = blob[..., None] * rng.uniform(120, 255, size=3) + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: tiny on disk, enormous if decoded."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC
    return bytes(data)


# ---------------------------------------------------------------- images and ports


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


# ---------------------------------------------------------------- processes


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes: two folders compare equal only when
    they hold the same files with the same contents, no file missing on either side."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def file_stamp(path: Path) -> tuple[bytes, int, int]:
    """A file's bytes, modification time (ns) and inode: all three stay the same only if nothing wrote the
    file or replaced it (an atomic rewrite changes the inode even with the same bytes)."""
    stat = path.stat()
    return path.read_bytes(), stat.st_mtime_ns, stat.st_ino


def aged(path: Path) -> Path:
    """Set a file's modification time to 2001, so that any later write shows."""
    os.utime(path, ns=(10**18, 10**18))
    return path


def read_manifest(out: Path) -> list[dict[str, str]]:
    """The rows of an export folder's manifest.csv."""
    with (out / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true (polled every 10 ms), and reap it.

    Start ``process`` with ``stdout=subprocess.PIPE`` and ``stderr=subprocess.PIPE`` (or
    ``subprocess.STDOUT``) and leave the pipes to kill_when: from the start, threads read them, so a
    chatty process (progress bars) never stalls on a full pipe; what it printed is shown if the test
    fails and otherwise dropped. The test fails if the process ends before ``ready()`` (also between the
    last poll and the kill: it must die of the SIGKILL) or ``ready()`` stays false for ``timeout``
    seconds. Make ``ready()`` wait for a concrete sign of progress (a file on disk, child processes)
    with plenty of work still ahead, so that the kill lands at the same step every time.
    """
    output, readers = _drain(process)

    def fail(what: str) -> None:
        for reader in readers:  # the last lines; children that hold the pipes could keep them open
            reader.join(timeout=1)
        shown = [f"--- {name} (last 4000 characters) ---\n{b''.join(chunks).decode(errors='replace')[-4000:]}"
                 for name, chunks in output.items()]
        pytest.fail(f"{process.args} {what}\n" + "\n".join(shown), pytrace=False)

    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            fail(f"ended (exit code {process.returncode}) before it was ready")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            fail(f"was not ready after {timeout:g} s")
        time.sleep(0.01)
    process.kill()  # does nothing if it has already ended (and been reaped by poll)
    if process.wait() != -9:  # -9: it died of the SIGKILL, as intended
        fail(f"ended (exit code {process.returncode}) before it was killed")


def _drain(process: subprocess.Popen) -> tuple[dict[str, list[bytes]], list[threading.Thread]]:
    """Read the process's pipes in daemon threads: what each has delivered so far by name, and the threads."""
    if process.stdout is None:
        raise ValueError("kill_when needs a process started with stdout=subprocess.PIPE")
    output: dict[str, list[bytes]] = {}
    readers = []
    for name, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
        if pipe is not None:
            output[name] = []
            readers.append(threading.Thread(target=_read_into, args=(pipe, output[name]), daemon=True))
            readers[-1].start()
    return output, readers


def _read_into(pipe: io.IOBase, chunks: list[bytes]) -> None:
    # read1 hands back whatever has arrived, so a failure shows the output up to that moment; text-mode
    # pipes are read through their byte buffer, which only this thread reads.
    raw = getattr(pipe, "buffer", pipe)
    while chunk := raw.read1(65536):
        chunks.append(chunk)


def new_run(config: Config, class_names: list[str], train: ImageCache, val: ImageCache) -> Run:
    """training.make_run for `config` on the CPU, as cnn.fit makes it: resolved, with its model record."""
    cpu = torch.device("cpu")
    config = config.resolve(cpu)
    return make_run(config, cpu, new_record(config, class_names), train, val)


def save_weights(path: Path, weights: dict[str, torch.Tensor], class_names: Sequence[str] = CLASS_NAMES,
                 arch: str = DEFAULT_ARCH, size: int = 32, crop: float = 1.0) -> Path:
    """A checkpoint of these weights, as cnn.py writes one (without a training state)."""
    record = ModelRecord(arch, tuple(class_names), Preprocessing.for_network(arch, size, crop))
    Checkpoint(record, weights).save(path)
    return path
