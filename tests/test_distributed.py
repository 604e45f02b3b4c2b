"""cnn.py under torchrun: two CPU processes (gloo) train like one with twice the batch, only rank 0 writes
and shows progress, and a run continues after --resume and after a killed worker (--max-restarts)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import ROOT, assert_one_line_error, load, same_weights
from PIL import Image

import cnn
from load_data import CLASS_NAMES, run_cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two workers and the agent share a small CI machine
OUTPUTS = {"m.pth", "m.history.json", "m.curves.png", "m.report.json", "m.confusion.png"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_images(root: Path, per_class: int, seed: int, same: bool = False) -> Path:
    """root/{0,1}/img_i.png: noisy red (class 0) and blue (class 1) 32 px squares, or with same=True one
    noisy square under every name, so that nothing but the labels tells the images apart."""
    rng = np.random.default_rng(seed)
    one = rng.normal(128, 40, (32, 32, 3))
    for label, colour in enumerate(((220, 40, 40), (40, 40, 220))):
        folder = root / str(label)
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = one if same else np.array(colour) + rng.normal(0, 25, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i}.png")
    return root


def tiny_args(data: Path, model_path: Path, batch_size: int, epochs: int, *extra: str) -> list[str]:
    return ["--train-dir", str(data / "train"), "--val-dir", str(data / "val"),
            "--model-path", str(model_path), "--image-size", "32", "--batch-size", str(batch_size),
            "--epochs", str(epochs), "--num-classes", "2", "--workers", "1", "--min-delta", "0", *extra]


def torchrun_command(args: list[str], restarts: int = 0, log_dir: Path | None = None) -> list[str]:
    """Two worker processes; with log_dir, each one's stdout and stderr go to files there."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return [*TORCHRUN, "--max-restarts", str(restarts), *logs, str(ROOT / "cnn.py"), *args]


def torchrun(args: list[str], log_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(torchrun_command(args, log_dir=log_dir), env=ENV, capture_output=True, text=True,
                          timeout=300)


def worker_log(log_dir: Path, attempt: int, rank: int, stream: str) -> str:
    """What a worker wrote to stdout or stderr (torchrun's layout: <run id>/attempt_<n>/<rank>/)."""
    (path,) = log_dir.glob(f"*/attempt_{attempt}/{rank}/{stream}.log")
    return path.read_text()


def kill_worker_after_first_epoch(agent: subprocess.Popen[str], model_path: Path, rank: int = 1) -> None:
    """SIGKILL the worker of this rank as soon as the run has written its first resume file."""
    deadline = time.monotonic() + 240
    while not cnn.resume_path(model_path).exists():
        assert agent.poll() is None, "the run ended before its first epoch did"
        assert time.monotonic() < deadline, "no resume file after 240 s"
        time.sleep(0.02)
    (worker,) = [p for p in psutil.Process(agent.pid).children() if p.environ().get("RANK") == str(rank)]
    os.kill(worker.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_images(root / "train", per_class=4, seed=0)
    write_images(root / "val", per_class=2, seed=1)
    return root


def run_args(data: Path, model_path: Path) -> list[str]:
    """The run the resume tests interrupt: two processes of 2 images a step, 2 steps an epoch, 3 epochs,
    with augmentation and dropout, whose streams differ per process."""
    return tiny_args(data, model_path, 2, 3)


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, torchrun log folder) of one uninterrupted two-process run."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out, log_dir = root / "out", root / "logs"
    out.mkdir()
    done = torchrun(run_args(data, out / "m.pth"), log_dir)
    assert done.returncode == 0, done.stderr
    return out / "m.pth", log_dir


# ---------------------------------------------------------------- two processes against one


def confident_start(path: Path) -> Path:
    """A 32 px two-class checkpoint whose classifier is He-initialised: its logits are of order 1, so the
    loss depends on the labels from the first step on (CNNModel's own start keeps the logits near 0 and the
    loss at ln 2 for the first steps, whatever the data)."""
    torch.manual_seed(0)
    model = cnn.CNNModel(2, 32)
    for layer in model.classifier:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    weights = {"model_state_dict": model.state_dict()}
    cnn.save_checkpoint({**cnn.checkpoint_metadata(32, CLASS_NAMES[:2]), **weights}, path)
    return path


def test_two_processes_train_like_one_with_twice_the_batch(tmp_path: Path) -> None:
    """With every image the same, each process's BatchNorm statistics over its 2 images equal those over
    all 4 (SyncBatchNorm, which would make that so for any images, has no CPU kernel); with augmentation
    and dropout off, two processes of 2 images a step then compute what one process of 4 does, up to the
    order of float sums. Training amplifies that: one process with 2 threads instead of 1 moves the
    second epoch's loss by 2.5%, hence rtol 0.1; two processes that split the labels otherwise, or do not
    average their gradients, miss it by more than 100%."""
    data = tmp_path / "data"
    write_images(data / "train", per_class=4, seed=0, same=True)
    write_images(data / "val", per_class=1, seed=0, same=True)
    same_start = ["--no-augment", "--no-dropout", "--init-from", str(confident_start(tmp_path / "start.pth"))]
    assert run_cli(cnn.main, tiny_args(data, tmp_path / "one.pth", 4, 2, *same_start)) == 0
    done = torchrun(tiny_args(data, tmp_path / "two.pth", 2, 2, *same_start))
    assert done.returncode == 0, done.stderr
    one, two = (json.loads(cnn.output_path(tmp_path / name, "history.json").read_text())
                for name in ("one.pth", "two.pth"))
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=0.1)


