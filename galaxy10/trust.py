"""How far to trust an answer. Training fits, on its validation set, a temperature that calibrates the
probabilities (temperature scaling, Guo et al. 2017: softmax(logits / T)) and the statistics that score how
unlike the training set an image is, in the network's own features at every scale: at each resolution of its
body the activations averaged over the image, and its penultimate features, each space's Mahalanobis distance
to the nearest class mean under one shared covariance, combined (Lee et al. 2018's feature ensemble; the
penultimate features alone miss noise and empty sky: docs/results.md, "Trust"); inference applies them.
Every answer also gets its uncertainty: the normalised entropy of its probabilities (0 certain, 1 uniform)
and the margin between its two best classes, and one flag: ok, uncertain (confidence under a threshold) or
unlike-training.
It imports no model code: what it fits and applies travels in the checkpoint's record (models.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

OK, UNCERTAIN, UNLIKE_TRAINING = "ok", "uncertain", "unlike-training"
FLAGS = (OK, UNCERTAIN, UNLIKE_TRAINING)
# A calibrated top probability under this is flagged uncertain: for ten classes the model then gives the
# other nine together more weight than its answer. cnn_use_model.py's --min-confidence changes it.
DEFAULT_MIN_CONFIDENCE = 0.5
# The share of validation galaxies whose distance sets the threshold: about 5% of images like the
# training set are flagged, as the issue asked; docs/results.md gives the share on held-out galaxies.
FLAGGED_SHARE = 0.05
# Shrinkage of each shared covariance toward its mean variance: with a few hundred images and up to 2,048
# features the sample covariance is singular.
SHRINKAGE = 0.1


# The fitted temperature stays within these. On a validation set the model gets entirely right (the
# synthetic sample) the likelihood keeps rising as T falls toward 0, so an unbounded fit would make every
# answer certain; below 1/4 (logits sharpened 4x) a fit is running off, not calibrating.
TEMPERATURE_RANGE = (0.25, 20.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of the calibrated probabilities (one model's
    logits (N, C), or a committee's (M, N, C): see `log_calibrated`) on these labels, within
    TEMPERATURE_RANGE."""
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.nll_loss(log_calibrated(logits, log_t.exp()), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(*TEMPERATURE_RANGE))


