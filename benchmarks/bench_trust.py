"""Predictions an astronomer can trust: calibration and the unlike-training flag on held-out real galaxies.

    python benchmarks/bench_trust.py            # 5 folds of the 555 real galaxies, real-cpu, one network each
    python benchmarks/bench_trust.py --quick    # a smoke run: 2 folds, 5 epochs, a small demo (a few min)

K-fold over the 555 real Galaxy10 DECaLS images of ../shared (bench_real.py packs them): for each fold it
packs the other folds into a Galaxy10-format HDF5 file, splits and balances it with
preprocess_and_balancing.py as usual and trains `cnn.py --preset real-cpu --seed S` on it, as a user would
(training fits the temperature and the outlier statistics on that split's validation images). Then it
predicts the held-out fold in-process with the checkpoint, so that every real galaxy is predicted once, by
a model that never saw it, and measures:

- calibration: the expected calibration error (15 bins) and negative log-likelihood of the held-out
  galaxies with T = 1 (before) and the fitted temperature (after), and accuracy; pooled over the folds
  and per fold (mean +- std);
- the shares of held-out galaxies flagged unlike-training and uncertain (inference.predict_batch: as served);
- the share of non-galaxy images flagged unlike-training, per kind: a seeded set of noise, empty sky,
  star fields, colour gradients and pieces of everyday photographs (scikit-learn's two sample images);
- which score separates galaxies from non-galaxies better: the feature ensemble (what ships, trust.py:
  Mahalanobis distances in every stage's features, combined), the Mahalanobis distance in the penultimate
  features alone, or the energy score (Liu et al. 2020, -logsumexp(logits), T = 1), each thresholded at
  its own 95th percentile of the fold's validation galaxies, and each one's AUROC of held-out galaxies
  against non-galaxies;
- the ECE that a perfectly calibrated model with the same confidences shows on as many galaxies by
  chance alone (ece_floor), and the ECE at the temperature fitted on the held-out galaxies themselves, in
  hindsight (what fitting T on the validation set leaves to gain);
- the demo model (`make demo`'s: sample_data.py, preprocess_and_balancing.py, `cnn.py --preset cpu`),
  trained on synthetic galaxies, on all 555 real ones: how many it flags, and its accuracy.

Results go to benchmarks/results/bench_trust.json (`make results` renders them into docs/results.md);
--quick writes none unless --results names a folder. All data lives in a temporary folder. Without
../shared it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import run_cli

import record
from bench_real import pack_galaxy10, real_images, real_images_here, run_script

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("uniform noise", "Gaussian noise", "empty sky", "star field", "colour gradient", "photograph")
FLAGGED_QUANTILE = 0.95  # trust.FLAGGED_SHARE's threshold, for every score
# The unlike-training scores compared: what ships (trust.py: the Mahalanobis distances in every stage's
# features, combined), the Mahalanobis distance in the penultimate features alone (Lee et al. 2018's
# basic form, what shipped first), and the energy score (Liu et al. 2020).
SCORES = ("ensemble", "penultimate", "energy")
TARGETS = {"ece_after": 0.05, "real_unlike": 0.10, "nongalaxy_unlike": 0.90}
# What each fold's model gives, averaged over the folds.
PER_FOLD = ("accuracy", "ece_before", "ece_after", "ece_floor", "nll_before", "nll_after", "temperature",
            "hindsight_temperature", "ece_hindsight", "real_unlike", "real_uncertain", "nongalaxy_unlike",
            "auroc")
COLUMNS = [
    {"key": "accuracy", "label": "accuracy", "format": ".1%"},
    {"key": "ece_before", "label": "ECE, T = 1", "format": ".3f"},
    {"key": "ece_after", "label": "ECE, fitted T", "format": ".3f"},
    {"key": "ece_floor", "label": "ECE of a calibrated model, by chance", "format": ".3f"},
    {"key": "nll_before", "label": "NLL, T = 1", "format": ".3f"},
    {"key": "nll_after", "label": "NLL, fitted T", "format": ".3f"},
    {"key": "temperature", "label": "T", "format": ".2f"},
    {"key": "hindsight_temperature", "label": "T fitted on the held-out galaxies (hindsight)",
     "format": ".2f"},
    {"key": "ece_hindsight", "label": "ECE at that T", "format": ".3f"},
    {"key": "real_unlike", "label": "real galaxies flagged unlike-training", "format": ".1%"},
    {"key": "real_uncertain", "label": "real galaxies flagged uncertain", "format": ".1%"},
    {"key": "nongalaxy_unlike", "label": "non-galaxies flagged unlike-training", "format": ".1%"},
    {"key": "auroc", "label": "AUROC, real vs non-galaxy", "format": ".3f"},
]


# ---------------------------------------------------------------- images that are not galaxies


def non_galaxies(per_kind: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(kind, 256x256 RGB uint8 image) for `per_kind` seeded images of every kind in KINDS."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # china.jpg and flower.jpg, shipped inside scikit-learn
    makers = {"uniform noise": uniform_noise, "Gaussian noise": gaussian_noise, "empty sky": empty_sky,
              "star field": star_field, "colour gradient": gradient,
              "photograph": lambda r: photo_piece(r, photos)}
    return [(kind, makers[kind](rng)) for kind in KINDS for _ in range(per_kind)]


SIDE = 256


def uniform_noise(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def gaussian_noise(rng: np.random.Generator) -> np.ndarray:
    mean, spread = rng.uniform(40, 215, 3), rng.uniform(10, 70)
    return to_uint8(rng.normal(mean, spread, (SIDE, SIDE, 3)))


def empty_sky(rng: np.random.Generator) -> np.ndarray:
    """A dark background, 5-30 of 255 with a slight tint, and faint noise."""
    level = rng.uniform(5, 30) * rng.uniform(0.8, 1.2, 3)
    return to_uint8(rng.normal(level, rng.uniform(1, 4), (SIDE, SIDE, 3)))


def star_field(rng: np.random.Generator) -> np.ndarray:
    """Dark sky plus a few to dozens of point sources: a Gaussian PSF, various brightness and colour."""
    sky = empty_sky(rng).astype(np.float64)
    y, x = np.mgrid[:SIDE, :SIDE]
    sigma = rng.uniform(0.8, 2.5)  # one PSF per exposure
    for _ in range(int(rng.integers(3, 60))):
        cy, cx = rng.uniform(0, SIDE, 2)
        peak = 255 * 10 ** rng.uniform(-1.3, 0.3)  # faint to saturated
        colour = np.clip(1 + rng.normal(0, 0.2) * np.array([1.0, 0.0, -1.0]), 0.3, 1.5)  # red to blue
        psf = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        sky += peak * psf[..., None] * colour
    return to_uint8(sky)


def gradient(rng: np.random.Generator) -> np.ndarray:
    """A smooth linear (any direction) or radial (any centre) blend between two random colours."""
    y, x = np.mgrid[:SIDE, :SIDE] / (SIDE - 1)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
    else:
        cy, cx = rng.uniform(0, 1, 2)
        t = np.hypot(x - cx, y - cy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return to_uint8(start + t[..., None] * (end - start))


def photo_piece(rng: np.random.Generator, photos: Sequence[np.ndarray]) -> np.ndarray:
    """A square piece of one of the photographs, 256 px to its full height, resized to 256 px."""
    from PIL import Image

    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(rng.integers(SIDE, min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    piece = Image.fromarray(photo[top:top + side, left:left + side])
    return np.asarray(piece.resize((SIDE, SIDE), Image.Resampling.BILINEAR))


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- one model, measured


def network_scores(model_path: Path, images: Sequence[object]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Raw logits (N, C) of the served model (inference.InferenceModel, float32: --exact) for PIL images or
    RGB arrays, and two unlike-training scores (N,) from its features (networks.StagedNetwork): the feature
    ensemble that ships (trust.Outliers.score) and the Mahalanobis distance in the penultimate features
    alone."""
    import torch
    from PIL import Image

    from galaxy10.inference import InferenceModel
    from galaxy10.models import read_checkpoint

    checkpoint = read_checkpoint(model_path)
    served = InferenceModel(checkpoint, model_path.name, torch.device("cpu"), all_features=True)
    outliers = checkpoint.record.outliers
    logits, ensemble, penultimate = [], [], []
    for start in range(0, len(images), 64):
        pictures = [image if isinstance(image, Image.Image) else Image.fromarray(image)
                    for image in images[start:start + 64]]
        batch = torch.stack([served.preprocess(picture) for picture in pictures])
        (features,), batch_logits = served.forward(batch, tta=False, exact=True)  # one network, as it is
        logits.append(batch_logits[0].double())
        ensemble.append(outliers.score(features))
        penultimate.append(outliers.spaces[-1].distance(features[-1]))
    return torch.cat(logits).numpy(), {"ensemble": torch.cat(ensemble).numpy(),
                                       "penultimate": torch.cat(penultimate).numpy()}


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy score at T = 1 (Liu et al. 2020): -logsumexp(logits); higher is more unusual."""
    from scipy.special import logsumexp

    return -logsumexp(logits, axis=1)


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities, as every consumer of a model computes them (trust.calibrated)."""
    import torch

    from galaxy10 import trust

    return trust.calibrated(torch.from_numpy(logits), temperature).numpy()


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    import torch

    from galaxy10 import trust

    return trust.nll(torch.from_numpy(logits), torch.from_numpy(labels).long(), temperature)


