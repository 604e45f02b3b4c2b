"""What `cnn.py` does with its flags: train a model on class folders (`fit`): decode the images once, start
from fresh, --weights or --init-from weights (or continue a --resume file), run the training loop
(training.py), then calibrate the best epoch and report on it as it is served (evaluation.py). Under
torchrun every process runs it; rank 0 writes the files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from galaxy10 import trust
from galaxy10.committee import (
    assign_folds,
    calibrated_outliers,
    committee_checkpoint,
    committee_tta_probabilities,
    member_path,
    out_of_fold,
)
from galaxy10.config import Config, flag_name
from galaxy10.data import (
    FolderScan,
    ImageCache,
    build_cache,
    check_classes,
    class_names_for,
    merge_scans,
    scan_image_folder,
    source_groups,
    training_data,
)
from galaxy10.distributed import (
    from_main_process,
    is_main_process,
    main_process_prints,
    select_device,
    torchrun_group,
    world_size,
)
from galaxy10.errors import Galaxy10Error
from galaxy10.evaluation import exact_for, fitted_trust, record_evaluated, served_model, write_evaluation
from galaxy10.models import Checkpoint, ModelRecord, read_checkpoint, read_record, resume_path
from galaxy10.networks import last_linear_name
from galaxy10.reports import write_committee_curves, write_curves, write_report
from galaxy10.run import Run, eval_batch_size, restore
from galaxy10.training import make_run, new_record, train_epochs


def fit(config: Config) -> dict[str, Any]:
    """Train as configured (with `config.resume`, continue its interrupted run), then calibrate and report on
    the model as it is served; with --folds K, a committee (`fit_committee`). Returns the report."""
    device = training_device(config.device)
    exact = exact_for(config.precision)  # as given: auto reports on the model cnn_use_model.py serves
    config = config.resolve(device)
    train_scan, val_scan = scan_image_folder(config.train_dir), scan_image_folder(config.val_dir)
    check_classes(train_scan, val_scan, config.num_classes)
    check_images_per_process(train_scan, val_scan)
    if config.folds > 1:
        return fit_committee(config, merge_scans(train_scan, val_scan), device, exact)
    class_names = class_names_for(train_scan.classes, config.class_names)
    record = with_lineage(new_record(config, class_names, training_data(train_scan)), config)
    initial = initial_weights(config, record)
    train = build_cache(train_scan, record.preprocessing, device, config.workers, "decoding train",
                        config.skip_unreadable)
    val = build_cache(val_scan, record.preprocessing, device, config.workers, "decoding val",
                      config.skip_unreadable)
    record = trained_on_count(record, len(train))
    print(f"train {len(train)} images ({train.where}), val {len(val)} images ({val.where}), "
          f"{describe_run(config, record, device)}")
    run, seconds, epochs = train_run(config, device, record, train, val, initial[0] if initial else None)
    if not is_main_process():
        return from_main_process(None)  # the report, once rank 0 has written it
    best = finish_checkpoint(config.model_path, run.history, run.epoch)
    model = served_model(best, Path(config.model_path).name, device)
    model, calibration = fitted_trust(model, train, val, run.eval_batch_size, exact)
    context = {"epoch": best.record.metrics.epoch, "val_dir": config.val_dir, "recipe": config.recipe,
               "train_seconds": seconds, "train_images_per_s": len(train) * epochs / seconds,
               "calibration": calibration}
    report = write_evaluation(model, val, config.model_path, run.eval_batch_size, context, exact)
    best.record = record_evaluated(model.record, report)
    best.save(config.model_path)
    resume_path(config.model_path).unlink(missing_ok=True)
    return from_main_process(report)


def describe_run(config: Config, record: ModelRecord, device: torch.device) -> str:
    text = (f"{record.num_classes} classes, device {device.type}, {config.precision}, {config.arch}, "
            f"crop {config.crop:g}, augmentation {config.augment}")
    if world_size() > 1:
        text += f"; {world_size()} processes, {world_size()} x {config.batch_size} images per step"
    return text


def train_run(config: Config, device: torch.device, record: ModelRecord, train: ImageCache, val: ImageCache,
              initial: dict[str, torch.Tensor] | None) -> tuple[Run, float, int]:
    """One run of the training loop (continued from its resume file with config.resume, where there is one;
    else from `initial` weights where given); returns it, the seconds its epochs took (training and
    validation) and how many epochs it trained now."""
    run = make_run(config, device, record, train, val)
    if config.resume and resume_path(config.model_path).is_file():
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
    return run, time.perf_counter() - started, run.epoch - first_epoch


def fit_committee(config: Config, scan: FolderScan, device: torch.device, exact: bool) -> dict[str, Any]:
    """--folds K: K members, member k trained on every fold but k and stopped early on fold k (seed + k), one
    after another (with --resume, finished members are kept and an interrupted one continues); then the
    committee's checkpoint, calibrated and reported on the out-of-fold answers (committee.py)."""
    class_names = class_names_for(scan.classes, config.class_names)
    record = with_lineage(new_record(config, class_names, training_data(scan)), config)
    initial = initial_weights(config, record)
    cache = build_cache(scan, record.preprocessing, device, config.workers, "decoding",
                        config.skip_unreadable)
    record = trained_on_count(record, len(cache))
    groups, copies = (np.array(values) for values in source_groups(scan))
    if cache.kept is not None:  # --skip-unreadable left some out
        groups, copies = groups[cache.kept.numpy()], copies[cache.kept.numpy()]
    folds = assign_folds(cache.labels.cpu().numpy(), groups.tolist(), config.folds, config.seed)
    print(f"a committee of {config.folds}: {len(cache)} images ({cache.where}) in {config.folds} folds, "
          f"{describe_run(config, record, device)}")
    members, seconds = [], 0.0
    for k in range(config.folds):
        held = torch.from_numpy(folds == k)
        path = member_path(config.model_path, k)
        member = dataclasses.replace(config, model_path=str(path), seed=config.seed + k, folds=1)
        done = finished_member(path) if config.resume else None
        if done is None:
            print(f"member {k + 1} of {config.folds}: trains on {int((~held).sum())} images, stops early on "
                  f"fold {k + 1} ({int(held.sum())} images)")
            start = initial[k % len(initial)] if initial else None
            train, val = cache.subset(~held), cache.subset(held)
            run, member_seconds, _ = train_run(member, device, record, train, val, start)
            seconds += member_seconds
            if is_main_process():
                done = finish_checkpoint(member.model_path, run.history, run.epoch)
                done.save(path)
                resume_path(path).unlink(missing_ok=True)
        members.append(done)
    if not is_main_process():
        return from_main_process(None)
    originals = torch.from_numpy(~copies)  # the augmented copies train, and are never scored
    return finish_committee(config, record, members, cache.subset(originals), folds[originals.numpy()],
                            seconds, device, exact)


