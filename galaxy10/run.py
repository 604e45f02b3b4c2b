"""One training run: what it holds (`Run`: model, optimiser, schedule, data, random streams, early
stopping, history), what it saves as it goes and reads back to continue: the checkpoint of its best epoch
(`model_checkpoint`), the resume file of its last finished epoch with the optimiser, schedule, early stopping
and every process's random streams (`resume_checkpoint`, `restore`), written on a background thread
(`CheckpointWriter`). training.py makes a run and trains it.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from galaxy10.augment import Mixing
from galaxy10.config import Config
from galaxy10.data import ImageCache
from galaxy10.distributed import gather_from_every_process, rank, world_size
from galaxy10.errors import Galaxy10Error
from galaxy10.models import Checkpoint, ModelRecord, TrainingState, resume_path

# Evaluation keeps no activations, so on a GPU a larger batch fits and keeps it busier; a CPU keeps the
# training batch size, whose activations already fill its caches.
EVAL_BATCH_FACTOR_GPU = 4

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def eval_batch_size(batch_size: int, device: torch.device) -> int:
    return batch_size * EVAL_BATCH_FACTOR_GPU if device.type == "cuda" else batch_size


@dataclass
class EarlyStopping:
    """Stops after `patience` epochs whose val loss is not `min_delta` below the best so far."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, loss: float, epoch: int) -> bool:
        """Record an epoch's val loss; True when it is the new best."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def new_history() -> dict[str, list[float]]:
    return {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": [], "lr": []}


@dataclass
class Run:
    """Everything one training run holds; the fields the resume file restores are marked."""

    config: Config  # resolved: the recipe's crop and augmentation filled in, the precision decided
    device: torch.device
    record: ModelRecord  # what the run's checkpoints say of the model; metrics filled in per checkpoint
    model: nn.Module  # restored
    forward: nn.Module  # the model, in DistributedDataParallel under torchrun, maybe compiled
    optimizer: torch.optim.Optimizer  # restored
    scheduler: Scheduler  # restored
    criterion: nn.Module
    train: ImageCache
    val: ImageCache
    shuffle_rng: torch.Generator  # restored
    augment_rng: torch.Generator  # restored
    stopper: EarlyStopping  # restored
    history: dict[str, list[float]] = field(default_factory=new_history)  # restored
    epoch: int = 0  # last finished epoch; restored
    mixing: Mixing | None = None  # --mixup, --cutmix
    average: WeightAverage | None = None  # --ema; restored

    @property
    def eval_batch_size(self) -> int:
        return eval_batch_size(self.config.batch_size, self.device)

    @property
    def served(self) -> nn.Module:
        """The model that is validated and saved: the weights' average with --ema, else the model."""
        return self.model if self.average is None else self.average.model


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (Polyak averaging), kept as a model of
    its own: updated after every optimiser step with `decay`, warmed up as timm's is (min(decay,
    (1 + t) / (10 + t)) at step t) so that its first epochs are not the random initialisation's."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        pairs = zip(self.model.state_dict().values(), model.state_dict().values(), strict=True)
        for average, current in pairs:
            if average.dtype.is_floating_point:
                average.lerp_(current, 1 - decay)
            else:
                average.copy_(current)


def model_checkpoint(run: Run) -> Checkpoint:
    """The checkpoint of this epoch's model (with --ema, the weights' average): its record with this epoch's
    val metrics, the weights, and the optimiser and history, as the original's checkpoints held them."""
    h = run.history
    record = run.record.with_metrics(epoch=run.epoch, val_loss=h["val_loss"][-1], val_acc=h["val_acc"][-1])
    training = TrainingState(run.optimizer.state_dict(), run.history)
    return Checkpoint(record, run.served.state_dict(), training)


def resume_checkpoint(run: Run) -> Checkpoint:
    """Everything needed to continue after the last finished epoch as if never stopped, every process's
    random streams included."""
    checkpoint = model_checkpoint(run)
    assert checkpoint.training is not None
    checkpoint.weights = run.model.state_dict()  # the weights training continues from
    if run.average is not None:
        checkpoint.training.average = {"weights": run.average.model.state_dict(), "steps": run.average.steps}
    checkpoint.training.scheduler = run.scheduler.state_dict()
    checkpoint.training.early_stopping = dataclasses.asdict(run.stopper)
    checkpoint.training.rng = gather_from_every_process(rng_state(run))
    return checkpoint


def restore(run: Run, checkpoint: Checkpoint) -> None:
    """Continue from a resume file of this run (its settings are the run's: config.resumed_config)."""
    state = checkpoint.training
    if state is None or state.scheduler is None or state.early_stopping is None:
        raise Galaxy10Error(f"{resume_path(run.config.model_path)} is not a resume file: start without "
                            "--resume")
    run.model.load_state_dict(checkpoint.weights)
    if run.average is not None and state.average is not None:
        run.average.model.load_state_dict(state.average["weights"])
        run.average.steps = state.average["steps"]
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    saved = state.early_stopping
    run.stopper = dataclasses.replace(run.stopper, best_loss=saved["best_loss"],
                                      best_epoch=saved["best_epoch"], bad_epochs=saved["bad_epochs"])
    run.history = state.history
    run.epoch = checkpoint.record.metrics.epoch or 0
    restore_rng_of_this_process(run, state.rng or [])


def rng_state(run: Run) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "shuffle": run.shuffle_rng.get_state(),
             "augment": run.augment_rng.get_state(), "device_type": run.device.type}
    if run.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(run: Run, state: dict[str, Any]) -> None:
    """Restore the random streams; the device's streams only when resuming on the same kind of device."""
    torch.set_rng_state(state["torch"])
    run.shuffle_rng.set_state(state["shuffle"])
    if state["device_type"] == run.device.type:
        run.augment_rng.set_state(state["augment"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_of_this_process(run: Run, states: list[dict[str, Any]]) -> None:
    """This process's random streams from a resume file. Written by as many processes as run now, each
    continues its own; by another count, only the shuffling (the same in all) continues, and augmentation
    and dropout keep this run's fresh streams: the processes' shares of the data differ anyway."""
    if len(states) == world_size():
        set_rng_state(run, states[rank()])
        return
    run.shuffle_rng.set_state(states[0]["shuffle"])
    print(f"the resume file holds the random streams of {len(states)} process(es), not {world_size()}: "
          "augmentation and dropout continue with fresh ones")


def to_cpu(obj: Any) -> Any:
    """A CPU copy of nested state, so it can be written while training goes on changing the original."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        return dataclasses.replace(obj, **{f.name: to_cpu(getattr(obj, f.name)) for f in fields if f.init})
    return obj


class CheckpointWriter:
    """Saves checkpoints on a background thread, so a 0.9 GB write does not stall the GPU."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: list[Future[None]] = []

    def save(self, checkpoint: Checkpoint, path: str | os.PathLike[str]) -> None:
        self._pending.append(self._pool.submit(to_cpu(checkpoint).save, path))

    def wait(self) -> None:
        """Block until every write has landed; re-raises a failed write."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()