def ece_floor(probs: np.ndarray) -> float:
    """The ECE a perfectly calibrated model with these confidences shows on this many images by chance
    (reports.ece_by_chance)."""
    from galaxy10.reports import ece_by_chance

    return ece_by_chance(probs.max(1))


def open_rgb(path: Path) -> object:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def measure(model_path: Path, val_dir: Path, real: list[tuple[Path, int]],
            others: list[tuple[str, np.ndarray]]) -> dict:
    """Everything this benchmark measures of one checkpoint: on the real galaxies it is given (held out from
    its training), on the non-galaxies, and on its own validation folder (for the scores' thresholds)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from galaxy10 import trust
    from galaxy10.data import scan_image_folder
    from galaxy10.inference import predict_batch
    from galaxy10.models import read_record
    from galaxy10.reports import expected_calibration_error

    model_record = read_record(model_path)
    if list(model_record.class_names) != list(CLASS_NAMES):
        raise SystemExit(f"{model_path} has classes {model_record.class_names}, not Galaxy10's")
    temperature = model_record.temperature
    val = scan_image_folder(val_dir)
    real_images = [open_rgb(path) for path, _ in real]
    labels = np.array([label for _, label in real])
    other_images = [image for _, image in others]
    kinds = np.array([kind for kind, _ in others])

    real_logits, real_scores = network_scores(model_path, real_images)
    other_logits, other_scores = network_scores(model_path, other_images)
    val_logits, val_scores = network_scores(model_path, [open_rgb(p) for p in val.paths])
    # What a user gets: the shipped flags, float32 (exact) for reproducible figures.
    real_flags = [p.flag for p in predict_batch(real_images, model_path, exact=True, device="cpu")]
    other_flags = [p.flag for p in predict_batch(other_images, model_path, exact=True, device="cpu")]
    real_unlike = np.array([f == trust.UNLIKE_TRAINING for f in real_flags])
    other_unlike = np.array([f == trust.UNLIKE_TRAINING for f in other_flags])

    before, after = softmax(real_logits, 1.0), softmax(real_logits, temperature)
    # The best any one temperature could do on these galaxies: how much fitting T on the validation images
    # (a few dozen, also those early stopping chose the epoch by) leaves to gain.
    hindsight = trust.fit_temperature(torch.from_numpy(real_logits), torch.from_numpy(labels))
    shipped = model_record.outliers.threshold
    result = {
        "n_real": len(real), "n_val": len(val.paths), "temperature": temperature,
        "accuracy": float((after.argmax(1) == labels).mean()),
        "ece_before": expected_calibration_error(labels, before),
        "ece_after": expected_calibration_error(labels, after), "ece_floor": ece_floor(after),
        "nll_before": nll(real_logits, labels, 1.0), "nll_after": nll(real_logits, labels, temperature),
        "hindsight_temperature": hindsight,
        "ece_hindsight": expected_calibration_error(labels, softmax(real_logits, hindsight)),
        "real_unlike": float(real_unlike.mean()),
        "real_uncertain": float(np.mean([f == trust.UNCERTAIN for f in real_flags])),
        "nongalaxy_unlike": float(other_unlike.mean()),
        "nongalaxy_unlike_by_kind": {kind: float(other_unlike[kinds == kind].mean()) for kind in KINDS},
        "record_threshold": shipped,
        # The shipped flag against this benchmark's own score: they differ only by float rounding.
        "flag_disagreements": int((real_unlike != (real_scores["ensemble"] > shipped)).sum()
                                  + (other_unlike != (other_scores["ensemble"] > shipped)).sum()),
    }
    truth = np.r_[np.zeros(len(real)), np.ones(len(others))]
    for name, real_score, other_score, val_score in (
            *((name, real_scores[name], other_scores[name], val_scores[name]) for name in SCORES[:2]),
            ("energy", energy(real_logits), energy(other_logits), energy(val_logits))):
        threshold = float(np.quantile(val_score, FLAGGED_QUANTILE))
        result[name] = {
            "threshold": threshold,
            "real_unlike": float((real_score > threshold).mean()),
            "nongalaxy_unlike": float((other_score > threshold).mean()),
            "nongalaxy_unlike_by_kind": {kind: float((other_score[kinds == kind] > threshold).mean())
                                         for kind in KINDS},
            "auroc": float(roc_auc_score(truth, np.r_[real_score, other_score])),
        }
    result["auroc"] = result["ensemble"]["auroc"]
    # Kept for pooling the folds' held-out predictions.
    result["pool"] = {"labels": labels.tolist(), "logits": real_logits.tolist(),
                      "unlike": real_unlike.tolist(), "flags": real_flags}
    return result


# ---------------------------------------------------------------- training, as a user would


def train(h5: Path, folder: Path, cnn_flags: list[str], split_seed: int) -> tuple[Path, Path, dict]:
    """preprocess_and_balancing.py on the file, then cnn.py with these flags; the checkpoint, its
    validation folder and the report cnn.py writes."""
    from galaxy10.models import output_path

    balanced = folder / "balanced"
    run_script(str(ROOT / "preprocess_and_balancing.py"), "--h5", str(h5), "--out", str(balanced),
               "--seed", str(split_seed))
    model_path = folder / "model.pth"
    run_script(str(ROOT / "cnn.py"), *cnn_flags, "--train-dir", str(balanced / "train"),
               "--val-dir", str(balanced / "val"), "--model-path", str(model_path))
    return model_path, balanced / "val", json.loads(output_path(model_path, "report.json").read_text())


def folds(rows: list[tuple[Path, int]], k: int, seed: int) -> list[np.ndarray]:
    """The held-out indices of each of k stratified folds."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    labels = np.array([label for _, label in rows])
    return [held_out for _, held_out in splitter.split(np.zeros(len(rows)), labels)]


