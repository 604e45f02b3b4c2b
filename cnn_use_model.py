"""Inference: classify galaxy images with a checkpoint written by cnn.py (or the original project): one
image, folders, a Galaxy10 .h5 file, or a catalog (a CSV or Parquet table of image paths).

    python cnn_use_model.py galaxy.jpg                       # the original: one image, one class name
    python cnn_use_model.py images/ --out predictions.csv    # every image under a folder
    python cnn_use_model.py Galaxy10_DECals.h5 --tta         # every row, with accuracy where `ans` exists
    python cnn_use_model.py catalog.parquet --id-column objid --out predictions.parquet --resume
    torchrun --standalone --nproc_per_node 4 cnn_use_model.py catalog.csv --out predictions.parquet

From Python, `main(img_path, model_path)` returns the class name as the original did, and `predict`
returns the whole `Prediction`. A checkpoint is loaded once per file and prepared for speed:
BatchNorm folded into the convolutions, channels_last, and, where the CPU computes bfloat16 natively
(AVX512-BF16 or AMX), the convolutions and the first linear layer in bfloat16: about twice as fast as
float32 (docs/results.md, inference). Images whose two best classes are nearly tied are recomputed in
float32; as a few near ties can still differ from float32, `exact=True` (`--exact`) is there for results
that must equal float32's.

Here: the prepared model (`InferenceModel`, `load_model`), `predict`, `main`, Grad-CAM, and the command
line. Images are read by images.py; what the command line was given to classify is inputs.py's; what a
model is (network, classes, preprocessing) is its record in models.py; output files (`--out`, `--shard`,
`--resume`, catalogs) are catalog.py's, given this module's classifying function.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice, tee
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn
from tqdm import tqdm

import trust
from catalog import (
    BARRIER_TIMEOUT,
    DEFAULT_CHUNK_ROWS,
    Output,
    Row,
    file_identity,
    output_schema,
    plan_output,
    write_predictions,
)
from distributed import DEVICES, native_bf16, select_device, torchrun_group
from galaxy10 import FileCache, Galaxy10Error, run_cli
from images import MAX_PIXELS, ImageError, ImageTooLargeError, Source, is_image_file, open_image  # noqa: F401
from inputs import H5Input, Inputs, find_inputs
from models import (
    Checkpoint,
    crop_box,
    dihedral_views,
    read_checkpoint,
    to_model_input,
    to_rgb8,
)
from networks import StagedNetwork, fold_batchnorm, staged
from reports import format_accuracy

DEFAULT_MODEL = "based_on_balanced_data_model.pth"
# bfloat16 moves logits by a median 0.2-0.5% of an image's logit range (max - min), with a long tail
# (6% on one of 460 images). Where the top two are closer than 3% of the range, float32 decides: on the
# 64 px demo model that recomputes 31% of images and halves the changed top-1 classes (4 -> 2 of 460);
# making the margin wide enough to remove the last ones would recompute most images.
NEAR_TIE = 0.03

# ---------------------------------------------------------------- the model, prepared once


class _Cast(nn.Module):
    """Casts activations between stages; lays images out channels_last, which oneDNN convolves fastest."""

    def __init__(self, dtype: torch.dtype, channels_last: bool = False) -> None:
        super().__init__()
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)


def _precision_pass(stages: list[nn.Module], head: nn.Sequential, dtype: torch.dtype) -> StagedNetwork:
    """The network (BatchNorm folded into `stages`) computing in `dtype` up to the head's first Linear
    (DeepCNN-5Block's 32768x2048 at 256 px: 89% of its weights, which a batch-1 pass must read in full), then
    float32 for the small layers. The output layer is always float32, so the penultimate features (its input)
    are float32 too, as are the stage summaries (networks.spatial_mean)."""
    layers = list(head)
    first_linear = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)) + 1
    first_linear = min(first_linear, len(layers) - 1)  # a torchvision network's only Linear is its output
    low = nn.ModuleList([*stages, *layers[:first_linear]])
    if dtype != torch.float32:
        low = copy.deepcopy(low).to(dtype)
    first = nn.Sequential(_Cast(dtype, channels_last=True), low[0])
    tail = nn.Sequential(*low[len(stages):], _Cast(torch.float32), *layers[first_linear:])
    return StagedNetwork([first, *low[1:len(stages)]], tail).eval().requires_grad_(False)


class InferenceModel:
    """A checkpoint's model prepared for inference; shared by every thread (nothing in it is mutated). Its
    record (models.ModelRecord) says what it is: network, classes, and the preprocessing, applied by
    `preprocess`."""

    def __init__(self, checkpoint: Checkpoint, name: str, device: torch.device) -> None:
        self.name = name
        self.record = checkpoint.record
        self.class_names = checkpoint.record.class_names
        self.device = device
        # Only the features the record scores are computed: the penultimate (the embedding) at least.
        outliers = self.record.outliers
        network = staged(checkpoint.model(), features=1 if outliers is None else len(outliers.spaces))
        # The body's stages with BatchNorm folded, then the head (pooling, classifier); float32, and a
        # bfloat16 copy where the device computes it natively.
        stages = [fold_batchnorm(stage).to(device, memory_format=torch.channels_last)
                  for stage in network.stages]
        head = network.head.to(device)
        self.fp32 = _precision_pass(stages, head, torch.float32)
        self.bf16 = _precision_pass(stages, head, torch.bfloat16) if native_bf16(device) else self.fp32

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The uint8 (3, S, S) tensor this model sees of an image: its training's preprocessing."""
        try:
            return self.record.preprocessing(image)
        except (OSError, ValueError) as err:  # modes PIL cannot convert to RGB
            raise ImageError(f"cannot convert a {image.mode} image to RGB ({err})") from None

    def probabilities(self, images: torch.Tensor, *, tta: bool = False, exact: bool = False) -> torch.Tensor:
        """Calibrated class probabilities (B, C) for a uint8 batch (B, 3, S, S); see `classify`."""
        return self.classify(images, tta=tta, exact=exact)[0]

    @property
    def embedding_size(self) -> int:
        """The width of the penultimate features: the input of the output layer."""
        return self.fp32.head[-1].in_features

    def classify(self, images: torch.Tensor, *, tta: bool = False, exact: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Calibrated class probabilities (B, C) for a uint8 batch (B, 3, S, S), softmax(logits / T) with the
        record's temperature, and which images lie unlike the training set (None where the record has no
        statistics for it), and their penultimate features (B, D), the embedding. With `tta`, the
        probabilities are averaged over the 8 flips and quarter turns (one forward pass of 8B images); with
        `exact`, float32 throughout. How unlike the training set an image is, is read from the features the
        pass computes anyway (networks.StagedNetwork), of the image as it is (not turned)."""
        x = to_model_input(images.to(self.device))
        views = dihedral_views(x) if tta else x
        network = self.fp32 if exact else self.bf16
        with torch.inference_mode():
            features, logits = network(views)
            if network is not self.fp32:
                logits = self._settle_near_ties(views, logits)
            probs = (logits / self.record.temperature).softmax(dim=1)
            features = [space[: len(images)] for space in features]
            outliers = self.record.outliers
            unlike = None if outliers is None else outliers.unlike(features).cpu()
            embedding = features[-1]
        if tta:
            probs = probs.view(8, len(images), -1).mean(dim=0)
        return probs.cpu(), unlike, embedding.cpu()

    def _settle_near_ties(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Recompute in float32 the images whose top two bfloat16 logits are too close to call."""
        top2 = logits.topk(2, dim=1).values
        spread = logits.max(dim=1).values - logits.min(dim=1).values
        doubtful = top2[:, 0] - top2[:, 1] < NEAR_TIE * spread
        if doubtful.any():
            logits[doubtful] = self.fp32(x[doubtful])[1]
        return logits

    def grad_cam(self, image: torch.Tensor, class_id: int | None
                 ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
        """Calibrated class probabilities (C,) of one uint8 image (3, S, S), its Grad-CAM (S, S) in [0, 1] for
        `class_id` (None: the predicted class), and whether it lies unlike the training set (as `classify`),
        all from one float32 forward pass.

        The last convolutional stage's activation (DeepCNN-5Block's before its max-pool) is detached and made
        the leaf that autograd differentiates to, so no hook touches the shared model and threads do not
        interfere.
        """
        x = to_model_input(image[None].to(self.device))
        network = self.fp32
        with torch.no_grad():
            summaries, activation = network.through_body(x)
        activation.requires_grad_(True)
        with torch.enable_grad():
            features = network.head[:-1](activation)
            logits = network.head[-1](features)
            target = int(logits[0].argmax()) if class_id is None else class_id
            (gradient,) = torch.autograd.grad(logits[0, target], activation)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
        size = (self.record.image_size, self.record.image_size)
        cam = nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
        peak = cam.max()
        cam = cam / peak if peak > 0 else torch.zeros_like(cam)
        probs = (logits.detach()[0] / self.record.temperature).softmax(dim=0).cpu()
        outliers = self.record.outliers
        unlike = None if outliers is None else outliers.unlike([*summaries, features.detach()]).cpu()
        return probs, cam.clamp_(0, 1).float().cpu().numpy(), unlike


_models: FileCache[InferenceModel] = FileCache()


def load_model(model_path: str | os.PathLike[str] = DEFAULT_MODEL, device: str = "auto") -> InferenceModel:
    """The prepared model of a checkpoint on `device` (auto: a GPU where there is one), loaded once and
    reused until the file changes."""
    path = Path(model_path).resolve()
    where = select_device(device)

    def prepare() -> InferenceModel:
        return InferenceModel(read_checkpoint(path, map_location=where), path.name, where)

    try:
        return _models.get(path, prepare, key=(path, where.type))
    except OSError:
        read_checkpoint(path)  # raises the Galaxy10Error that says the file is missing
        raise


# ---------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    """One image's classification: the best class, every class's (calibrated) probability, the k best, and
    how far to trust it: the normalised entropy (0 certain, 1 uniform), the margin between the two best
    classes, and the flag (ok, uncertain, unlike-training; trust.py)."""

    class_id: int
    class_name: str
    confidence: float
    probabilities: tuple[float, ...]  # by class id; they sum to 1
    class_names: tuple[str, ...]
    model: str  # the checkpoint's file name
    top_k: tuple[tuple[int, str, float], ...]  # (class_id, class_name, probability), most probable first
    entropy: float = 0.0
    margin: float = 0.0
    flag: str = trust.OK
    embedding: tuple[float, ...] | None = None  # the penultimate features, where asked for

    @classmethod
    def from_probabilities(cls, probs: torch.Tensor, model: InferenceModel, top_k: int | None,
                           unlike: bool | None = None, min_confidence: float = trust.DEFAULT_MIN_CONFIDENCE,
                           embedding: torch.Tensor | None = None) -> Prediction:
        values = tuple(float(p) for p in probs.double())
        order = sorted(range(len(values)), key=lambda i: -values[i])[: _top_k_count(top_k, len(values))]
        best = order[0]
        return cls(
            class_id=best,
            class_name=model.class_names[best],
            confidence=values[best],
            probabilities=values,
            class_names=model.class_names,
            model=model.name,
            top_k=tuple((i, model.class_names[i], values[i]) for i in order),
            entropy=float(trust.entropy(probs.double())),
            margin=float(trust.margin(probs.double())),
            flag=trust.flag(values[best], unlike, min_confidence),
            embedding=None if embedding is None else tuple(embedding.tolist()),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "class_id": self.class_id,
            "class_name": self.class_name,
            "confidence": self.confidence,
            "entropy": self.entropy,
            "margin": self.margin,
            "flag": self.flag,
            "probabilities": list(self.probabilities),
            "class_names": list(self.class_names),
            "model": self.model,
            "top_k": [{"class_id": i, "class_name": name, "probability": p} for i, name, p in self.top_k],
        }


def _top_k_count(top_k: int | None, num_classes: int) -> int:
    if top_k is None:
        return num_classes
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    return min(top_k, num_classes)


def predict(
    source: Source,
    model_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    top_k: int | None = None,
    tta: bool = False,
    exact: bool = False,
    min_confidence: float = trust.DEFAULT_MIN_CONFIDENCE,
) -> Prediction:
    """Classify one image. `tta` averages over the 8 flips and quarter turns; `exact` computes in
    float32 only (about half as fast where the CPU has native bfloat16); a confidence under
    `min_confidence` flags the answer uncertain."""
    model = load_model(model_path)
    image = model.preprocess(open_image(source))
    return _predictions(model, image[None], top_k, tta, exact, min_confidence)[0]


def iter_predictions(
    sources: Iterable[Source],
    model_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    tta: bool = False,
    batch_size: int = 16,
    top_k: int | None = None,
    exact: bool = False,
    device: str = "auto",
    min_confidence: float = trust.DEFAULT_MIN_CONFIDENCE,
    embeddings: bool = False,
) -> Iterator[Prediction | ImageError]:
    """Predictions in the order of `sources`, read lazily in batches (with `embeddings`, each with its
    penultimate features); an unreadable source yields its ImageError instead, so one bad file never stops
    the rest."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model = load_model(model_path, device)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for decoded in _decoded_batches(sources, model, batch_size, pool):
            images = [item for item in decoded if isinstance(item, torch.Tensor)]
            answers = iter(_predictions(model, torch.stack(images), top_k, tta, exact, min_confidence,
                                        embeddings) if images else [])
            for item in decoded:
                yield item if isinstance(item, ImageError) else next(answers)


def _predictions(model: InferenceModel, images: torch.Tensor, top_k: int | None, tta: bool, exact: bool,
                 min_confidence: float, embeddings: bool = False) -> list[Prediction]:
    """The Prediction of each image of a uint8 batch."""
    probs, unlike, hidden = model.classify(images, tta=tta, exact=exact)
    return [Prediction.from_probabilities(p, model, top_k, None if unlike is None else bool(unlike[i]),
                                          min_confidence, hidden[i] if embeddings else None)
            for i, p in enumerate(probs)]


def features(sources: Iterable[Source], model_path: str | os.PathLike[str] = DEFAULT_MODEL, *,
             batch_size: int = 16, device: str = "auto") -> np.ndarray:
    """The penultimate features (N, D) of the images, in order, as float32: an embedding in the network's own
    terms, for finding galaxies like one another or unlike all; an unreadable source raises its ImageError."""
    rows = []
    for result in iter_predictions(sources, model_path, batch_size=batch_size, device=device, exact=True,
                                   embeddings=True):
        if isinstance(result, ImageError):
            raise result
        rows.append(result.embedding)
    width = load_model(model_path, device).embedding_size
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), width)