def finish_committee(config: Config, record: ModelRecord, members: list[Checkpoint], cache: ImageCache,
                     folds: np.ndarray, seconds: float, device: torch.device, exact: bool) -> dict[str, Any]:
    """Calibrate, report and save the committee from its members' out-of-fold answers on the `cache` of
    original images (`folds`: theirs); remove the members' own checkpoints (the committee's holds their
    weights)."""
    batch_size = eval_batch_size(config.batch_size, device)
    oof = out_of_fold(members, cache, folds, batch_size, exact, device)
    labels = cache.labels.cpu()
    temperature, outliers, calibration = calibrated_outliers(oof, labels)
    # out_of_fold ran each image through its member as the committee answers: with the 8 views, the first
    # of which is the image as it is, where the record says so; only the other form needs a pass of its own.
    plain = trust.calibrated(oof.logits[:1], temperature).double().numpy()
    tta = (trust.calibrated(oof.logits, temperature).double() if record.tta else
           committee_tta_probabilities(members, cache, folds, batch_size, exact, device, temperature)).numpy()
    context = {"folds": config.folds, "val_dir": f"{config.train_dir} and {config.val_dir}, out of fold",
               "recipe": config.recipe, "train_seconds": seconds, "calibration": calibration}
    report = write_report(labels.numpy(), plain, tta, record.class_names, config.model_path,
                          {**context, "exact": exact}, "out-of-fold answers (each by the member that never "
                          "saw the image) on", served_tta=record.tta)
    committee = committee_checkpoint(record, members, temperature, outliers, report["accuracy"],
                                     calibration["nll_after"])
    committee.save(config.model_path)
    write_committee_curves([m.training.history for m in members if m.training], config.model_path)
    for k in range(config.folds):
        member_path(config.model_path, k).unlink(missing_ok=True)
    print(f"a committee of {config.folds}: out-of-fold accuracy {report['accuracy']:.2%} after "
          f"{seconds / 60:.1f} minutes of training; wrote {config.model_path}")
    return report


