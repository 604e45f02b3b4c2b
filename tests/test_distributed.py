"""cnn.py under torchrun: two CPU processes (gloo) train like one with twice the batch, only rank 0 writes
and shows progress, and a run continues after --resume and after a killed worker (--max-restarts)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import cnn
from galaxy10 import models, training
from galaxy10.config import Config
from galaxy10.data import ImageCache
from galaxy10.errors import run_cli

from helpers import (
    ROOT,
    assert_one_line_error,
    colour_folders,
    load,
    one_thread_env,
    same_weights,
    save_weights,
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = one_thread_env(PYTHONPATH=str(ROOT))
OUTPUTS = {"m.pth", "m.history.json", "m.curves.png", "m.report.json", "m.confusion.png"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_args(data: Path, model_path: Path, batch_size: int, epochs: int, *extra: str) -> list[str]:
    return ["--train-dir", str(data / "train"), "--val-dir", str(data / "val"),
            "--model-path", str(model_path), "--image-size", "32", "--batch-size", str(batch_size),
            "--epochs", str(epochs), "--num-classes", "2", "--workers", "1", "--min-delta", "0",
            "--device", "cpu", *extra]


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
    while not models.resume_path(model_path).exists():
        assert agent.poll() is None, "the run ended before its first epoch did"
        assert time.monotonic() < deadline, "no resume file after 240 s"
        time.sleep(0.02)
    os.kill(worker_pid(agent, rank), signal.SIGKILL)


def worker_pid(agent: subprocess.Popen[str], rank: int) -> int:
    """The pid of torchrun's worker of this rank. Its environment names the rank; a child that exits while
    it is read (psutil then raises) is not that worker, which is still in its second epoch."""
    for child in psutil.Process(agent.pid).children():
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == str(rank):
                return child.pid
    raise AssertionError(f"torchrun has no worker of rank {rank}")


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
    save_weights(path, model.state_dict(), ["0", "1"])  # the class folders' own names
    return path


@pytest.mark.distributed
def test_two_processes_train_like_one_with_twice_the_batch(tmp_path: Path) -> None:
    """With every image the same, each process's BatchNorm statistics over its 2 images equal those over
    all 4 (SyncBatchNorm, which would make that so for any images, has no CPU kernel); with augmentation
    and dropout off, two processes of 2 images a step then compute what one process of 4 does, up to the
    order of float sums. Training amplifies that: one process with 2 threads instead of 1 moves the
    second epoch's loss by 2.5%, hence rtol 0.1; two processes that split the labels otherwise, or do not
    average their gradients, miss it by more than 100%. float32 pinned: bfloat16 rounds each batch's sums
    differently enough (20% in the second epoch) to hide what this test is about."""
    data = tmp_path / "data"
    colour_folders(data / "train", per_class=4, seed=0, same=True)
    colour_folders(data / "val", per_class=1, seed=0, same=True)
    same_start = ["--no-augment", "--no-dropout", "--precision", "fp32",
                  "--init-from", str(confident_start(tmp_path / "start.pth"))]
    assert run_cli(cnn.main, tiny_args(data, tmp_path / "one.pth", 4, 2, *same_start)) == 0
    done = torchrun(tiny_args(data, tmp_path / "two.pth", 2, 2, *same_start))
    assert done.returncode == 0, done.stderr
    one, two = (json.loads(models.output_path(tmp_path / name, "history.json").read_text())
                for name in ("one.pth", "two.pth"))
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=0.1)


@pytest.mark.distributed
def test_a_torchvision_network_trains_under_torchrun_and_starts_the_next(data: Path, tmp_path: Path) -> None:
    """--arch reaches every process: DDP wraps torchvision's network, rank 0 saves it without DDP's prefix,
    and a second two-process run rebuilds it from that checkpoint (--init-from)."""
    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    done = torchrun(tiny_args(data, first, 2, 1, "--arch", "resnet18"))
    assert done.returncode == 0, done.stderr
    done = torchrun(tiny_args(data, second, 2, 1, "--arch", "resnet18", "--init-from", str(first)))
    assert done.returncode == 0, done.stderr
    assert f"starting from the weights of {first}" in done.stdout
    checkpoint = models.read_checkpoint(second)
    assert checkpoint.record.arch == "resnet18"
    assert not any(key.startswith("module.") for key in checkpoint.weights)
    assert checkpoint.model()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


@pytest.mark.distributed
def test_only_rank_0_writes_files_and_shows_progress(uninterrupted: tuple[Path, Path]) -> None:
    model_path, log_dir = uninterrupted
    assert {p.name for p in model_path.parent.iterdir()} == OUTPUTS  # no resume file, no temporary file
    checkpoint = models.read_checkpoint(model_path)
    assert not any(key.startswith("module.") for key in checkpoint.weights)
    assert checkpoint.model()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert checkpoint.record.metrics.epochs_trained == 3 and checkpoint.training is not None
    assert len(checkpoint.training.history["val_loss"]) == 3
    assert "epoch 3/3" in worker_log(log_dir, 0, 0, "stdout")
    assert "decoding train" in worker_log(log_dir, 0, 0, "stderr")
    assert worker_log(log_dir, 0, 1, "stdout") == ""
    assert worker_log(log_dir, 0, 1, "stderr") == ""


# ---------------------------------------------------------------- resuming


@pytest.mark.distributed
def test_resume_under_torchrun_continues_each_process_exactly(
    data: Path, uninterrupted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exact: the resumed processes redo what the uninterrupted ones did, with the same streams, batches and
    thread counts. The same resume file then continues in one process, with the other random streams."""
    model_path = tmp_path / "m.pth"
    agent = subprocess.Popen(torchrun_command(run_args(data, model_path)), env=ENV, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_worker_after_first_epoch(agent, model_path)
    assert agent.wait(timeout=120) != 0
    state = load(models.resume_path(model_path))
    assert state["epoch"] < 3 and len(state["rng_per_process"]) == 2
    one_process = tmp_path / "one" / "m.pth"
    one_process.parent.mkdir()
    shutil.copy(models.resume_path(model_path), models.resume_path(one_process))

    done = torchrun(["--model-path", str(model_path), "--resume"])  # the run's settings are in the file
    assert done.returncode == 0, done.stderr
    assert f"resuming after epoch {state['epoch']} of 3" in done.stdout
    resumed, whole = load(model_path), load(uninterrupted[0])
    assert resumed["train_history"] == whole["train_history"]
    assert same_weights(resumed["model_state_dict"], whole["model_state_dict"])
    assert not models.resume_path(model_path).exists()

    assert run_cli(cnn.main, ["--model-path", str(one_process), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resuming after epoch {state['epoch']} of 3" in out
    assert "holds the random streams of 2 process(es), not 1" in out
    history = load(one_process)["train_history"]
    assert len(history["val_loss"]) == 3
    assert {k: v[: state["epoch"]] for k, v in history.items()} == state["train_history"]
    assert history["train_loss"][state["epoch"]:] != whole["train_history"]["train_loss"][state["epoch"]:]


@pytest.mark.distributed
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
    assert f"torchrun restart 1: continuing from {models.resume_path(model_path)}" in restarted
    assert "resuming after epoch" in restarted
    resumed, whole = load(model_path), load(uninterrupted[0])
    assert resumed["train_history"] == whole["train_history"]
    assert same_weights(resumed["model_state_dict"], whole["model_state_dict"])


# ---------------------------------------------------------------- what each process is given


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    """Each rank's record from tests/distributed_probe.py under torchrun, and rank 0's weights and val set."""
    out = tmp_path_factory.mktemp("probe")
    done = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "distributed_probe.py"), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]
    return records, load(out / "rank-0.pt")


@pytest.mark.distributed
def test_the_images_left_over_sit_out_an_epoch_and_differ_by_permutation(
    probe: tuple[list[dict], dict]
) -> None:
    """9 images, 2 processes: each epoch's seeded permutation gives rank r its elements r, r + 2, ... up to 4
    images, so both take as many steps, and the permutation's last image sits that epoch out."""
    records, _ = probe
    generator = torch.Generator().manual_seed(3)
    for epoch in range(3):
        order = torch.randperm(9, generator=generator).tolist()
        assert [r["taken"][epoch] for r in records] == [order[0:8:2], order[1:8:2]]
        assert set(order) - set(records[0]["taken"][epoch]) - set(records[1]["taken"][epoch]) == {order[8]}


@pytest.mark.distributed
def test_every_process_gets_the_validation_loss_of_the_model_rank_0_saves(
    probe: tuple[list[dict], dict]
) -> None:
    records, rank_0 = probe
    assert records[0]["running_means"] != records[1]["running_means"]  # each trained on its own images
    # Exact: both receive the same all-reduced float64 sums.
    assert records[0]["val_loss"] == records[1]["val_loss"]
    assert records[0]["val_accuracy"] == records[1]["val_accuracy"]
    model = cnn.CNNModel(2, 32)
    model.load_state_dict(rank_0["model"])
    val = ImageCache(rank_0["val_images"], rank_0["val_labels"], torch.device("cpu"))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=Config().label_smoothing)
    loss, accuracy = training.evaluate(model, val, criterion, batch_size=5)
    assert records[0]["val_loss"] == pytest.approx(loss, rel=1e-5)  # the sum over two parts, in float32
    assert records[0]["val_accuracy"] == pytest.approx(accuracy)  # 3 of 5 either way


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