def predict_batch(
    sources: Iterable[Source], model_path: str | os.PathLike[str] = DEFAULT_MODEL, **options: Any
) -> list[Prediction | ImageError]:
    """Classify many images for throughput (decoding overlaps the model); options as iter_predictions."""
    return list(iter_predictions(sources, model_path, **options))


def _decoded_batches(
    sources: Iterable[Source], model: InferenceModel, batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[list[torch.Tensor | ImageError]]:
    """Batches of model inputs; the next one decodes in `pool` while the caller runs the model on this one."""
    remaining = iter(sources)
    pending: list[Future[torch.Tensor | ImageError]] = []
    while True:
        sources_now = islice(remaining, batch_size)
        upcoming = [pool.submit(_decode_for_model, s, model) for s in sources_now]
        if pending:
            yield [future.result() for future in pending]
        if not upcoming:
            return
        pending = upcoming


def _decode_for_model(source: Source, model: InferenceModel) -> torch.Tensor | ImageError:
    try:
        return model.preprocess(open_image(source))
    except ImageError as err:
        return err


def main(img_path: Source, model_path: str | os.PathLike[str] = DEFAULT_MODEL) -> str:
    """The original entry point: the predicted class name of one image."""
    return predict(img_path, model_path).class_name


# ---------------------------------------------------------------- Grad-CAM


def grad_cam(
    source: Source, model_path: str | os.PathLike[str] = DEFAULT_MODEL, class_id: int | None = None
) -> tuple[Prediction, np.ndarray]:
    """The prediction (as `predict` makes it) and a Grad-CAM heatmap (S, S) float32 in [0, 1] for the
    predicted class, or for `class_id`: where the last conv block's evidence for that class lies."""
    model = load_model(model_path)
    image = model.preprocess(open_image(source))
    if class_id is not None and not 0 <= class_id < len(model.class_names):
        raise ValueError(f"class_id must be in 0..{len(model.class_names) - 1}, got {class_id}")
    probabilities, heatmap, unlike = model.grad_cam(image, class_id)
    outlier = None if unlike is None else bool(unlike[0])
    return Prediction.from_probabilities(probabilities, model, None, outlier), heatmap


def overlay_heatmap(
    image: Image.Image, heatmap: np.ndarray, crop: float = 1.0, alpha: float = 0.45, outside: float = 0.5
) -> Image.Image:
    """The image with the heatmap blended over the region the model saw (the whole frame, or the centre crop
    of a model trained with --crop) in the turbo colour map; outside a crop the image is dimmed to `outside`
    of its brightness."""
    rgb = to_rgb8(image)
    box = crop_box(rgb.size, crop)
    left, top, right, bottom = (0, 0, *rgb.size) if box is None else (round(edge) for edge in box)
    seen = rgb.crop((left, top, right, bottom))
    heat = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(seen.size, Image.BILINEAR)
    colours = colormaps["turbo"](np.clip(np.asarray(heat), 0.0, 1.0))[..., :3]
    overlay = Image.eval(rgb, lambda value: round(value * outside)) if box is not None else rgb.copy()
    heat_rgb = Image.fromarray((colours * 255 + 0.5).astype(np.uint8))
    overlay.paste(Image.blend(seen, heat_rgb, alpha), (left, top))
    return overlay


# ---------------------------------------------------------------- command line


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What decides the predictions: shards written with other settings are never resumed or merged."""
    return {
        "inputs": [file_identity(path) for path in args.paths],
        "model": file_identity(args.model),
        "path_column": args.path_column,
        "id_column": args.id_column,
        "tta": args.tta,
        "exact": args.exact,
        "min_confidence": args.min_confidence,
        "embeddings": args.embeddings is not None,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Classify galaxy images with a checkpoint written by cnn.py or the original project.",
        epilog="Unreadable inputs are reported (and in --out, given an error); the exit code is then 1 "
               "(0 under torchrun, which would otherwise stop the other processes).",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="an image, a folder (searched recursively for images), a Galaxy10-format .h5 file, or a "
             "catalog: a .csv or .parquet table with an image path per row, relative paths being from "
             "the table's folder (a catalog comes alone)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint (default: {DEFAULT_MODEL})")
    parser.add_argument("--top-k", type=_positive, default=3, help="classes listed per image (default: 3)")
    parser.add_argument(
        "--out", type=Path, metavar="FILE",
        help="write a row per input to FILE.parquet or FILE.csv: catalog id, path, class id and name, "
             "confidence, entropy, margin, flag, every class's probability, error (default: none; a catalog "
             "needs one)",
    )
    parser.add_argument(
        "--embeddings", type=Path, metavar="FILE",
        help="--out FILE.parquet with each input's penultimate features (the network's embedding) in an "
             "`embedding` column; shards, --resume and torchrun as --out (default: none)",
    )
    parser.add_argument(
        "--csv", type=Path, metavar="FILE",
        help="--out FILE, written as CSV whatever its suffix (default: none)",
    )
    parser.add_argument(
        "--path-column", default="path", help="a catalog's column of image paths (default: path)"
    )
    parser.add_argument(
        "--id-column", help="a catalog column copied into the output, e.g. an object id (default: none)"
    )
    parser.add_argument(
        "--shard", metavar="I/N",
        help="classify rows I, I+N, I+2N, ... only; the last of the N shards to finish writes --out "
             "(default: every row; under torchrun: RANK/WORLD_SIZE)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue a killed run of the same command: rows already written are kept (default: off)",
    )
    parser.add_argument(
        "--chunk-size", type=_positive, default=DEFAULT_CHUNK_ROWS,
        help=f"rows written at a time, a whole number of batches; a killed run loses at most one chunk "
             f"(default: {DEFAULT_CHUNK_ROWS})",
    )
    parser.add_argument(
        "--tta", action="store_true",
        help="average over the 8 flips and quarter turns: 8x the work (default: off)",
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=16, help="images per forward pass (default: 16)"
    )
    parser.add_argument(
        "--min-confidence", type=_fraction, default=trust.DEFAULT_MIN_CONFIDENCE,
        help="flag an answer `uncertain` when its calibrated confidence is under this "
             f"(default: {trust.DEFAULT_MIN_CONFIDENCE:g})",
    )
    parser.add_argument(
        "--exact", action="store_true",
        help="float32 throughout: probabilities equal the plain model's, about 2x slower where the "
             "CPU has native bfloat16 (default: off)",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="auto (a GPU where there is one; under torchrun the process's LOCAL_RANK GPU), cpu or cuda "
             "(default: auto)",
    )
    return parser.parse_args(argv)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cli_main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns 1 when any input was unreadable (the rest are still classified)."""
    args = parse_args(argv)
    output = plan_output(embeddings_file(args), csv=args.csv, shard=args.shard, resume=args.resume,
                         chunk_size=args.chunk_size, batch_size=args.batch_size)
    with torchrun_group(args.device, gpu_collectives=False, timeout=BARRIER_TIMEOUT):
        return classify_inputs(args, output)


def embeddings_file(args: argparse.Namespace) -> Path | None:
    """The output file: --embeddings FILE (a Parquet file: a list column has no CSV form) or --out FILE."""
    if args.embeddings is None:
        return args.out
    if args.out is not None or args.csv is not None:
        raise Galaxy10Error("--embeddings FILE is --out FILE with an embedding column: give one of them")
    if args.embeddings.suffix.lower() != ".parquet":
        raise Galaxy10Error(f"--embeddings {args.embeddings}: name a .parquet file (a CSV cannot hold the "
                            "embedding vectors)")
    return args.embeddings


def classify_inputs(args: argparse.Namespace, output: Output) -> int:
    """Check the inputs, then classify this process's rows: printed, or (with --out) written to its shard
    by catalog.write_predictions, which merges the shards where this process is the one to."""
    model = load_model(args.model, args.device)
    inputs = find_inputs(args.paths, args.path_column, args.id_column)
    for problem in inputs.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if inputs.count() == 0:
        raise Galaxy10Error("nothing to classify: give image files, folders of images, a Galaxy10 .h5 file "
                            "or a catalog")
    if inputs.catalog is not None and output.path is None:
        raise Galaxy10Error("a catalog's predictions go to a file: add --out predictions.parquet (or .csv)")
    table = None if inputs.catalog else ResultTable(inputs.names(), model.class_names)
    classify = RowClassifier(args, output.shard.size(inputs.count()), table)
    if output.path is None:
        for _ in classify(output.shard.select(inputs.rows()), 0):
            pass
    else:
        width = model.embedding_size if args.embeddings else None
        schema = output_schema(model.class_names, inputs.catalog and inputs.catalog.id_field, width)
        settings = run_settings(args)
        if not write_predictions(output, inputs.rows(), classify, schema, settings, args.id_column):
            return 130
    failures = len(inputs.problems) + classify.failures
    return final_report(inputs, model.class_names, failures, output.torchrun)


def final_report(inputs: Inputs, class_names: Sequence[str], failures: int, torchrun: bool) -> int:
    """Accuracy for labelled .h5 files, the count of unreadable inputs; returns the exit code."""
    for source in inputs.sources:
        if isinstance(source, H5Input) and source.file.labels is not None:
            done = source.predicted >= 0
            print(format_accuracy(str(source.file.path), source.file.labels[done], source.predicted[done],
                                  class_names))
    if not failures:
        return 0
    print(f"{failures} input(s) could not be read (listed above)", file=sys.stderr)
    # A non-zero exit makes torchrun stop the other processes and report the run as failed.
    return 0 if torchrun else 1


@dataclass
class RowClassifier:
    """The command line's classifying function, which catalog.write_predictions is given: predicts rows in
    order with a progress bar, prints each in `table`, notes .h5 rows' classes, counts the unreadable."""

    args: argparse.Namespace
    total: int | None  # rows of this shard, where known in advance
    table: ResultTable | None
    failures: int = 0

    def __call__(self, rows: Iterator[Row], done: int) -> Iterator[tuple[Row, Prediction | ImageError]]:
        to_model, to_output = tee(rows)
        args = self.args
        predictions = iter_predictions(
            (row.source for row in to_model), args.model, tta=args.tta, batch_size=args.batch_size,
            top_k=args.top_k, exact=args.exact, device=args.device, min_confidence=args.min_confidence,
            embeddings=args.embeddings is not None,
        )
        if self.table:
            tqdm.write(self.table.header())
        with tqdm(total=self.total, initial=done, unit="img", desc="classifying") as bar:
            for row, result in zip(to_output, predictions, strict=True):
                bar.update()
                self.show(row, result)
                yield row, result

    def show(self, row: Row, result: Prediction | ImageError) -> None:
        if isinstance(result, ImageError):
            self.failures += 1
            tqdm.write(f"unreadable: {result}", file=sys.stderr)
            return
        if self.table:
            tqdm.write(self.table.row(row.name, result))
        if row.tag is not None:  # an .h5 file's row, scored against its `ans` at the end
            h5, index = row.tag
            h5.predicted[index] = result.class_id


class ResultTable:
    """Fixed-width lines: path, predicted class, confidence, entropy, margin, flag, the k best classes."""

    def __init__(self, names: Iterable[str], class_names: Sequence[str]) -> None:
        self.path_width = min(max(len(n) for n in names), 60)
        self.class_width = max(len(c) for c in class_names)
        self.flag_width = max(len(f) for f in trust.FLAGS)

    def header(self) -> str:
        return (f"{'path':<{self.path_width}}  {'class':<{self.class_width}}  {'conf':>6}  {'entropy':>7}  "
                f"{'margin':>6}  {'flag':<{self.flag_width}}  top-k")

    def row(self, name: str, prediction: Prediction) -> str:
        best = ", ".join(f"{class_name} {p:.1%}" for _, class_name, p in prediction.top_k)
        return (f"{name:<{self.path_width}}  {prediction.class_name:<{self.class_width}}  "
                f"{prediction.confidence:>6.1%}  {prediction.entropy:>7.3f}  {prediction.margin:>6.3f}  "
                f"{prediction.flag:<{self.flag_width}}  {best}")


if __name__ == "__main__":
    sys.exit(run_cli(cli_main))
