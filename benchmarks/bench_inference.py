"""Inference speed at 256 px on this machine's CPU: the original per-call path against inference.

    python benchmarks/bench_inference.py

Measures, in one run on one randomly initialised 256 px checkpoint (304 MB, in a temporary folder):
(a) the original's per-call path (torch.load, build the model, predict one image; its 1 s sleep is
reported separately), (b) the plain float32 eager model, warm, (c) `inference.predict`, warm, by
default (bfloat16 where the CPU has it), with exact=True (float32), and on a copy of the checkpoint with
what `cnn.py --calibrate` adds (issue 24's target: the unlike-training score may cost at most 10%), (b) and
(c) interleaved call by call so that load from other processes hits them alike, and (d) batch throughput
including PNG decoding.
Also checks that both modes of `predict` pick the same class as the plain model on every sample image.
Prints a table and writes its rows to benchmarks/results/bench_inference.json (`make results` renders it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from galaxy10 import inference, trust
from galaxy10.dataset import CLASS_NAMES
from galaxy10.distributed import native_bf16
from galaxy10.models import Checkpoint, ModelRecord, read_checkpoint
from galaxy10.networks import DEFAULT_ARCH, CNNModel, staged
from galaxy10.preprocessing import Preprocessing, image_to_tensor, to_model_input

import record

ROOT = Path(__file__).resolve().parents[1]

REAL_IMAGES = ROOT.parent / "shared" / "real_galaxy10" / "images"
ORIGINAL_SLEEP_S = 1.0
COLUMNS = [
    {"key": "median_ms", "label": "warm single image, median ms", "format": ",.1f"},
    {"key": "p90_ms", "label": "p90 ms", "format": ".1f"},
    {"key": "batch_images_per_s", "label": "batches with decoding, images/s", "format": ".1f"},
    {"key": "top1_identical", "label": "top-1 as plain fp32 (real images)", "format": ""},
    {"key": "trust_cost", "label": "time vs predict() without trust statistics", "format": "+.1%"},
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="warm calls per path (default: 30)")
    parser.add_argument("--original-calls", type=int, default=3, help="original-path calls (default: 3)")
    parser.add_argument("--batch-images", type=int, default=64, help="images for throughput (default: 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_inference.json",
        help="result file, benchmarks/record.py's format (default: benchmarks/results/bench_inference.json)",
    )
    return parser.parse_args(argv)


def sample_images(count: int, folder: Path) -> list[Path]:
    """`count` PNG files: the real galaxies re-encoded where ../shared has them, else synthetic blobs."""
    real = sorted(REAL_IMAGES.glob("*")) if REAL_IMAGES.is_dir() else []
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        if real:
            image = Image.open(real[i % len(real)]).convert("RGB")
        else:
            y, x = np.mgrid[0:256, 0:256] / 256
            blob = np.exp(-((x - rng.uniform(0.3, 0.7)) ** 2 + (y - rng.uniform(0.3, 0.7)) ** 2) / 0.01)
            noise = rng.normal(0, 6, (256, 256, 3))
            image = Image.fromarray(np.clip(blob[..., None] * 220 + noise + 10, 0, 255).astype(np.uint8))
        paths.append(folder / f"galaxy_{i:03d}.png")
        image.save(paths[-1])
    return paths


def write_random_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = CNNModel(image_size=256)
    Checkpoint(ModelRecord(DEFAULT_ARCH, CLASS_NAMES, Preprocessing(256)), model.state_dict()).save(path)


def write_trusted_checkpoint(source: Path, path: Path, images: list[Path]) -> None:
    """The same network with what `cnn.py --calibrate` adds: a temperature and the unlike-training
    statistics (every stage's, fitted on the sample images' features the way --calibrate fits them), so that
    predict() can be timed with and without them."""
    checkpoint = read_checkpoint(source)
    x = torch.stack([image_to_tensor(Image.open(p), 256) for p in images])
    with torch.no_grad():
        features, logits = staged(checkpoint.model().eval())(to_model_input(x))
    outliers = trust.fit_outliers_on_val(features, logits.argmax(1))
    record = dataclasses.replace(checkpoint.record, temperature=1.5, outliers=outliers)
    Checkpoint(record, checkpoint.weights).save(path)


def original_call(image_path: Path, model_path: Path) -> int:
    """What the original did per prediction (minus its sleep): load, build, preprocess, classify."""
    checkpoint = torch.load(model_path, map_location="cpu", weights_only=False)
    model = CNNModel(num_classes=10)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    image = Image.open(image_path).convert("RGB").resize((256, 256))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)[None]
    with torch.no_grad():
        return int(model(x).argmax(1))


def plain_call(model: CNNModel) -> Callable[[Path], int]:
    def call(image_path: Path) -> int:
        x = to_model_input(image_to_tensor(Image.open(image_path), 256)[None])
        with torch.no_grad():
            return int(model(x).argmax(1))
    return call


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "n": len(ms)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results: dict[str, object] = {"threads": torch.get_num_threads(), "load_average_before": os.getloadavg(),
                                  "bf16": native_bf16(torch.device("cpu"))}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = folder / "random_256.pth"
        write_random_checkpoint(ckpt)
        images = sample_images(max(args.batch_images, 8), folder)
        trusted = folder / "random_256_calibrated.pth"
        write_trusted_checkpoint(ckpt, trusted, images)
        single = images[0]

        original = [timed(lambda: original_call(single, ckpt)) for _ in range(args.original_calls)]
        results["original_per_call"] = summary(original)

        plain_model = read_checkpoint(ckpt).model()
        plain = plain_call(plain_model)
        load_s = timed(lambda: inference.load_model(ckpt))
        results["first_load_s"] = load_s
        for _ in range(3):  # warm-up: oneDNN builds its kernels on the first calls
            plain(single)
            inference.predict(single, ckpt)
            inference.predict(single, ckpt, exact=True)
            inference.predict(single, trusted)
        times: dict[str, list[float]] = {"plain": [], "predict": [], "predict_exact": [], "predict_trust": []}
        for i in range(args.calls):
            image = images[i % len(images)]
            times["plain"].append(timed(lambda: plain(image)))  # noqa: B023 (called at once)
            times["predict"].append(timed(lambda: inference.predict(image, ckpt)))  # noqa: B023
            times["predict_exact"].append(timed(lambda: inference.predict(image, ckpt, exact=True)))  # noqa: B023
            times["predict_trust"].append(timed(lambda: inference.predict(image, trusted)))  # noqa: B023
        for name, seconds in times.items():
            results[f"{name}_warm"] = summary(seconds)
        # Paired call by call, as the calls were interleaved: the cost of scoring every stage's features.
        results["trust_cost"] = statistics.median(
            t / p for t, p in zip(times["predict_trust"], times["predict"], strict=True)) - 1

        batch = images[: args.batch_images]
        plain_batch_s = timed(lambda: plain_batch(plain_model, batch, args.batch_size))
        ours_batch_s = timed(lambda: inference.predict_batch(batch, ckpt, batch_size=args.batch_size))
        exact_batch_s = timed(lambda: inference.predict_batch(batch, ckpt, batch_size=args.batch_size,
                                                                  exact=True))
        results["plain_batch_images_per_s"] = len(batch) / plain_batch_s
        results["predict_batch_images_per_s"] = len(batch) / ours_batch_s
        results["predict_batch_exact_images_per_s"] = len(batch) / exact_batch_s
        results["fidelity"] = fidelity(plain_model, ckpt, exact=False)
        results["fidelity_exact"] = fidelity(plain_model, ckpt, exact=True)
    results["load_average_after"] = os.getloadavg()
    report(results)
    record.write(args.out.stem, result_rows(results, record.command(__file__, argv)),
                 title="Inference, 256 px", columns=COLUMNS, last_run=results, folder=args.out.parent)


def result_rows(r: dict, cmd: str) -> list[dict]:
    """The table's rows in benchmarks/record.py's format."""
    def top1(key: str) -> dict:
        f = r[key]
        return {"top1_identical": f"{f['top1_identical']}/{f['images']}"} if f["images"] else {}

    def warm(key: str) -> dict:
        return {"median_ms": r[key]["median_ms"], "p90_ms": r[key]["p90_ms"]}

    original = r["original_per_call"]["median_ms"]
    return [
        record.row("predict()", cmd, {**warm("predict_warm"),
                                      "batch_images_per_s": r["predict_batch_images_per_s"],
                                      **top1("fidelity")}),
        record.row("predict(), with what --calibrate adds", cmd, {**warm("predict_trust_warm"),
                                                                   "trust_cost": r["trust_cost"]}),
        record.row("predict(exact=True)", cmd, {**warm("predict_exact_warm"),
                                                "batch_images_per_s": r["predict_batch_exact_images_per_s"],
                                                **top1("fidelity_exact")}),
        record.row("plain float32 eager", cmd, {**warm("plain_warm"),
                                                "batch_images_per_s": r["plain_batch_images_per_s"]}),
        record.row("original, reload per call", cmd, {"median_ms": original}),
        record.row("original, with its 1 s sleep", cmd, {"median_ms": original + 1000 * ORIGINAL_SLEEP_S}),
    ]


def plain_batch(model: CNNModel, paths: list[Path], batch_size: int) -> None:
    for start in range(0, len(paths), batch_size):
        x = torch.stack([image_to_tensor(Image.open(p), 256) for p in paths[start : start + batch_size]])
        with torch.no_grad():
            model(to_model_input(x))


def fidelity(plain_model: CNNModel, ckpt: Path, exact: bool) -> dict[str, object]:
    """Top-1 and probabilities of `predict` against the plain float32 model on every sample image."""
    sources = sorted(REAL_IMAGES.glob("*")) if REAL_IMAGES.is_dir() else []
    if not sources:
        return {"images": 0}
    ours = inference.predict_batch(sources, ckpt, exact=exact)
    x = torch.stack([image_to_tensor(Image.open(p), 256) for p in sources])
    with torch.no_grad():
        logits = torch.cat([plain_model(to_model_input(x[i : i + 8])) for i in range(0, len(x), 8)])
    reference = logits.softmax(dim=1)
    probs = torch.tensor([p.probabilities for p in ours], dtype=torch.float32)
    return {
        "images": len(sources),
        "top1_identical": int((probs.argmax(1) == reference.argmax(1)).sum()),
        "max_abs_prob_diff": float((probs - reference).abs().max()),
    }


def report(r: dict) -> None:
    original = r["original_per_call"]["median_ms"]
    plain, ours = r["plain_warm"], r["predict_warm"]
    rows = [
        ("(a) original per call, no sleep", f"{original:.0f} ms", f"{original / ours['median_ms']:.1f}x"),
        ("(a) original per call, with 1 s sleep", f"{original + 1000 * ORIGINAL_SLEEP_S:.0f} ms",
         f"{(original + 1000 * ORIGINAL_SLEEP_S) / ours['median_ms']:.1f}x"),
        ("(b) plain fp32 eager, warm (median/p90)", f"{plain['median_ms']:.1f} / {plain['p90_ms']:.1f} ms",
         f"{plain['median_ms'] / ours['median_ms']:.2f}x"),
        ("(c) predict(), warm (median/p90)", f"{ours['median_ms']:.1f} / {ours['p90_ms']:.1f} ms", "1.00x"),
        ("(c) predict(), with --calibrate's statistics", f"{r['predict_trust_warm']['median_ms']:.1f} / "
         f"{r['predict_trust_warm']['p90_ms']:.1f} ms", f"{r['trust_cost']:+.1%} (paired)"),
        ("(c) predict(exact=True), warm", f"{r['predict_exact_warm']['median_ms']:.1f} / "
         f"{r['predict_exact_warm']['p90_ms']:.1f} ms",
         f"{r['predict_exact_warm']['median_ms'] / ours['median_ms']:.2f}x slower"),
        ("(d) plain fp32 batch, incl. decoding", f"{r['plain_batch_images_per_s']:.1f} img/s", ""),
        ("(d) predict_batch, incl. decoding", f"{r['predict_batch_images_per_s']:.1f} img/s",
         f"{r['predict_batch_images_per_s'] / r['plain_batch_images_per_s']:.2f}x plain"),
        ("(d) predict_batch(exact=True)", f"{r['predict_batch_exact_images_per_s']:.1f} img/s",
         f"{r['predict_batch_exact_images_per_s'] / r['plain_batch_images_per_s']:.2f}x plain"),
    ]
    print(f"threads {r['threads']}, bf16 {r['bf16']}, first load {r['first_load_s']:.1f} s, load average "
          f"{r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f} (others share the CPU)")
    print(f"{'path':<42}  {'time':>22}  {'vs predict':>12}")
    for name, value, ratio in rows:
        print(f"{name:<42}  {value:>22}  {ratio:>12}")
    for key, label in (("fidelity", "predict()"), ("fidelity_exact", "predict(exact=True)")):
        f = r[key]
        if f["images"]:
            print(f"{label} on {f['images']} sample images: top-1 identical to plain fp32 "
                  f"{f['top1_identical']}/{f['images']}, max |p - p_fp32| {f['max_abs_prob_diff']:.1e}")


if __name__ == "__main__":
    main()
