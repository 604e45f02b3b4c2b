"""The training loop: a `Run` (model, optimiser, schedule, data, random streams, early stopping) made from a
`Config`, trained epoch by epoch (`train_epochs`: train, validate, schedule, keep the best checkpoint and the
resume file through resume.py). Under torchrun every process runs this loop on its share of the data. The
per-epoch validation loss and accuracy here steer early stopping; the figures a run reports are measured on
the model users get, by evaluation.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchsummary import summary

from galaxy10.augment import Mixing, augment, mix_batch
from galaxy10.config import Config, Recipe, resume_command
from galaxy10.data import ImageCache, iterate_batches
from galaxy10.distributed import (
    broadcast_buffers,
    data_parallel,
    is_main_process,
    process_seed,
    seed_dropout_per_process,
    sum_over_processes,
    world_size,
)
from galaxy10.errors import Galaxy10Error
from galaxy10.models import ModelRecord, TrainingData, resume_path
from galaxy10.networks import last_linear_name, load_pretrained
from galaxy10.preprocessing import Preprocessing, to_model_input
from galaxy10.progress import progress_bar
from galaxy10.reports import write_history
from galaxy10.run import (
    CheckpointWriter,
    EarlyStopping,
    Run,
    Scheduler,
    WeightAverage,
    model_checkpoint,
    resume_checkpoint,
)

MAX_GRAD_NORM = 1.0
LR_FACTOR, LR_PATIENCE, MIN_LR = 0.5, 2, 1e-7
LOG_EVERY = 20  # batches between progress-bar refreshes (each one waits for the GPU)




# ---------------------------------------------------------------- optimiser and schedule


def make_optimizer(
    model: nn.Module, recipe: Recipe, lr: float, device: torch.device, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """The recipe's optimiser over the parameters that train (all but a frozen body's), with the recipe's
    weight decay unless one is given."""
    optimizer = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    decay = recipe.weight_decay if weight_decay is None else weight_decay
    return optimizer(trained, lr=lr * recipe.lr_scale, weight_decay=decay, fused=device.type == "cuda")


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int) -> Scheduler:
    """The recipe's learning-rate schedule; a cosine one is planned over ``total_steps`` optimiser steps."""
    if recipe.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=LR_FACTOR, patience=LR_PATIENCE, min_lr=MIN_LR
        )
    warmup = max(1, round(recipe.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Optimiser steps in an epoch over num_images; under torchrun each process takes an equal share."""
    return math.ceil(num_images // world_size() / batch_size)


# ---------------------------------------------------------------- one step, and predictions


def mixed_precision(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast where `bf16`; float32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None,
    augmentation: str = "original",
    bf16: bool = False,
    mixing: Mixing | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a uint8 batch, augmented as `augmentation` says and mixed as `mixing` says
    unless generator is None; returns (loss, correct count: the argmax against each image's own label)
    without waiting for the GPU."""
    x = to_model_input(images)
    targets = labels
    if generator is not None:
        x = augment(x, generator, augmentation)
        if mixing:
            x, targets = mix_batch(x, labels, mixing, generator)
    x = x.contiguous(memory_format=torch.channels_last)
    with mixed_precision(images.device, bf16):
        logits = model(x)
        loss = criterion(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


@torch.inference_mode()
def predict_logits(model: nn.Module, cache: ImageCache, batch_size: int, bf16: bool = False) -> torch.Tensor:
    """fp32 logits for every cached image, in cache order."""
    model.eval()
    outputs = []
    for images, _ in iterate_batches(cache, batch_size):
        with mixed_precision(cache.device, bf16):
            outputs.append(model(to_model_input(images).contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(outputs)


def evaluate(
    model: nn.Module, cache: ImageCache, criterion: nn.Module, batch_size: int, bf16: bool = False
) -> tuple[float, float]:
    """Mean loss and accuracy over the whole cache."""
    logits = predict_logits(model, cache, batch_size, bf16)
    loss = criterion(logits, cache.labels.to(logits.device)).item()
    accuracy = (logits.argmax(1).cpu() == cache.labels.cpu()).float().mean().item()
    return loss, accuracy


# ---------------------------------------------------------------- the run


def new_record(config: Config, class_names: Sequence[str], trained_on: TrainingData | None = None
               ) -> ModelRecord:
    """What the checkpoints of a run of a resolved config (Config.resolve) will say of its model."""
    trained_on = trained_on or TrainingData()
    preprocessing = Preprocessing.for_network(config.arch, config.image_size, config.crop or 1.0)
    return ModelRecord(config.arch, tuple(class_names), preprocessing, precision=config.precision,
                       recipe=config.recipe, trained_on=trained_on, settings=config.settings(),
                       tta=config.serve_tta)


def make_run(config: Config, device: torch.device, record: ModelRecord, train: ImageCache, val: ImageCache
             ) -> Run:
    """A fresh model (from --weights where given), optimiser and schedule for a resolved config; seeded, so
    the same seed gives the same run."""
    torch.manual_seed(config.seed)
    recipe = config.recipe_spec
    model = record.build(head_init=recipe.head_init)
    if config.weights:
        record = dataclasses.replace(record, weights=load_pretrained(model, config.arch, config.weights))
    if config.freeze_body:  # before the summary, which counts the frozen weights as non-trainable
        freeze_all_but_the_output_layer(model)
    print_model_summary(model, config.image_size)
    model = model.to(device, memory_format=torch.channels_last)
    if config.no_dropout:
        switch_off_dropout(model)
    if config.sync_bn and world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_dropout_per_process(config.seed)
    forward = data_parallel(model)
    optimizer = make_optimizer(model, recipe, config.learning_rate, device, config.weight_decay)
    total_steps = config.num_epochs * steps_per_epoch(len(train), config.batch_size)
    return Run(
        config=config,
        device=device,
        record=record,
        model=model,
        forward=torch.compile(forward) if config.compile else forward,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, recipe, total_steps),
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        train=train,
        val=val,
        shuffle_rng=torch.Generator().manual_seed(config.seed),
        augment_rng=torch.Generator(device).manual_seed(process_seed(config.seed, 1)),
        stopper=EarlyStopping(config.patience, config.min_delta),
        mixing=Mixing(config.mixup, config.cutmix, record.num_classes),
        average=WeightAverage(model, config.ema) if config.ema else None,
    )


def print_model_summary(model: nn.Module, image_size: int) -> None:
    """torchsummary's table, computed on CPU in eval mode so it changes no BatchNorm statistics."""
    model.eval()
    summary(model, (3, image_size, image_size), device="cpu")


def freeze_all_but_the_output_layer(model: nn.Module) -> None:
    """--freeze-body: only the output layer's weights train (a linear probe on the network's features)."""
    output = f"{last_linear_name(model)}."
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(output))


def set_train_mode(run: Run) -> None:
    """Training mode (dropout on, BatchNorm learning its statistics), except that a frozen body keeps its
    BatchNorm statistics: the features the output layer learns from stay those of the trained network."""
    run.forward.train()
    if run.config.freeze_body:
        for module in run.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def switch_off_dropout(model: nn.Module) -> None:
    """--no-dropout: every Dropout layer passes its input through."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------- an epoch


def finite(value: float, what: str, run: Run, epoch: int) -> float:
    """Stop with one clear line once the loss is NaN or infinite: the run has diverged."""
    if not math.isfinite(value):
        raise Galaxy10Error(
            f"{what} became {value} in epoch {epoch}: training diverged; "
            f"lower --lr (now {run.config.learning_rate}) or check the images in {run.config.train_dir}"
        )
    return value


def train_one_epoch(run: Run, epoch: int) -> tuple[float, float]:
    """One pass over the shuffled training cache; returns the epoch's mean loss and accuracy."""
    set_train_mode(run)
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), dtype=torch.long, device=run.device)
    seen = 0
    num_batches = steps_per_epoch(len(run.train), run.config.batch_size)
    batches = iterate_batches(run.train, run.config.batch_size, run.shuffle_rng)
    bar = progress_bar(batches, total=num_batches, desc=f"epoch {epoch}/{run.config.num_epochs}",
                       unit="batch", leave=False, disable=not is_main_process())
    for step, (images, labels) in enumerate(bar, 1):
        loss, hits = train_step(run.forward, run.optimizer, run.criterion, images, labels, run.augment_rng,
                                run.config.augment, run.config.bf16, run.mixing)
        if run.average is not None:
            run.average.update(run.model)
        if not isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            run.scheduler.step()
        loss_sum += loss * len(labels)
        correct += hits
        seen += len(labels)
        if step % LOG_EVERY == 0 or step == num_batches:
            mean_loss = finite(loss_sum.item() / seen, "the training loss", run, epoch)
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{correct.item() / seen:.1%}")
    bar.close()
    loss_total, hits_total, seen_total = sum_over_processes([loss_sum, correct, seen], run.device)
    return loss_total / seen_total, hits_total / seen_total


def validate(run: Run) -> tuple[float, float]:
    """Val loss and accuracy of the model rank 0 saves, the same numbers on every process, so all take the
    same schedule and early-stopping decisions. Under torchrun each process evaluates its part of val
    (validation time shrinks with the process count like training time) and the sums are added up."""
    bf16, batch_size = run.config.bf16, run.eval_batch_size
    model = run.forward if run.average is None else run.average.model
    if world_size() == 1:
        return evaluate(model, run.val, run.criterion, batch_size, bf16)
    broadcast_buffers(run.served)
    part = run.val.this_process_part()
    loss, accuracy = evaluate(model, part, run.criterion, batch_size, bf16)
    loss_sum, hits, count = sum_over_processes([loss * len(part), round(accuracy * len(part)), len(part)],
                                               run.device)
    return loss_sum / count, hits / count


def run_epoch(run: Run, epoch: int, writer: CheckpointWriter) -> None:
    """Train, validate, schedule, keep the best checkpoint and the resume state, print one line."""
    started = time.perf_counter()
    train_loss, train_acc = train_one_epoch(run, epoch)
    lr = run.optimizer.param_groups[0]["lr"]  # where a per-step schedule left it; the plateau's is unchanged
    val_loss, val_acc = validate(run)
    finite(val_loss, "the validation loss", run, epoch)
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(val_loss)
    for key, value in (("train_loss", train_loss), ("train_acc", train_acc), ("val_loss", val_loss),
                       ("val_acc", val_acc), ("lr", lr)):
        run.history[key].append(value)
    run.epoch = epoch
    improved = run.stopper.update(val_loss, epoch)
    resume = resume_checkpoint(run)  # on every process: it gathers each one's random streams
    if not is_main_process():
        return
    writer.wait()  # one write in flight at a time bounds the host memory the snapshots take
    if improved:
        writer.save(model_checkpoint(run), run.config.model_path)
    writer.save(resume, resume_path(run.config.model_path))
    write_history(run.history, run.config.model_path)
    print(epoch_line(run, epoch, time.perf_counter() - started, improved), flush=True)


def epoch_line(run: Run, epoch: int, seconds: float, improved: bool) -> str:
    h = run.history
    return (
        f"epoch {epoch}/{run.config.num_epochs}  "
        f"train loss {h['train_loss'][-1]:.4f} acc {h['train_acc'][-1]:.2%}  "
        f"val loss {h['val_loss'][-1]:.4f} acc {h['val_acc'][-1]:.2%}  "
        f"lr {h['lr'][-1]:.2e}  patience {run.stopper.bad_epochs}/{run.stopper.patience}  "
        f"{seconds:.0f}s" + ("  * saved best" if improved else "")
    )


def train_epochs(run: Run) -> None:
    """Epochs until the configured count or early stopping; Ctrl-C keeps the last finished epoch."""
    writer = CheckpointWriter()
    epoch = run.epoch + 1
    try:
        for epoch in range(run.epoch + 1, run.config.num_epochs + 1):
            run_epoch(run, epoch, writer)
            if run.stopper.should_stop:
                print(f"early stopping: val loss has not improved for {run.stopper.patience} epochs")
                break
    except KeyboardInterrupt:
        writer.close()  # the resume file named below must be complete
        if run.epoch and is_main_process():
            print(f"\ninterrupted in epoch {epoch}; epochs 1-{run.epoch} are saved in "
                  f"{resume_path(run.config.model_path)}. Continue with:\n  {resume_command(run.config)}",
                  file=sys.stderr)
        raise
    finally:
        writer.close()