def finished_member(path: Path) -> Checkpoint | None:
    """A member whose run finished (its checkpoint, and no resume file of a run still going), or None."""
    if path.is_file() and not resume_path(path).is_file():
        return read_checkpoint(path)
    return None


def finish_checkpoint(model_path: str, history: dict[str, list[float]], epochs: int) -> Checkpoint:
    """The best checkpoint with the whole history and the epoch count."""
    best = read_checkpoint(model_path)
    assert best.training is not None  # cnn.py's model checkpoints keep the optimiser and history
    best.training.history = history
    best.record = best.record.with_metrics(epochs_trained=epochs)
    return best


def network_of_init_from(config: Config, given: Mapping[str, Any]) -> Config:
    """--init-from M: the run's network, image size and crop are M's unless a flag gives them (one that
    contradicts M is then refused, in one line, before any image is decoded)."""
    if not config.init_from or config.resume:
        return config
    source = read_record(config.init_from)
    inherited = {"arch": source.arch, "image_size": source.image_size, "crop": source.crop}
    changes = {name: value for name, value in inherited.items() if name not in given}
    if changes:
        said = [f"{flag_name(name)} {value:g}" if isinstance(value, float) else f"{flag_name(name)} {value}"
                for name, value in changes.items()]
        print(f"from {config.init_from}: {', '.join(said)}")
    return dataclasses.replace(config, **changes)


def trained_on_count(record: ModelRecord, images: int) -> ModelRecord:
    """The record with the count of images it trains on (the readable ones, with --skip-unreadable)."""
    return dataclasses.replace(record, trained_on=dataclasses.replace(record.trained_on, images=images))


def with_lineage(record: ModelRecord, config: Config) -> ModelRecord:
    """The record of a run started --init-from another model: what that model and its own lineage were
    trained on is kept, so that a fine-tuned model still says its network learned from synthetic galaxies."""
    if not config.init_from or not Path(config.init_from).is_file():
        return record
    source = read_record(config.init_from)
    return dataclasses.replace(record, lineage=(*source.lineage, source.trained_on))


def initial_weights(config: Config, record: ModelRecord) -> list[dict[str, torch.Tensor]] | None:
    """--init-from's weights, checked against the run before any image is decoded: the same network at the
    same size. Trained on other classes, all but its output layer (fine-tuning onto new labels). A resumed run
    continues from its own weights instead."""
    if not config.init_from or config.resume:
        return None
    checkpoint = read_checkpoint(config.init_from, mmap=True)
    checkpoint.record.check_network(config.arch, config.image_size, "--init-from", config.init_from)
    members = checkpoint.member_weights()  # a committee's: member k starts member k (or the one model)
    if checkpoint.record.class_names == record.class_names:
        return members
    with torch.device("meta"):  # names only: no memory, no initialisation work
        output = f"{last_linear_name(record.build())}."
    return [{name: tensor for name, tensor in weights.items() if not name.startswith(output)}
            for weights in members]


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
    """The settings of the interrupted run whose resume file sits beside model_path (a committee's: those of
    its members' files, which record the committee's settings)."""
    path = resume_path(model_path)
    members = sorted(Path(model_path).parent.glob(f"{Path(model_path).stem}.fold*.pth"))
    found = next((p for p in [path, *members] if p.is_file()), None)
    if found is None:
        raise Galaxy10Error(f"--resume: {path} not found; it is written after each epoch and removed when "
                            "a run finishes, so start without --resume (or check --model-path)")
    settings = read_record(found).settings
    if not settings:
        raise Galaxy10Error(f"--resume: {found} holds no settings of its run: start without --resume")
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