def run_fold(index: int, rows: list[tuple[Path, int]], held_out: np.ndarray, others: list, folder: Path,
             cnn_flags: list[str], split_seed: int) -> dict:
    started = time.perf_counter()
    folder.mkdir()
    held = set(held_out.tolist())
    training_rows = [row for i, row in enumerate(rows) if i not in held]
    pack_galaxy10(training_rows, folder / "train.h5")
    model_path, val_dir, report = train(folder / "train.h5", folder, cnn_flags, split_seed)
    result = measure(model_path, val_dir, [rows[i] for i in held_out], others)
    result |= {"fold": index, "n_trained_on": len(training_rows), "val_calibration": report["calibration"],
               "val_accuracy": report["accuracy"], "train_s": report["train_seconds"],
               "best_epoch": report["epoch"], "wall_s": time.perf_counter() - started}
    return result


def run_demo(rows: list[tuple[Path, int]], others: list, folder: Path, sample_n: int,
             demo_flags: list[str]) -> dict:
    """`make demo`'s model (the synthetic sample, --preset cpu) measured on every real galaxy."""
    started = time.perf_counter()
    folder.mkdir()
    run_script(str(ROOT / "sample_data.py"), "--out", str(folder / "sample.h5"), "--n", str(sample_n))
    model_path, val_dir, report = train(folder / "sample.h5", folder, demo_flags, 42)
    result = measure(model_path, val_dir, rows, others)
    result |= {"val_calibration": report["calibration"], "val_accuracy": report["accuracy"],
               "train_s": report["train_seconds"], "wall_s": time.perf_counter() - started}
    return result


