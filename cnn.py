"""Training: DeepCNN-5Block (or another --arch) on class folders of galaxy images, with early stopping.

    python cnn.py                      # the original configuration: balanced_data/, 256 px
    python cnn.py --preset cpu         # a CPU-sized profile: 64 px, 6 epochs (the demo's)
    python cnn.py --recipe original    # the original project's initialisation, optimiser and schedule
    python cnn.py --resume --model-path model.pth   # continue an interrupted run, with its own settings
    python cnn.py --init-from model.pth   # fine-tune any checkpoint, the original project's included
    python cnn.py --evaluate --model-path based_on_balanced_data_model.pth   # report only
    torchrun --nproc_per_node 4 cnn.py   # data-parallel on 4 GPUs: 4 x 32 images a step

Every image is decoded once into a uint8 tensor cache (on the GPU when it fits); batches are sliced from it
and augmented on the device, so no PIL work happens per step. Beside the checkpoint (the best epoch by
validation loss) it writes ``<stem>.history.json``, ``<stem>.curves.png``, ``<stem>.report.json`` and
``<stem>.confusion.png``, and while training ``<stem>.resume.pth``.

This is the entry point; the rest of training lives by concern: the flags, presets and recipes in
config.py, the image folders and cache in data.py, augmentation in augment.py, the loop in training.py,
the reports in reports.py, torchrun's helpers in distributed.py, and what a model is in models.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

import trust
from config import Config, given_flags, parse_config, resolve_precision, resumed_config
from data import (
    FolderScan,
    ImageCache,
    build_cache,
    check_classes,
    class_names_for,
    scan_image_folder,
    training_data,
)
from distributed import (
    from_main_process,
    is_main_process,
    launched_by_torchrun,
    main_process_prints,
    select_device,
    torchrun_group,
    world_size,
)
from galaxy10 import Galaxy10Error, run_cli
from models import (  # CNNModel and load_checkpoint: public names of cnn since the original
    Checkpoint,
    CNNModel,  # noqa: F401
    ModelRecord,
    load_checkpoint,  # noqa: F401
    output_path,
    read_checkpoint,
    read_record,
    resume_path,
)
from networks import last_linear_name
from reports import expected_calibration_error, write_curves, write_report
from training import (
    Run,
    eval_batch_size,
    make_run,
    new_record,
    predict_features,
    predict_logits,
    predict_tta,
    restore,
    train_epochs,
)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    if config.evaluate or config.calibrate:
        flag = "--evaluate" if config.evaluate else "--calibrate"
        if launched_by_torchrun():
            raise Galaxy10Error(f"{flag} runs in one process: use `python cnn.py {flag}`, not torchrun")
        evaluate_checkpoint(config) if config.evaluate else calibrate_checkpoint(config)
        return
    if config.sync_bn and launched_by_torchrun() and select_device(config.device).type != "cuda":
        raise Galaxy10Error("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); drop it "
                            "on CPU")
    with training_processes(config.device):
        config = resume_after_restart(config)
        if config.resume:
            config = resumed_config(saved_settings(config.model_path), given_flags(argv))
        fit(config)


def fit(config: Config) -> dict[str, Any]:
    """Train as configured (with `config.resume`, continue its interrupted run); returns the evaluation
    report of the best epoch on the val set."""
    device = training_device(config.device)
    config = config.resolve(device)
    train_scan, val_scan = scan_image_folder(config.train_dir), scan_image_folder(config.val_dir)
    check_classes(train_scan, val_scan, config.num_classes)
    check_images_per_process(train_scan, val_scan)
    class_names = class_names_for(train_scan.classes, config.class_names)
    record = new_record(config, class_names, training_data(train_scan))
    initial = initial_weights(config, record)
    train = build_cache(train_scan, record.preprocessing, device, config.workers, "decoding train")
    val = build_cache(val_scan, record.preprocessing, device, config.workers, "decoding val")
    print(f"train {len(train)} images ({train.where}), val {len(val)} images ({val.where}), "
          f"{record.num_classes} classes, device {device.type}, {config.precision}, {config.arch}, "
          f"crop {config.crop:g}, augmentation {config.augment}")
    if world_size() > 1:
        print(f"{world_size()} processes, {world_size()} x {config.batch_size} images per step")
    run = make_run(config, device, record, train, val)
    if config.resume:
        resumed = read_checkpoint(resume_path(config.model_path))
        resumed.record.check_classes(record.class_names, config.train_dir, resume_path(config.model_path))
        restore(run, resumed)
        print(f"resuming after epoch {run.epoch} of {config.num_epochs}")
    elif initial is not None:
        start_from(run, initial, config.init_from)
    started, first_epoch = time.perf_counter(), run.epoch
    try:
        train_epochs(run)
    finally:
        if run.history["val_loss"] and is_main_process():
            write_curves(run.history, run.stopper.best_epoch, config.model_path)
    if not is_main_process():
        return from_main_process(None)  # the report, once rank 0 has written it
    # Training and validation time of this run's epochs, and training images per second over them (each
    # epoch takes the whole training set, shared among the processes under torchrun).
    seconds = time.perf_counter() - started
    best = finish_checkpoint(run.config.model_path, run.history, run.epoch)
    run.model.load_state_dict(best.weights)
    best.record, calibration = fitted_trust(best.record, run.model, train, val, run.eval_batch_size)
    best.save(config.model_path)
    resume_path(config.model_path).unlink(missing_ok=True)
    context = {"epoch": best.record.metrics.epoch, "val_dir": config.val_dir, "recipe": config.recipe,
               "train_seconds": seconds,
               "train_images_per_s": len(train) * (run.epoch - first_epoch) / seconds,
               "calibration": calibration}
    report = write_evaluation(run.model, val, best.record, config.model_path, run.eval_batch_size, context,
                              config.bf16)
    return from_main_process(report)


def evaluate_checkpoint(config: Config) -> dict[str, Any]:
    """--evaluate: the report of an existing checkpoint on config.val_dir, with the checkpoint's own image
    size, crop and classes."""
    checkpoint, model, val, device = checkpoint_on_val(config)
    record = checkpoint.record
    context = {"epoch": record.metrics.epoch, "val_dir": config.val_dir, "recipe": record.recipe}
    bf16 = resolve_precision(config.precision, device, record.arch) == "bf16"
    return write_evaluation(model, val, record, config.model_path, eval_batch_size(config.batch_size, device),
                            context, bf16)


def calibrate_checkpoint(config: Config) -> dict[str, Any]:
    """--calibrate: fit the temperature and the outlier statistics of an existing checkpoint (the original's
    included) on config.val_dir, and write them with its weights to <stem>.calibrated.pth, never over it."""
    checkpoint, model, val, device = checkpoint_on_val(config)
    record = checkpoint.record
    batch_size = eval_batch_size(config.batch_size, device)
    checkpoint.record, calibration = fitted_trust(record, model, None, val, batch_size)
    calibrated = output_path(config.model_path, "calibrated.pth")
    checkpoint.save(calibrated)
    context = {"epoch": record.metrics.epoch, "val_dir": config.val_dir, "recipe": record.recipe,
               "calibration": calibration}
    bf16 = resolve_precision(config.precision, device, record.arch) == "bf16"
    print(f"wrote {calibrated}")
    return write_evaluation(model, val, checkpoint.record, str(calibrated), batch_size, context, bf16)


def checkpoint_on_val(config: Config) -> tuple[Checkpoint, nn.Module, ImageCache, torch.device]:
    """An existing checkpoint, its model on the device, and config.val_dir decoded as the checkpoint's record
    says (its classes checked against the folders'), for --evaluate and --calibrate."""
    device = select_device(config.device)
    checkpoint = read_checkpoint(config.model_path)
    record = checkpoint.record
    scan = scan_image_folder(config.val_dir)
    record.check_classes(class_names_for(scan.classes, config.class_names), config.val_dir, config.model_path)
    model = checkpoint.model().to(device, memory_format=torch.channels_last)
    val = build_cache(scan, record.preprocessing, device, config.workers, "decoding val")
    return checkpoint, model, val, device


def fitted_trust(record: ModelRecord, model: nn.Module, train: ImageCache | None, val: ImageCache,
                 batch_size: int) -> tuple[ModelRecord, dict[str, Any]]:
    """The record with a temperature fitted on val and the statistics that flag images unlike the training
    images (train's features thresholded on val, or val's alone, cross-fitted, where there is no train:
    trust.py); and what calibration did: the val set's ECE and negative log-likelihood before and after."""
    val_features, val_logits = predict_features(model, val, batch_size)
    labels = val.labels.cpu()
    temperature = trust.fit_temperature(val_logits, labels)
    if train is not None:
        train_features = predict_features(model, train, batch_size)[0]
        outliers = trust.fit_outliers(train_features, train.labels.cpu(), val_features)
    else:
        outliers = trust.fit_outliers_on_val(val_features, labels)
    ece = [expected_calibration_error(labels.numpy(), (val_logits / t).softmax(1).double().numpy())
           for t in (1.0, temperature)]
    calibration = {"temperature": temperature, "ece_before": ece[0], "ece_after": ece[1],
                   "nll_before": trust.nll(val_logits, labels),
                   "nll_after": trust.nll(val_logits, labels, temperature),
                   "outlier_threshold": outliers.threshold,
                   "val_flagged_unlike_training": float(outliers.unlike(val_features).float().mean())}
    print(f"calibration on {len(labels)} val images: temperature {temperature:.3f}, ECE {ece[0]:.3f} -> "
          f"{ece[1]:.3f}, NLL {calibration['nll_before']:.3f} -> {calibration['nll_after']:.3f}; "
          f"{calibration['val_flagged_unlike_training']:.1%} of them flagged unlike-training")
    return dataclasses.replace(record, temperature=temperature, outliers=outliers), calibration


def write_evaluation(model: nn.Module, val: ImageCache, record: ModelRecord, model_path: str, batch_size: int,
                     context: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """The model's report on the val cache, with the record's calibration, with and without test-time
    augmentation, beside model_path."""
    truth = val.labels.cpu().numpy()
    probs = (predict_logits(model, val, batch_size, bf16) / record.temperature).softmax(1).cpu().numpy()
    tta = predict_tta(model, val, batch_size, bf16, record.temperature).cpu().numpy()
    return write_report(truth, probs, tta, record.class_names, model_path, context)


def finish_checkpoint(model_path: str, history: dict[str, list[float]], epochs: int) -> Checkpoint:
    """The best checkpoint with the whole history and the epoch count."""
    best = read_checkpoint(model_path)
    assert best.training is not None  # cnn.py's model checkpoints keep the optimiser and history
    best.training.history = history
    best.record = best.record.with_metrics(epochs_trained=epochs)
    return best


def initial_weights(config: Config, record: ModelRecord) -> dict[str, torch.Tensor] | None:
    """--init-from's weights, checked against the run before any image is decoded: the same network at the
    same size. Trained on other classes, all but its output layer (fine-tuning onto new labels). A resumed run
    continues from its own weights instead."""
    if not config.init_from or config.resume:
        return None
    checkpoint = read_checkpoint(config.init_from, mmap=True)
    checkpoint.record.check_network(config.arch, config.image_size, "--init-from", config.init_from)
    if checkpoint.record.class_names == record.class_names:
        return checkpoint.weights
    with torch.device("meta"):  # names only: no memory, no initialisation work
        output = f"{last_linear_name(record.build())}."
    return {name: tensor for name, tensor in checkpoint.weights.items() if not name.startswith(output)}


def start_from(run: Run, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load --init-from's weights into the run's model and say in one line what was kept and what is new."""
    missing, _ = run.model.load_state_dict(weights, strict=False)
    if not missing:
        print(f"starting from the weights of {source}")
        return
    classes = run.record.class_names
    print(f"starting from {source}: kept its network ({len(weights)} tensors); new: the output layer for "
          f"{len(classes)} classes ({', '.join(classes)})" + (", the only layer trained (--freeze-body)"
                                                            if run.config.freeze_body else ""))


def saved_settings(model_path: str) -> dict[str, Any]:
    """The settings of the interrupted run whose resume file sits beside model_path."""
    path = resume_path(model_path)
    if not path.is_file():
        raise Galaxy10Error(f"--resume: {path} not found; it is written after each epoch and removed when "
                            "a run finishes, so start without --resume (or check --model-path)")
    settings = read_record(path).settings
    if not settings:
        raise Galaxy10Error(f"--resume: {path} holds no settings of its run: start without --resume")
    return dict(settings)


def training_device(name: str) -> torch.device:
    """The device to train on; on CUDA with the fast kernels: cuDNN autotuning for the fixed batch shapes,
    TF32 matrix products (training runs under bf16 autocast there anyway)."""
    device = select_device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return device


# ---------------------------------------------------------------- several processes (torchrun)


@contextlib.contextmanager
def training_processes(device: str) -> Iterator[None]:
    """Under torchrun, join the other processes (NCCL on CUDA, one GPU each by LOCAL_RANK; gloo on CPU) and
    print on rank 0 only. A single process is left as it is."""
    with torchrun_group(device, gpu_collectives=True), main_process_prints():
        yield


def resume_after_restart(config: Config) -> Config:
    """When torchrun restarts the processes (--max-restarts) after one died, continue from the resume file
    the failed attempt left; without one (it died in its first epoch) start again. Rank 0 looks, so all
    processes agree."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restarts or config.resume or not from_main_process(resume_path(config.model_path).is_file()):
        return config
    print(f"torchrun restart {restarts}: continuing from {resume_path(config.model_path)}")
    return dataclasses.replace(config, resume=True)


def check_images_per_process(train: FolderScan, val: FolderScan) -> None:
    """Every process needs at least one training and one validation image."""
    for scan in (train, val):
        if len(scan.paths) < world_size():
            raise Galaxy10Error(f"{scan.root} has {len(scan.paths)} images, fewer than the {world_size()} "
                                "processes; start fewer with torchrun --nproc_per_node")


if __name__ == "__main__":
    sys.exit(run_cli(main))
