"""A committee (`cnn.py --folds K`): K networks, each trained on K-1 folds of the labelled images and stopped
early on its own fold, served as one model (the mean of their calibrated answers). Here: the folds
(`assign_folds`: stratified, an image and the augmented copies made of it always in one fold), the members'
files, and what the out-of-fold answers make of the committee: every image answered by the one member that
never saw it gives the report (accuracy, macro-F1, ECE), the temperature (fitted on all the images instead
of one small split) and each member's unlike-training statistics (`out_of_fold`, `calibrated_outliers`),
and the committee's checkpoint (`committee_checkpoint`). fitting.py trains the members.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from galaxy10 import trust
from galaxy10.data import ImageCache
from galaxy10.errors import Galaxy10Error
from galaxy10.evaluation import calibration_report, served_logits, served_model, served_probabilities
from galaxy10.models import Checkpoint, Metrics, ModelRecord, output_path


def member_path(model_path: str | Path, member: int) -> Path:
    """Where member k's run writes its checkpoint (and, beside it, its resume file, history and curves)."""
    return output_path(model_path, f"fold{member}.pth")


def assign_folds(labels: np.ndarray, groups: list[int], folds: int, seed: int) -> np.ndarray:
    """Each image's fold (0 to folds - 1): about equal folds with each class's share of images, the images
    of one group (an original and its augmented copies) together."""
    from sklearn.model_selection import StratifiedGroupKFold

    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < folds:
        raise Galaxy10Error(f"--folds {folds}: class {classes[counts.argmin()]} has {counts.min()} image(s); "
                            f"every class needs at least {folds} (or use fewer folds)")
    assigned = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class split less evenly than asked is still split
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            assigned[held] = fold
    return assigned


@dataclass
class OutOfFold:
    """Every image's answer from the member that never saw it: the members' logits on their own folds,
    scattered back into image order as a committee of one's (1, N, C), or (8, N, C) for a model that answers
    with the 8 flips and quarter turns averaged, and each member's unlike-training statistics (fitted on its
    training folds' features, thresholded on its own fold's)."""

    logits: torch.Tensor
    outliers: list[trust.Outliers]
    features: list[list[torch.Tensor]]  # per member, its own fold's, for the share flagged


def out_of_fold(members: list[Checkpoint], cache: ImageCache, folds: np.ndarray, batch_size: int,
                exact: bool, device: torch.device) -> OutOfFold:
    """Each member's served answers on its own fold and its statistics (see OutOfFold)."""
    views = 8 if members[0].record.tta else 1
    logits = torch.empty(views, len(cache), len(members[0].record.class_names))
    outliers, features = [], []
    for k, member in enumerate(members):
        served = served_model(member, f"member {k + 1}", device)
        held = torch.from_numpy(folds == k)
        fold_features, fold_logits = served_logits(served, cache.subset(held), batch_size, exact,
                                                   f"member {k + 1}: its fold")
        train = cache.subset(~held)
        train_features = served_logits(served, train, batch_size, exact, f"member {k + 1}: its training")[0]
        logits[:, held] = fold_logits
        outliers.append(trust.fit_outliers(train_features[0], train.labels.cpu(), fold_features[0]))
        features.append(fold_features[0])
    return OutOfFold(logits, outliers, features)


def calibrated_outliers(oof: OutOfFold, labels: torch.Tensor) -> tuple[float, trust.CommitteeOutliers, dict]:
    """The temperature fitted on the out-of-fold answers, the members' statistics as the committee's, and what
    calibration did (each image flagged or not by the member that never saw it)."""
    temperature = trust.fit_temperature(oof.logits, labels)
    flagged = torch.cat([m.unlike(f) for m, f in zip(oof.outliers, oof.features, strict=True)])
    calibration = calibration_report(oof.logits, labels, temperature, float(flagged.float().mean()))
    return temperature, trust.CommitteeOutliers(tuple(oof.outliers)), calibration


def committee_tta_probabilities(members: list[Checkpoint], cache: ImageCache, folds: np.ndarray,
                                batch_size: int, exact: bool, device: torch.device, temperature: float
                                ) -> torch.Tensor:
    """Every image's calibrated probabilities from the member that never saw it, averaged over the 8 flips
    and quarter turns, in image order."""
    probabilities = torch.empty(len(cache), len(members[0].record.class_names), dtype=torch.float64)
    for k, member in enumerate(members):
        served = served_model(member, f"member {k + 1}", device)
        served = served.with_record(dataclasses.replace(served.record, temperature=temperature))
        held = torch.from_numpy(folds == k)
        fold = cache.subset(held)
        probabilities[held] = served_probabilities(served, fold, batch_size, exact, tta=True).double()
    return probabilities


def committee_checkpoint(record: ModelRecord, members: list[Checkpoint], temperature: float,
                         outliers: trust.CommitteeOutliers, accuracy: float, nll: float) -> Checkpoint:
    """One checkpoint of the members' weights, its record the committee's: K members, the out-of-fold
    temperature and statistics, and its out-of-fold accuracy and loss as its metrics."""
    epochs = sum(m.record.metrics.epochs_trained or 0 for m in members)
    record = dataclasses.replace(record, temperature=temperature, outliers=outliers,
                                 metrics=Metrics(None, nll, accuracy, epochs))
    return Checkpoint.committee(record, [m.weights for m in members])