# ---------------------------------------------------------------- summaries


def pooled(runs: list[dict]) -> dict:
    """The held-out predictions of every fold together: each real galaxy once, by its fold's model."""
    from galaxy10.reports import expected_calibration_error

    labels = np.concatenate([r["pool"]["labels"] for r in runs]).astype(int)
    logits = [np.array(r["pool"]["logits"]) for r in runs]
    before = np.concatenate([softmax(x, 1.0) for x in logits])
    after = np.concatenate([softmax(x, r["temperature"]) for x, r in zip(logits, runs, strict=True)])
    hindsight = np.concatenate([softmax(x, r["hindsight_temperature"])
                                for x, r in zip(logits, runs, strict=True)])
    flags = [f for r in runs for f in r["pool"]["flags"]]
    nlls = [(nll(x, np.array(r["pool"]["labels"]), 1.0), nll(x, np.array(r["pool"]["labels"]),
                                                              r["temperature"]))
            for x, r in zip(logits, runs, strict=True)]
    sizes = [len(x) for x in logits]
    return {
        "n": len(labels),
        "accuracy": float((after.argmax(1) == labels).mean()),
        "ece_before": expected_calibration_error(labels, before),
        "ece_after": expected_calibration_error(labels, after), "ece_floor": ece_floor(after),
        "ece_hindsight": expected_calibration_error(labels, hindsight),
        "nll_before": float(np.average([b for b, _ in nlls], weights=sizes)),
        "nll_after": float(np.average([a for _, a in nlls], weights=sizes)),
        "real_unlike": float(np.mean([f == "unlike-training" for f in flags])),
        "real_uncertain": float(np.mean([f == "uncertain" for f in flags])),
    }