def test_only_rank_0_writes_files_and_shows_progress(uninterrupted: tuple[Path, Path]) -> None:
    model_path, log_dir = uninterrupted
    assert {p.name for p in model_path.parent.iterdir()} == OUTPUTS  # no resume file, no temporary file
    checkpoint = cnn.load_checkpoint(model_path)
    assert not any(key.startswith("module.") for key in checkpoint["model_state_dict"])
    assert cnn.model_from_checkpoint(checkpoint)(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert checkpoint["epochs_trained"] == 3 and len(checkpoint["train_history"]["val_loss"]) == 3
    assert "epoch 3/3" in worker_log(log_dir, 0, 0, "stdout")
    assert "decoding train" in worker_log(log_dir, 0, 0, "stderr")
    assert worker_log(log_dir, 0, 1, "stdout") == ""
    assert worker_log(log_dir, 0, 1, "stderr") == ""


# ---------------------------------------------------------------- resuming


def test_resume_under_torchrun_continues_each_process_exactly(
    data: Path, uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    model_path = tmp_path / "m.pth"
    agent = subprocess.Popen(torchrun_command(run_args(data, model_path)), env=ENV, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_worker_after_first_epoch(agent, model_path)
    assert agent.wait(timeout=120) != 0
    state = load(cnn.resume_path(model_path))
    assert state["epoch"] < 3 and len(state["rng_per_process"]) == 2

    done = torchrun([*run_args(data, model_path), "--resume"])
    assert done.returncode == 0, done.stderr
    assert f"resuming after epoch {state['epoch']} of 3" in done.stdout
    resumed, whole = load(model_path), load(uninterrupted[0])
    assert resumed["train_history"] == whole["train_history"]
    assert same_weights(resumed["model_state_dict"], whole["model_state_dict"])
    assert not cnn.resume_path(model_path).exists()


def test_a_killed_worker_is_restarted_from_the_resume_file(
    data: Path, uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    model_path, log_dir = tmp_path / "m.pth", tmp_path / "logs"
    command = torchrun_command(run_args(data, model_path), restarts=1, log_dir=log_dir)
    agent = subprocess.Popen(command, env=ENV, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_worker_after_first_epoch(agent, model_path)
    _, stderr = agent.communicate(timeout=240)
    assert agent.returncode == 0, stderr
    restarted = worker_log(log_dir, 1, 0, "stdout")
    assert f"torchrun restart 1: continuing from {cnn.resume_path(model_path)}" in restarted
    assert "resuming after epoch" in restarted
    resumed, whole = load(model_path), load(uninterrupted[0])
    assert resumed["train_history"] == whole["train_history"]
    assert same_weights(resumed["model_state_dict"], whole["model_state_dict"])


# ---------------------------------------------------------------- settings that need one process or a GPU


@pytest.mark.parametrize(("flag", "words"), [("--sync-bn", ("--sync-bn", "CUDA")),
                                             ("--evaluate", ("--evaluate", "one process"))])
def test_settings_torchrun_cannot_honour_on_cpu_are_one_line_errors(
    flag: str, words: tuple[str, ...], data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As torchrun's worker 0 of 2 sees its environment; both are refused before any process group."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    args = [*tiny_args(data, tmp_path / "m.pth", 2, 1, "--device", "cpu"), flag]
    assert run_cli(cnn.main, args) == 2
    assert_one_line_error(capsys, *words)
    assert list(tmp_path.iterdir()) == []
