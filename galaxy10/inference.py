"""Inference: a checkpoint's model prepared once for speed (`InferenceModel`, `load_model`) and what it says
of images: one (`predict`), many in batches (`iter_predictions`, `predict_batch`), their embeddings
(`features`) and where the evidence lies (`grad_cam`). This is the model users get, and the one training's
report, `cnn.py --evaluate` and `--calibrate` measure (evaluation.py).

Prepared means: BatchNorm folded into the convolutions, channels_last, and, where the CPU computes bfloat16
natively (AVX512-BF16 or AMX), the convolutions and the first linear layer in bfloat16 (the speed-up:
docs/results.md, "Inference, 256 px"). Images whose two best classes are nearly tied are recomputed in
float32; as a few near ties can still differ from float32, `exact=True` (`--exact`) is there for results
that must equal float32's. Images are read by images.py; what a model is, is its record in models.py; what
an answer says, prediction.py.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from galaxy10 import trust
from galaxy10.distributed import native_bf16, select_device
from galaxy10.files import FileCache
from galaxy10.images import ImageError, Source, bands_of, open_image
from galaxy10.models import DEFAULT_CHECKPOINT, Checkpoint, ModelRecord, read_checkpoint
from galaxy10.networks import StagedNetwork, fold_batchnorm, staged
from galaxy10.prediction import Prediction
from galaxy10.preprocessing import crop_box, dihedral_views, to_model_input, to_rgb8

# Where an image's two best bfloat16 logits are closer than this share of its logit range (max - min),
# float32 decides. bfloat16 moves logits by a fraction of a percent of the range, with a long tail; a margin
# wide enough to settle every tie would recompute most images (what it changes: docs/results.md, the
# inference table's "top-1 as plain fp32" column).
NEAR_TIE = 0.03
TTA_VIEWS = 8  # the flips and quarter turns of the square


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


def _precision_pass(stages: list[nn.Module], head: nn.Sequential, dtype: torch.dtype, orientations: int
                    ) -> StagedNetwork:
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
    return StagedNetwork([first, *low[1:len(stages)]], tail, orientations).eval().requires_grad_(False)


@dataclass(frozen=True)
class Member:
    """One network of a model (a committee has several), prepared: float32, and where the device computes
    bfloat16 natively a bfloat16 copy up to the first linear layer (else the float32 one again)."""

    fp32: StagedNetwork
    bf16: StagedNetwork

    @classmethod
    def prepare(cls, network: nn.Module, spaces: int | None, device: torch.device) -> Member:
        """The network cut into stages giving the last `spaces` features (all: None), BatchNorm folded into
        the stages, on `device`."""
        staged_network = staged(network, features=spaces)
        stages = [fold_batchnorm(stage).to(device, memory_format=torch.channels_last)
                  for stage in staged_network.stages]
        head, orientations = staged_network.head.to(device), staged_network.orientations
        fp32 = _precision_pass(stages, head, torch.float32, orientations)
        bf16 = _precision_pass(stages, head, torch.bfloat16, orientations) if native_bf16(device) else fp32
        return cls(fp32, bf16)


class InferenceModel:
    """A checkpoint's model prepared for inference; shared by every thread (nothing in it is mutated). Its
    record (models.ModelRecord) says what it is: network, classes, calibration, and the preprocessing,
    applied by `preprocess`. A committee (cnn.py --folds) is served as one model: its members' calibrated
    probabilities averaged, their embeddings side by side, their unlike-training statistics combined
    (trust.CommitteeOutliers). It computes the features the record's statistics score (the penultimate, the
    embedding, at least), or with `all_features` every stage's (evaluation.py fits the statistics on them)."""

    def __init__(self, checkpoint: Checkpoint, name: str, device: torch.device, all_features: bool = False
                 ) -> None:
        self.name = name
        self.record = checkpoint.record
        self.class_names = checkpoint.record.class_names
        self.device = device
        outliers = self.record.outliers
        spaces = None if all_features else 1 if outliers is None else outliers.spaces_per_member
        self.members = [Member.prepare(network, spaces, device) for network in checkpoint.networks()]

    def with_record(self, record: ModelRecord) -> InferenceModel:
        """This prepared model under another record of the same weights (a new calibration, fitted on the
        features this one computes)."""
        served = copy.copy(self)
        served.record = record
        return served

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The uint8 (3, S, S) tensor this model sees of an image: its training's preprocessing."""
        try:
            return self.record.preprocessing(image)
        except (OSError, ValueError) as err:  # modes PIL cannot convert to RGB
            raise ImageError(f"cannot convert a {image.mode} image to RGB ({err})") from None

    @property
    def embedding_size(self) -> int:
        """The width of the penultimate features (the input of the output layer), of every member."""
        return sum(member.fp32.head[-1].in_features for member in self.members)

    def forward(self, images: torch.Tensor, *, tta: bool = False, exact: bool = False
                ) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
        """Each member's features (one (B, D) tensor per space, the penultimate last) of a uint8 batch
        (B, 3, S, S) as it is, and the logits before calibration of every member and view, stacked: (M, B, C),
        or with `tta` (8M, B, C), each member's 8 flips and quarter turns (one forward pass of 8B images).
        Calibrating them (trust.calibrated) averages the members' and views' probabilities. With `exact`,
        float32 throughout."""
        x = to_model_input(images.to(self.device))
        views = dihedral_views(x) if tta else x
        features, logits = [], []
        with torch.inference_mode():
            for member in self.members:
                network = member.fp32 if exact else member.bf16
                member_features, member_logits = network(views)
                if network is not member.fp32:
                    member_logits = _settle_near_ties(member.fp32, views, member_logits)
                features.append([space[: len(images)] for space in member_features])
                logits.append(member_logits.view(-1, len(images), member_logits.shape[-1]))
        return features, torch.cat(logits)

    def classify(self, images: torch.Tensor, *, tta: bool | None = None, exact: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Calibrated class probabilities (B, C) for a uint8 batch (B, 3, S, S) (with `tta` averaged over the
        8 flips and quarter turns; None: as the record says the model answers), which images lie unlike the
        training set (None where the record has no statistics for it), and their penultimate features
        (B, D), the embedding. How unlike the training set an image is, is read from the features of the
        image as it is (not turned)."""
        features, logits = self.forward(images, tta=self.record.tta if tta is None else tta, exact=exact)
        with torch.inference_mode():
            probs = trust.calibrated(logits, self.record.temperature)
            outliers = self.record.outliers
            unlike = None if outliers is None else outliers.unlike_members(features).cpu()
            embedding = torch.cat([member[-1] for member in features], dim=1)
        return probs.cpu(), unlike, embedding.cpu()

    def grad_cam(self, image: torch.Tensor, class_id: int | None
                 ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
        """Calibrated class probabilities (C,) of one uint8 image (3, S, S), its Grad-CAM (S, S) in [0, 1] for
        `class_id` (None: the predicted class; a committee's, the mean of its members' maps), and whether it
        lies unlike the training set (as `classify`), all from one float32 forward pass of each member.

        The last convolutional stage's activation (DeepCNN-5Block's before its max-pool) is detached and made
        the leaf that autograd differentiates to, so no hook touches the shared model and threads do not
        interfere.
        """
        x = to_model_input(image[None].to(self.device))
        passes = [_differentiable_pass(member.fp32, x) for member in self.members]
        logits = torch.stack([member_logits.detach() for _, _, _, member_logits in passes])  # (M, 1, C)
        probs = trust.calibrated(logits, self.record.temperature)[0].cpu()
        target = int(probs.argmax()) if class_id is None else class_id
        size = (self.record.image_size, self.record.image_size)
        cam = torch.stack([_cam(activation, member_logits[0, target], size)
                           for _, activation, _, member_logits in passes]).mean(0)
        outliers = self.record.outliers
        unlike = None if outliers is None else outliers.unlike_members(
            [[*summaries, features.detach()] for summaries, _, features, _ in passes]).cpu()
        return probs, cam.clamp_(0, 1).float().cpu().numpy(), unlike

    def predictions(self, images: torch.Tensor, bands: Sequence[str], *, top_k: int | None = None,
                    tta: bool | None = None, exact: bool = False,
                    min_confidence: float = trust.DEFAULT_MIN_CONFIDENCE, embeddings: bool = False
                    ) -> list[Prediction]:
        """The Prediction of each image of a uint8 batch, made from these bands (with `embeddings`, each
        with its features)."""
        probs, unlike, hidden = self.classify(images, tta=tta, exact=exact)
        flags = [None] * len(probs) if unlike is None else [bool(u) for u in unlike]
        return [Prediction.of(p, self.class_names, self.name, top_k, flags[i], min_confidence,
                              hidden[i] if embeddings else None, bands[i])
                for i, p in enumerate(probs)]


def _settle_near_ties(fp32: StagedNetwork, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Recompute in float32 the images whose top two bfloat16 logits are too close to call."""
    top2 = logits.topk(2, dim=1).values
    spread = logits.max(dim=1).values - logits.min(dim=1).values
    doubtful = top2[:, 0] - top2[:, 1] < NEAR_TIE * spread
    if doubtful.any():
        logits[doubtful] = fp32(x[doubtful])[1]
    return logits