def over_folds(runs: list[dict], key: str, score: str | None = None, kind: str | None = None) -> dict:
    """mean, std and per-fold values of one measured figure."""
    values = []
    for run in runs:
        source = run[score] if score else run
        values.append(source[f"{key}_by_kind"][kind] if kind else source[key])
    return record.mean_std(values)


def result_rows(runs: list[dict], demo: dict | None, cmd: str, fold_flags: list[str],
                demo_flags: list[str], sample_n: int) -> list[dict]:
    pool = pooled(runs)
    k = len(runs)
    cnn = "python cnn.py " + " ".join(fold_flags) + "  (each fold: trained on the other folds)"
    rows = [
        record.row(f"held-out real galaxies, pooled ({pool['n']}, {k} folds)", cmd,
                   {key: pool[key] for key in ("accuracy", "ece_before", "ece_after", "ece_floor",
                                               "ece_hindsight", "nll_before", "nll_after", "real_unlike",
                                               "real_uncertain")},
                   cnn=cnn,
                   highlight=True, headline={"label": "calibration error (ECE) on held-out real galaxies, "
                                                      "`--preset real-cpu`", "metric": "ece_after"}),
        record.row(f"per fold (mean ± std over {k})", cmd, {key: over_folds(runs, key) for key in PER_FOLD},
                   cnn=cnn, headline={"label": "non-galaxy images flagged unlike-training, "
                                               "`--preset real-cpu`", "metric": "nongalaxy_unlike"}),
    ]
    rows += [record.row(f"non-galaxies: {kind}", cmd, {"nongalaxy_unlike": over_folds(
        runs, "nongalaxy_unlike", kind=kind)}, cnn=cnn) for kind in KINDS]
    for score, name in zip(SCORES, ("feature ensemble (ships)", "Mahalanobis distance, penultimate features "
                                    "only", "energy score, T = 1"), strict=True):
        metrics = {key: over_folds(runs, key, score) for key in ("real_unlike", "nongalaxy_unlike", "auroc")}
        rows.append(record.row(f"{name}, val 95th percentile", cmd, metrics, cnn=cnn))
    if demo is not None:
        metrics = {key: demo[key] for key in PER_FOLD}
        rows.append(record.row(f"demo model (synthetic sample) on the {demo['n_real']} real galaxies", cmd,
                               metrics, cnn=f"python sample_data.py --n {sample_n}; python "
                               f"preprocess_and_balancing.py; python cnn.py {' '.join(demo_flags)}"))
    return rows


