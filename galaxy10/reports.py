"""Evaluation reports: accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix and the
expected calibration error of predicted probabilities (`evaluation_report`), written as JSON and drawn as
PNG beside a checkpoint (`write_report`, `write_curves`), and a text table for the terminal
(`format_accuracy`). Training's report and inference's score of a labelled .h5 file both come from here;
it imports no model code.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galaxy10.files import atomic_path
from galaxy10.models import output_path

ECE_BINS = 15


ECE_DRAWS = 1000  # simulated sets of outcomes behind the ECE a calibrated model shows by chance


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins (lo, hi] of |bin| / n * |accuracy - mean confidence|."""
    return calibration_gap(y_prob.max(1), (y_prob.argmax(1) == y_true).astype(float), n_bins)


def calibration_gap(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, confidence, n_bins)
    return float(np.abs(gap).sum() / len(confidence))


def ece_by_chance(confidence: np.ndarray, draws: int = ECE_DRAWS, seed: int = 0) -> float:
    """The ECE that a perfectly calibrated model with these confidences shows on this many images by chance
    alone: its mean over `draws` sets of outcomes in which each answer is right with its own confidence. A
    measured ECE near it is as good as this many images can show."""
    rng = np.random.default_rng(seed)
    confidence = np.asarray(confidence, dtype=np.float64)
    outcomes = ((rng.random(len(confidence)) < confidence).astype(float) for _ in range(draws))
    return float(np.mean([calibration_gap(confidence, correct) for correct in outcomes]))


