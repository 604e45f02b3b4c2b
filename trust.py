"""How far to trust an answer. Training fits, on its validation set, a temperature that calibrates the
probabilities (temperature scaling, Guo et al. 2017: softmax(logits / T)) and the statistics that score how
unlike the training set an image is, in the network's own penultimate features (the Mahalanobis distance to
the nearest class mean under one shared covariance, Lee et al. 2018); inference applies them. Every answer
also gets its uncertainty: the normalised entropy of its probabilities (0 certain, 1 uniform) and the margin
between its two best classes, and one flag: ok, uncertain (confidence under a threshold) or unlike-training.
It imports no model code: what it fits and applies travels in the checkpoint's record (models.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
# Shrinkage of the shared covariance toward its mean variance: with a few hundred images and up to 2,048
# features the sample covariance is singular.
SHRINKAGE = 0.1


# The fitted temperature stays within these. On a validation set the model gets entirely right (the
# synthetic sample) the likelihood keeps rising as T falls toward 0, so an unbounded fit would make every
# answer certain; below 1/4 (logits sharpened 4x) a fit is running off, not calibrating.
TEMPERATURE_RANGE = (0.25, 20.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) on these labels,
    within TEMPERATURE_RANGE."""
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(*TEMPERATURE_RANGE))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """The mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


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
class Outliers:
    """What scores an image's distance from the training set in the penultimate features: the class means
    (C, D) and the inverse of the shared, shrunk covariance (D, D) of the training images' features, and the
    threshold above which an image is unlike the training set."""

    means: torch.Tensor
    precision: torch.Tensor
    threshold: float

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """The squared Mahalanobis distance of each feature row to its nearest class mean, over D (so that
        networks of other widths give comparable numbers)."""
        features = features.double()
        means, precision = self.means.to(features), self.precision.to(features)
        # (x - m)' P (x - m) = x'Px - 2 x'Pm + m'Pm for every row x and mean m at once.
        projected = features @ precision
        distances = ((projected * features).sum(1, keepdim=True) - 2 * projected @ means.T
                     + ((means @ precision) * means).sum(1))
        return distances.min(1).values.clamp(min=0) / features.shape[1]

    def unlike(self, features: torch.Tensor) -> torch.Tensor:
        return self.distance(features) > self.threshold


def fit_outliers(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 flagged_share: float = FLAGGED_SHARE) -> Outliers:
    """Class means and shared covariance from the training images' features; the threshold that flags
    `flagged_share` of the validation images."""
    features, labels = train_features.double(), train_labels.long()
    classes = int(labels.max()) + 1
    means = torch.stack([features[labels == c].mean(0) if (labels == c).any() else features.mean(0)
                         for c in range(classes)])
    centred = features - means[labels]
    covariance = centred.T @ centred / max(1, len(features) - classes)
    mean_variance = covariance.diagonal().mean().clamp(min=1e-12)
    shrunk = (1 - SHRINKAGE) * covariance + SHRINKAGE * mean_variance * torch.eye(len(covariance),
                                                                                    dtype=covariance.dtype)
    precision = torch.linalg.inv(shrunk)
    fitted = Outliers(means.float(), precision.float(), math.inf)
    distances = fitted.distance(val_features)
    threshold = float(torch.quantile(distances, 1 - flagged_share)) if len(distances) else math.inf
    return Outliers(means.float(), precision.float(), threshold)


def flag(confidence: float, unlike_training: bool | None,
         min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> str:
    """unlike-training where the image lies far from the training set, else uncertain where the model's
    calibrated confidence is under `min_confidence`, else ok. A model without the statistics (an older
    checkpoint, the original's) flags no image as unlike the training set."""
    if unlike_training:
        return UNLIKE_TRAINING
    return UNCERTAIN if confidence < min_confidence else OK
