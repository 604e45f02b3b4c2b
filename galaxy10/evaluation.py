"""How well a model does, and how far to trust it, measured on the model users get: the served forward pass
(inference.InferenceModel: BatchNorm folded, bfloat16 where the CPU has it, near ties settled in float32)
run over a decoded folder (data.ImageCache). Training's closing report, `cnn.py --evaluate` and
`cnn.py --calibrate` all go through here, so the accuracy a report gives is the share of correct answers
`cnn_use_model.py` gives on the same images; `--precision fp32` measures what `--exact` serves.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from galaxy10 import trust
from galaxy10.config import Config
from galaxy10.data import ImageCache, build_cache, class_names_for, iterate_batches, scan_image_folder
from galaxy10.distributed import select_device
from galaxy10.inference import InferenceModel
from galaxy10.models import Checkpoint, ModelRecord, output_path, read_checkpoint
from galaxy10.progress import progress_bar
from galaxy10.reports import expected_calibration_error, write_report
from galaxy10.run import eval_batch_size


def exact_for(precision: str) -> bool:
    """Whether a run's --precision asks for the float32 model (`--exact`); auto and bf16 measure what
    cnn_use_model.py serves by default."""
    return precision == "fp32"


def served_model(checkpoint: Checkpoint, name: str, device: torch.device) -> InferenceModel:
    """The model cnn_use_model.py would serve from this checkpoint, computing every stage's features (what the
    unlike-training statistics are fitted on)."""
    return InferenceModel(checkpoint, name, device, all_features=True)


def served_logits(model: InferenceModel, cache: ImageCache, batch_size: int, exact: bool, desc: str
                  ) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Every cached image's features (per member, one (N, D) tensor per space, of the image as it is) and
    the logits before calibration of every member (and view, for a model that answers with the 8 flips and
    quarter turns averaged): (M or 8M, N, C), from the served forward pass, in cache order, on the CPU."""
    tta = model.record.tta
    step = max(1, batch_size // 8) if tta else batch_size
    batches_features, batches_logits = [], []
    with progress_bar(total=len(cache), desc=desc, unit="img") as bar:
        for images, _ in iterate_batches(cache, step):
            features, logits = model.forward(images, tta=tta, exact=exact)
            batches_features.append([[space.cpu() for space in member] for member in features])
            batches_logits.append(logits.float().cpu())
            bar.update(len(images))
    features = [[torch.cat(space) for space in zip(*member, strict=True)]
                for member in zip(*batches_features, strict=True)]
    return features, torch.cat(batches_logits, dim=1)


def served_probabilities(model: InferenceModel, cache: ImageCache, batch_size: int, exact: bool,
                         tta: bool = False) -> torch.Tensor:
    """Every cached image's calibrated probabilities (N, C) as the served model gives them (with `tta`,
    averaged over the 8 flips and quarter turns, in batches of about batch_size views)."""
    step = max(1, batch_size // 8) if tta else batch_size
    desc = "evaluating with the 8 flips and turns" if tta else "evaluating"
    probabilities = []
    with progress_bar(total=len(cache), desc=desc, unit="img") as bar:
        for images, _ in iterate_batches(cache, step):
            probabilities.append(model.classify(images, tta=tta, exact=exact)[0])
            bar.update(len(images))
    return torch.cat(probabilities)


def fitted_trust(model: InferenceModel, train: ImageCache | None, val: ImageCache, batch_size: int,
                 exact: bool) -> tuple[InferenceModel, dict[str, Any]]:
    """The model under a record with a temperature fitted on val and the statistics that flag images unlike
    the training images (train's features thresholded on val, or val's alone, cross-fitted, where there is no
    train: trust.py; a committee's, per member); and what calibration did: the val set's ECE and negative
    log-likelihood before and after."""
    val_features, val_logits = served_logits(model, val, batch_size, exact, "calibrating on val")
    labels = val.labels.cpu()
    temperature = trust.fit_temperature(val_logits, labels)
    if train is not None:
        train_features = served_logits(model, train, batch_size, exact, "training features")[0]
        members = [trust.fit_outliers(fitted, train.labels.cpu(), scored)
                   for fitted, scored in zip(train_features, val_features, strict=True)]
    else:
        members = [trust.fit_outliers_on_val(features, labels) for features in val_features]
    outliers = members[0] if len(members) == 1 else trust.CommitteeOutliers(tuple(members))
    record = dataclasses.replace(model.record, temperature=temperature, outliers=outliers)
    flagged = float(outliers.unlike_members(val_features).float().mean())
    calibration = calibration_report(val_logits, labels, temperature, flagged)
    if isinstance(outliers, trust.Outliers):  # a committee's members each have their own
        calibration["outlier_threshold"] = outliers.threshold
    return model.with_record(record), calibration


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, temperature: float, flagged: float
                       ) -> dict[str, Any]:
    """What calibration did to these images' answers (ECE and NLL at T = 1 and at the fitted T) with the
    share of them flagged unlike-training, printed in one line (and a warning where it made ECE worse)."""
    ece = [expected_calibration_error(labels.numpy(), trust.calibrated(logits, t).double().numpy())
           for t in (1.0, temperature)]
    calibration = {"temperature": temperature, "ece_before": ece[0], "ece_after": ece[1],
                   "nll_before": trust.nll(logits, labels),
                   "nll_after": trust.nll(logits, labels, temperature),
                   "val_flagged_unlike_training": flagged}
    print(f"calibration on {len(labels)} images: temperature {temperature:.3f}, ECE {ece[0]:.3f} -> "
          f"{ece[1]:.3f}, NLL {calibration['nll_before']:.3f} -> {calibration['nll_after']:.3f}; "
          f"{calibration['val_flagged_unlike_training']:.1%} of them flagged unlike-training")
    if ece[1] > ece[0]:
        print(f"warning: calibration made the ECE worse on these {len(labels)} images ({ece[0]:.3f} -> "
              f"{ece[1]:.3f}; the temperature minimises the negative log-likelihood, "
              f"{calibration['nll_before']:.3f} -> {calibration['nll_after']:.3f}): too few images to "
              "calibrate by, so read the confidences as rough", file=sys.stderr)
    return calibration


def write_evaluation(model: InferenceModel, val: ImageCache, model_path: str, batch_size: int,
                     context: dict[str, Any], exact: bool) -> dict[str, Any]:
    """The served model's report on the val cache (its figures: as it answers by default), with and without
    test-time augmentation, beside model_path."""
    truth = val.labels.cpu().numpy()
    probs = served_probabilities(model, val, batch_size, exact, tta=False).double().numpy()
    tta = served_probabilities(model, val, batch_size, exact, tta=True).double().numpy()
    context = {**context, "exact": exact}
    return write_report(truth, probs, tta, model.class_names, model_path, context,
                        served_tta=model.record.tta)


# ---------------------------------------------------------------- --evaluate and --calibrate


def checkpoint_on_val(config: Config) -> tuple[Checkpoint, InferenceModel, ImageCache, int]:
    """An existing checkpoint, its served model, config.val_dir decoded as the checkpoint's record says (its
    classes checked against the folders') and the batch size, for --evaluate and --calibrate."""
    device = select_device(config.device)
    checkpoint = read_checkpoint(config.model_path)
    record = checkpoint.record
    scan = scan_image_folder(config.val_dir)
    record.check_classes(class_names_for(scan.classes, config.class_names), config.val_dir, config.model_path)
    model = served_model(checkpoint, str(config.model_path), device)
    val = build_cache(scan, record.preprocessing, device, config.workers, "decoding val",
                      config.skip_unreadable)
    return checkpoint, model, val, eval_batch_size(config.batch_size, device)


def evaluate_checkpoint(config: Config) -> dict[str, Any]:
    """--evaluate: the report of an existing checkpoint on config.val_dir, with the checkpoint's own image
    size, crop, classes and calibration."""
    checkpoint, model, val, batch_size = checkpoint_on_val(config)
    record = checkpoint.record
    context = {"epoch": record.metrics.epoch, "val_dir": config.val_dir, "recipe": record.recipe}
    return write_evaluation(model, val, config.model_path, batch_size, context, exact_for(config.precision))


def calibrate_checkpoint(config: Config) -> dict[str, Any]:
    """--calibrate: fit the temperature and the outlier statistics of an existing checkpoint (the original's
    included) on config.val_dir, and write them with its weights to <stem>.calibrated.pth, never over it."""
    checkpoint, model, val, batch_size = checkpoint_on_val(config)
    exact = exact_for(config.precision)
    model, calibration = fitted_trust(model, None, val, batch_size, exact)
    calibrated = output_path(config.model_path, "calibrated.pth")
    Checkpoint(model.record, checkpoint.weights, checkpoint.training).save(calibrated)
    print(f"wrote {calibrated}")
    context = {"epoch": model.record.metrics.epoch, "val_dir": config.val_dir, "recipe": model.record.recipe,
               "calibration": calibration}
    return write_evaluation(model, val, str(calibrated), batch_size, context, exact)


def record_evaluated(record: ModelRecord, report: dict[str, Any]) -> ModelRecord:
    """The record with the accuracy its report measured on the served model (what /api/models shows)."""
    return record.with_metrics(val_acc=report["accuracy"])