def _differentiable_pass(network: StagedNetwork, x: torch.Tensor
                         ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stage summaries, the last stage's activation as a leaf that requires its gradient, the
    penultimate features and the logits of one image."""
    with torch.no_grad():
        summaries, activation = network.through_body(x)
    activation.requires_grad_(True)
    with torch.enable_grad():
        features = network.head[:-1](activation)
        return summaries, activation, features, network.head[-1](features)


def _cam(activation: torch.Tensor, score: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM: the activation's channels weighted by the score's mean gradient, rectified, resized to the
    model's input and scaled to a peak of 1."""
    (gradient,) = torch.autograd.grad(score, activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return cam / peak if peak > 0 else torch.zeros_like(cam)


_models: FileCache[InferenceModel] = FileCache()


def load_model(model_path: str | os.PathLike[str] = DEFAULT_CHECKPOINT, device: str = "auto"
               ) -> InferenceModel:
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


def predict(
    source: Source,
    model_path: str | os.PathLike[str] = DEFAULT_CHECKPOINT,
    *,
    top_k: int | None = None,
    tta: bool | None = None,
    exact: bool = False,
    min_confidence: float = trust.DEFAULT_MIN_CONFIDENCE,
) -> Prediction:
    """Classify one image. `tta` averages over the 8 flips and quarter turns (None: as the checkpoint says
    its model answers, cnn.py --serve-tta); `exact` computes in float32 only (slower where the CPU has native
    bfloat16); a confidence under `min_confidence` flags the answer uncertain."""
    model = load_model(model_path)
    image = open_image(source)
    return model.predictions(model.preprocess(image)[None], [bands_of(image)], top_k=top_k, tta=tta,
                             exact=exact, min_confidence=min_confidence)[0]


def iter_predictions(
    sources: Iterable[Source],
    model_path: str | os.PathLike[str] = DEFAULT_CHECKPOINT,
    *,
    tta: bool | None = None,
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
    options: dict[str, Any] = {"top_k": top_k, "tta": tta, "exact": exact, "min_confidence": min_confidence,
                               "embeddings": embeddings}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for decoded in _decoded_batches(sources, model, batch_size, pool):
            images = [item for item in decoded if not isinstance(item, ImageError)]
            answers = iter(model.predictions(torch.stack([tensor for tensor, _ in images]),
                                             [bands for _, bands in images], **options) if images else [])
            for item in decoded:
                yield item if isinstance(item, ImageError) else next(answers)


def predict_batch(
    sources: Iterable[Source], model_path: str | os.PathLike[str] = DEFAULT_CHECKPOINT, **options: Any
) -> list[Prediction | ImageError]:
    """Classify many images for throughput (decoding overlaps the model); options as iter_predictions."""
    return list(iter_predictions(sources, model_path, **options))


def features(sources: Iterable[Source], model_path: str | os.PathLike[str] = DEFAULT_CHECKPOINT, *,
             batch_size: int = 16, device: str = "auto", exact: bool = False) -> np.ndarray:
    """The penultimate features (N, D) of the images, in order, in a float32 array: an embedding in the
    network's own terms, for finding galaxies like one another or unlike all; an unreadable source raises its
    ImageError. Computed as the answers are, and as --embeddings writes them: in bfloat16 where the CPU has it
    natively, in float32 with `exact` (--exact)."""
    rows = []
    for result in iter_predictions(sources, model_path, batch_size=batch_size, device=device, exact=exact,
                                   embeddings=True):
        if isinstance(result, ImageError):
            raise result
        rows.append(result.embedding)
    width = load_model(model_path, device).embedding_size
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), width)


Decoded = tuple[torch.Tensor, str] | ImageError  # the model's input and the image's bands, or why not


def _decoded_batches(
    sources: Iterable[Source], model: InferenceModel, batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[list[Decoded]]:
    """Batches of model inputs; the next one decodes in `pool` while the caller runs the model on this one."""
    remaining = iter(sources)
    pending: list[Future[Decoded]] = []
    while True:
        sources_now = islice(remaining, batch_size)
        upcoming = [pool.submit(_decode_for_model, s, model) for s in sources_now]
        if pending:
            yield [future.result() for future in pending]
        if not upcoming:
            return
        pending = upcoming


def _decode_for_model(source: Source, model: InferenceModel) -> Decoded:
    try:
        image = open_image(source)
        return model.preprocess(image), bands_of(image)
    except ImageError as err:
        return err


# ---------------------------------------------------------------- Grad-CAM


def grad_cam(
    source: Source, model_path: str | os.PathLike[str] = DEFAULT_CHECKPOINT, class_id: int | None = None
) -> tuple[Prediction, np.ndarray]:
    """The prediction (as `predict` makes it: with the 8 flips and quarter turns averaged where the model
    answers so) and a Grad-CAM heatmap (S, S) float32 in [0, 1] for the predicted class, or for `class_id`:
    where the last conv block's evidence for that class lies, in the image as it is."""
    model = load_model(model_path)
    picture = open_image(source)
    image = model.preprocess(picture)
    if class_id is not None and not 0 <= class_id < len(model.class_names):
        raise ValueError(f"class_id must be in 0..{len(model.class_names) - 1}, got {class_id}")
    if model.record.tta:  # the answer is the views' average; the map explains its class in the image itself
        prediction = model.predictions(image[None], [bands_of(picture)])[0]
        return prediction, model.grad_cam(image, prediction.class_id if class_id is None else class_id)[1]
    probabilities, heatmap, unlike = model.grad_cam(image, class_id)
    outlier = None if unlike is None else bool(unlike[0])
    return Prediction.of(probabilities, model.class_names, model.name, None, outlier,
                         bands=bands_of(picture)), heatmap


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