def print_summary(runs: list[dict], demo: dict | None) -> None:
    pool = pooled(runs)
    print(f"\nheld-out real galaxies, pooled over {len(runs)} folds ({pool['n']} images): "
          f"accuracy {pool['accuracy']:.1%}, ECE {pool['ece_before']:.3f} -> {pool['ece_after']:.3f} "
          f"(target <= {TARGETS['ece_after']}; a calibrated model's by chance: {pool['ece_floor']:.3f}), "
          f"NLL {pool['nll_before']:.3f} -> {pool['nll_after']:.3f}; "
          f"flagged unlike-training {pool['real_unlike']:.1%} (target <= {TARGETS['real_unlike']:.0%}), "
          f"uncertain {pool['real_uncertain']:.1%}")
    for key in PER_FOLD:
        values = [r[key] for r in runs]
        print(f"  per fold {key}: {show(values)}  ({', '.join(f'{v:.3f}' for v in values)})")
    print(f"non-galaxies flagged unlike-training (target >= {TARGETS['nongalaxy_unlike']:.0%}):")
    for kind in KINDS:
        print(f"  {kind}: {show([r['nongalaxy_unlike_by_kind'][kind] for r in runs])}")
    for score in SCORES:
        print(f"{score} at its val 95th percentile: real flagged "
              f"{show([r[score]['real_unlike'] for r in runs])}, non-galaxies flagged "
              f"{show([r[score]['nongalaxy_unlike'] for r in runs])}, AUROC "
              f"{show([r[score]['auroc'] for r in runs])}")
    if demo is not None:
        print(f"demo model on the {demo['n_real']} real galaxies: flagged unlike-training "
              f"{demo['real_unlike']:.1%}, accuracy {demo['accuracy']:.1%}; non-galaxies flagged "
              f"{demo['nongalaxy_unlike']:.1%}")


def show(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f}"


def without_pool(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "pool"}


# ---------------------------------------------------------------- the command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=None, help="K of the K-fold split (default: 5)")
    parser.add_argument("--seed", type=int, default=0,
                        help="cnn.py's training seed in every fold (default: 0)")
    parser.add_argument("--split-seed", type=int, default=42,
                        help="seed of the folds and of preprocess_and_balancing.py's split (default: 42)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train every fold this many epochs (cnn.py --epochs N --patience N) instead of "
                             "the preset's 100")
    parser.add_argument("--per-kind", type=int, default=None,
                        help="non-galaxy images of each of the 6 kinds (default: 34, about 200 in all)")
    parser.add_argument("--sample-n", type=int, default=None,
                        help="synthetic galaxies for the demo model (default: 2000, as `make demo`)")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo model")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: --folds 2 --epochs 5 --per-kind 10 --sample-n 500, no result file "
                             "written unless --results is given")
    parser.add_argument("--results", type=Path, default=None,
                        help="the folder to write bench_trust.json to (default: benchmarks/results)")
    args = parser.parse_args(argv)
    quick = {"folds": 2, "epochs": 5, "per_kind": 10, "sample_n": 500}
    full = {"folds": 5, "epochs": None, "per_kind": 34, "sample_n": 2000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not real_images_here():
        return
    started = time.perf_counter()
    # One network per fold (--folds 1), served as the preset serves it: its scores are what this compares.
    fold_flags = ["--preset", "real-cpu", "--folds", "1", "--seed", str(args.seed)]
    demo_flags = ["--preset", "cpu"]
    if args.epochs is not None:
        fold_flags += ["--epochs", str(args.epochs), "--patience", str(args.epochs)]
    rows = real_images()
    others = non_galaxies(args.per_kind, args.split_seed)
    runs, demo = [], None
    with tempfile.TemporaryDirectory(prefix="bench_trust-") as tmp:
        for index, held_out in enumerate(folds(rows, args.folds, args.split_seed)):
            runs.append(run_fold(index, rows, held_out, others, Path(tmp) / f"fold{index}", fold_flags,
                                 args.split_seed))
            print(json.dumps(without_pool(runs[-1])), flush=True)
        if not args.no_demo:
            demo = run_demo(rows, others, Path(tmp) / "demo", args.sample_n, demo_flags)
            print(json.dumps(without_pool(demo)), flush=True)
    wall = time.perf_counter() - started
    print_summary(runs, demo)
    print(f"\n{len(rows)} real galaxies, {args.folds} folds (split seed {args.split_seed}), "
          f"{len(others)} non-galaxies; {wall:.0f} s in all")
    if args.quick and args.results is None:
        print("--quick: no result file written (give --results DIR to write one)")
        return
    cmd = record.command(__file__, argv)
    result = result_rows(runs, demo, cmd, fold_flags, demo_flags, args.sample_n)
    last_run = {"folds": [without_pool(r) for r in runs], "pooled": pooled(runs),
                "demo": None if demo is None else without_pool(demo), "wall_s": wall,
                "split_seed": args.split_seed, "per_kind": args.per_kind, "targets": TARGETS}
    record.write("bench_trust", result, title="Trust: calibration and the unlike-training flag",
                 columns=COLUMNS, section="trust", last_run=last_run,
                 **({"folder": args.results} if args.results else {}))


if __name__ == "__main__":
    sys.exit(run_cli(main))