def log_calibrated(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """The log of the calibrated class probabilities, over the last axis: log softmax(logits / T) of one
    model's logits (..., C); of a committee's, stacked (M, ..., C), the log of its members' mean. The one
    place a temperature is applied."""
    scaled = F.log_softmax(logits / temperature, dim=-1)
    if logits.dim() < 3:
        return scaled
    return torch.logsumexp(scaled, dim=0) - math.log(len(logits))


def calibrated(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The calibrated class probabilities of one model's logits (..., C) or a committee's (M, ..., C)."""
    return log_calibrated(logits, temperature).exp()


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """The mean negative log-likelihood of the labels under the calibrated probabilities."""
    return float(F.nll_loss(log_calibrated(logits.double(), temperature), labels))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """The entropy of each row of probabilities over log(classes): 0 certain, 1 uniform."""
    classes = probs.shape[-1]
    if classes < 2:
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype)
    logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
    return (-(probs * logs).sum(-1) / math.log(classes)).clamp(0, 1)


def margin(probs: torch.Tensor) -> torch.Tensor:
    """The gap between each row's two best probabilities (the best one's, with a single class)."""
    if probs.shape[-1] < 2:
        return probs[..., 0]
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@dataclass(frozen=True)
class Gaussian:
    """One feature space's class means (C, D) and the inverse of its shared, shrunk covariance (D, D)."""

    means: torch.Tensor
    precision: torch.Tensor

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """The squared Mahalanobis distance of each feature row to its nearest class mean, over D (so that
        spaces of other widths give comparable numbers)."""
        features = features.double()
        means, precision, offsets = (t.to(features.device) for t in self._in_float64)
        # (x - m)' P (x - m) = x'Px - 2 x'Pm + m'Pm for every row x and mean m at once.
        projected = features @ precision
        distances = (projected * features).sum(1, keepdim=True) - 2 * projected @ means.T + offsets
        return distances.min(1).values.clamp(min=0) / features.shape[1]

    @cached_property
    def _in_float64(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The means, the precision and each mean's m'Pm in float64 (the expansion above cancels), computed
        once: a single image's score is dozens of small operations, a few percent of its prediction."""
        means, precision = self.means.double(), self.precision.double()
        return means, precision, ((means @ precision) * means).sum(1)


def fit_gaussian(features: torch.Tensor, labels: torch.Tensor) -> Gaussian:
    """Class means and the shared covariance of these features, shrunk toward its mean variance."""
    features, labels = features.double(), labels.long()
    classes = int(labels.max()) + 1
    means = torch.stack([features[labels == c].mean(0) if (labels == c).any() else features.mean(0)
                         for c in range(classes)])
    centred = features - means[labels]
    covariance = centred.T @ centred / max(1, len(features) - classes)
    mean_variance = covariance.diagonal().mean().clamp(min=1e-12)
    shrunk = (1 - SHRINKAGE) * covariance + SHRINKAGE * mean_variance * torch.eye(len(covariance),
                                                                                    dtype=covariance.dtype)
    return Gaussian(means.float(), torch.linalg.inv(shrunk).float())


@dataclass(frozen=True)
class Outliers:
    """What scores how unlike the training set an image is, in several of the network's feature spaces at
    once (Lee et al. 2018's feature ensemble): a Gaussian per space, fitted on the training images' features;
    each space's log distance standardised by its mean (`centre`) and spread (`scale`) over the validation
    images; the score is their mean, and an image scoring above `threshold` is unlike the training set.

    The spaces are networks.StagedNetwork's features in order, the penultimate last; a record with fewer
    spaces scores the last ones (an older record has the penultimate only)."""

    spaces: tuple[Gaussian, ...]
    centre: tuple[float, ...]
    scale: tuple[float, ...]
    threshold: float

    def score(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The mean standardised log distance (N,) of feature rows given per space (each N x D)."""
        used = features[len(features) - len(self.spaces):]
        logs = [log_distance(space, rows) for space, rows in zip(self.spaces, used, strict=True)]
        return standardised_mean(logs, self.centre, self.scale)

    def unlike(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.score(features) > self.threshold

    @property
    def spaces_per_member(self) -> int:
        return len(self.spaces)

    def unlike_members(self, member_features: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """`unlike` of a single model's features, given as a committee of one's."""
        (features,) = member_features
        return self.unlike(features)


@dataclass(frozen=True)
class CommitteeOutliers:
    """A committee's statistics: each member's own (fitted on its training images' features, standardised
    and thresholded on the images it never saw), and an image is unlike the training set where its score
    lies above the threshold on average over the members. A new image is unseen by every member, so each
    member scores it as it scored its held-out fold: averaging flags no more of the images like the training
    set than one member would, and keeps flagging what every member finds far."""

    members: tuple[Outliers, ...]

    @property
    def spaces_per_member(self) -> int:
        return len(self.members[0].spaces)

    def unlike_members(self, member_features: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        over = [m.score(f) - m.threshold for m, f in zip(self.members, member_features, strict=True)]
        return torch.stack(over).mean(0) > 0


Trust = Outliers | CommitteeOutliers  # what a model record holds to flag unlike-training images


def log_distance(space: Gaussian, features: torch.Tensor) -> torch.Tensor:
    return space.distance(features).clamp(min=1e-12).log()


def standardised_mean(logs: Sequence[torch.Tensor], centre: Sequence[float],
                      scale: Sequence[float]) -> torch.Tensor:
    """The score: each space's log distances standardised by its centre and scale, averaged over spaces."""
    return torch.stack([(v - c) / s for v, c, s in zip(logs, centre, scale, strict=True)]).mean(0)


def fit_outliers(train_features: Sequence[torch.Tensor], train_labels: torch.Tensor,
                 val_features: Sequence[torch.Tensor], flagged_share: float = FLAGGED_SHARE) -> Outliers:
    """A Gaussian per feature space from the training images' features; each space's log distances
    standardised over the validation images, and the threshold that flags `flagged_share` of them."""
    spaces = tuple(fit_gaussian(rows, train_labels) for rows in train_features)
    logs = [log_distance(space, rows) for space, rows in zip(spaces, val_features, strict=True)]
    return thresholded(spaces, logs, flagged_share)


def fit_outliers_on_val(features: Sequence[torch.Tensor], labels: torch.Tensor,
                        flagged_share: float = FLAGGED_SHARE, folds: int = 5) -> Outliers:
    """The statistics where the validation images are all there is (--calibrate of an existing checkpoint):
    the Gaussians fitted on all of them, but standardised and thresholded on out-of-fold log distances (each
    fifth scored by the Gaussians of the other four fifths). Scored by the Gaussians they were fitted on, a
    few hundred images in hundreds of dimensions lie far closer than any new image would, and every new
    image would be flagged."""
    spaces = tuple(fit_gaussian(rows, labels) for rows in features)
    count = len(labels)
    folds = min(folds, count)
    if folds < 2:
        return Outliers(spaces, (0.0,) * len(spaces), (1.0,) * len(spaces), math.inf)
    fold = torch.randperm(count, generator=torch.Generator().manual_seed(0)) % folds
    logs = [torch.empty(count, dtype=torch.float64) for _ in spaces]
    for k in range(folds):
        held, rest = fold == k, fold != k
        for i, rows in enumerate(features):
            logs[i][held] = log_distance(fit_gaussian(rows[rest], labels[rest]), rows[held])
    return thresholded(spaces, logs, flagged_share)


def thresholded(spaces: tuple[Gaussian, ...], logs: Sequence[torch.Tensor], flagged_share: float) -> Outliers:
    """The Outliers of these spaces, standardised by the mean and spread of each space's log distances over
    a set of images like the training set, with the threshold that flags `flagged_share` of that set."""
    centre = tuple(float(v.mean()) if len(v) else 0.0 for v in logs)
    scale = tuple(float(v.std()) if len(v) > 1 and float(v.std()) > 0 else 1.0 for v in logs)
    if not len(logs[0]):
        return Outliers(spaces, centre, scale, math.inf)
    scores = standardised_mean(logs, centre, scale)
    return Outliers(spaces, centre, scale, float(torch.quantile(scores, 1 - flagged_share)))


def flag(confidence: float, unlike_training: bool | None,
         min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> str:
    """unlike-training where the image lies far from the training set, else uncertain where the model's
    calibrated confidence is under `min_confidence`, else ok. A model without the statistics (an older
    checkpoint, the original's) flags no image as unlike the training set."""
    if unlike_training:
        return UNLIKE_TRAINING
    return UNCERTAIN if confidence < min_confidence else OK