def evaluation_report(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix, ECE of `y_prob` and the
    ECE a calibrated model would show on as many images by chance."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    return {**classification_report(y_true, y_prob.argmax(1), class_names),
            "ece": expected_calibration_error(y_true, y_prob), "ece_by_chance": ece_by_chance(y_prob.max(1)),
            "ece_bins": ECE_BINS}


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix of class ids."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "n_samples": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1.mean()),
        "class_names": list(class_names),
        "per_class": [
            {"class_id": i, "class_name": name, "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        ],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def write_json(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_history(history: dict[str, list[float]], model_path: str | os.PathLike[str]) -> None:
    write_json(history, output_path(model_path, "history.json"))


def save_figure(figure: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_curves(
    history: dict[str, list[float]], best_epoch: int, model_path: str | os.PathLike[str]
) -> None:
    """Loss and accuracy against epoch, train and val, the best epoch marked."""
    from matplotlib.figure import Figure  # the object API renders with Agg and touches no global backend

    figure = Figure(figsize=(11, 4))
    epochs = range(1, len(history["val_loss"]) + 1)
    for ax, metric in zip(figure.subplots(1, 2), ("loss", "acc"), strict=True):
        ax.plot(epochs, history[f"train_{metric}"], marker=".", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker=".", label="val")
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
        ax.set(xlabel="epoch", ylabel="accuracy" if metric == "acc" else "loss")
        ax.legend()
    save_figure(figure, output_path(model_path, "curves.png"))


def write_committee_curves(histories: Sequence[dict[str, list[float]]], model_path: str | os.PathLike[str]
                           ) -> None:
    """Each member's validation loss and accuracy (on its own fold) against epoch, side by side."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    for ax, metric in zip(figure.subplots(1, 2), ("loss", "acc"), strict=True):
        for k, history in enumerate(histories, 1):
            ax.plot(range(1, len(history["val_loss"]) + 1), history[f"val_{metric}"], label=f"member {k}")
        ax.set(xlabel="epoch", ylabel=f"val {'accuracy' if metric == 'acc' else 'loss'} (its own fold)")
        ax.legend()
    save_figure(figure, output_path(model_path, "curves.png"))


def write_confusion(report: dict[str, Any], model_path: str | os.PathLike[str]) -> None:
    """The confusion matrix as an annotated heat map, rows true class, columns predicted."""
    from matplotlib.figure import Figure

    matrix = np.array(report["confusion_matrix"])
    k = len(matrix)
    figure = Figure(figsize=(2 + 0.8 * k, 1.5 + 0.7 * k))
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    ticks = range(k)
    ax.set_xticks(ticks, report["class_names"], rotation=45, ha="right")
    ax.set_yticks(ticks, report["class_names"])
    title = f"accuracy {report['accuracy']:.1%} (n={report['n_samples']})"
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    save_figure(figure, output_path(model_path, "confusion.png"))


def write_report(
    truth: np.ndarray, probs: np.ndarray, tta_probs: np.ndarray, class_names: Sequence[str],
    model_path: str | os.PathLike[str], context: dict[str, Any], subject: str = "evaluation on",
    served_tta: bool = False,
) -> dict[str, Any]:
    """The evaluation report of a checkpoint's predictions on its val set, written as JSON with the confusion
    PNG beside the checkpoint, summed up in one printed line and set against the baselines: always answering
    the most common class, and guessing (a warning when the model does not beat them). Its figures are those
    of the answers the model gives by default: `probs`, or with `served_tta` (cnn.py --serve-tta) `tta_probs`
    (averaged over the 8 flips and quarter turns, as cnn_use_model's --tta); both are reported, as `tta` and
    `without_tta`."""
    tta_report = evaluation_report(truth, tta_probs, class_names)
    plain_report = evaluation_report(truth, probs, class_names)
    report = {"checkpoint": str(model_path), **context, **(tta_report if served_tta else plain_report),
              "served_with_tta": served_tta,
              "tta": {"accuracy": tta_report["accuracy"], "macro_f1": tta_report["macro_f1"]},
              "without_tta": {"accuracy": plain_report["accuracy"], "macro_f1": plain_report["macro_f1"]},
              "baselines": baselines(truth, len(class_names))}
    write_json(report, output_path(model_path, "report.json"))
    write_confusion(report, model_path)
    worst = min(report["per_class"], key=lambda c: c["f1"])
    other = (f"without TTA {report['without_tta']['accuracy']:.2%}" if served_tta
             else f"with TTA {report['tta']['accuracy']:.2%}")
    print(f"{subject} {report['n_samples']} images: accuracy {report['accuracy']:.2%} ({other}), macro-F1 "
          f"{report['macro_f1']:.3f}, ECE {report['ece']:.3f} ({report['ece_by_chance']:.3f} by chance); "
          f"weakest class {worst['class_name']} (F1 {worst['f1']:.3f}); report in "
          f"{output_path(model_path, 'report.json')}")
    comparison = against_baselines(report)
    print(comparison, file=sys.stderr if comparison.startswith("warning") else sys.stdout)
    return report


def baselines(truth: np.ndarray, num_classes: int) -> dict[str, Any]:
    """What answering without looking scores on these labels: always the most common class (its accuracy,
    and macro-F1, whose F1 is that class's only), and a uniform guess (1 / classes, in expectation)."""
    counts = np.bincount(np.asarray(truth, dtype=np.int64), minlength=num_classes)
    share = counts.max() / max(counts.sum(), 1)
    return {"majority_class": int(counts.argmax()), "majority_accuracy": float(share),
            "majority_macro_f1": float(2 * share / (1 + share) / num_classes),
            "chance_accuracy": 1 / num_classes}


def against_baselines(report: dict[str, Any]) -> str:
    """One line setting the model against the baselines: a warning where it does not beat always answering
    the most common class (by accuracy or by macro-F1), or guessing."""
    base = report["baselines"]
    majority = report["class_names"][base["majority_class"]]
    line = (f"baselines: always answering {majority} scores {base['majority_accuracy']:.2%} (macro-F1 "
            f"{base['majority_macro_f1']:.3f}), guessing {base['chance_accuracy']:.2%}")
    if report["accuracy"] <= base["chance_accuracy"] or report["macro_f1"] <= base["majority_macro_f1"]:
        return f"warning: the model does no better than guessing; {line}: it has learned nothing to use"
    if report["accuracy"] <= base["majority_accuracy"]:
        return (f"warning: the model's accuracy ({report['accuracy']:.2%}) is no better than always "
                f"answering {majority}; {line}")
    return line


def format_accuracy(name: str, truth: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> str:
    """Overall accuracy and a per-class table (class, support, correct, accuracy) of predicted class ids."""
    report = classification_report(truth, predicted, class_names)
    correct = sum(np.diag(report["confusion_matrix"]))
    width = max(len(c) for c in class_names) + 3
    lines = [
        f"{name}: accuracy {report['accuracy']:.1%} ({correct:,} of {report['n_samples']:,})",
        f"{'class':<{width}}  {'support':>7}  {'correct':>7}  {'accuracy':>8}",
    ]
    for row, hits in zip(report["per_class"], np.diag(report["confusion_matrix"]), strict=True):
        accuracy = f"{row['recall']:.1%}" if row["support"] else "-"
        label = f"{row['class_id']} {row['class_name']}"
        lines.append(f"{label:<{width}}  {row['support']:>7}  {hits:>7}  {accuracy:>8}")
    return "\n".join(lines)
