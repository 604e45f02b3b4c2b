"""cnn_use_model.py: input kinds, the model cache, fidelity to the plain model, TTA, Grad-CAM, the CLI for
images, folders and .h5 files (catalogs and output files: test_catalog.py)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import cnn
import cnn_use_model as cum
from galaxy10 import data, inference, inputs, models, networks, preprocessing
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import Galaxy10Error, run_cli
from galaxy10.files import FileCache
from galaxy10.images import ImageTooLargeError, open_image
from galaxy10.networks import CNNModel
from galaxy10.preprocessing import image_to_tensor, to_model_input

from helpers import (
    ROOT,
    SIZE,
    aged,
    bomb_png,
    file_stamp,
    galaxy_array,
    one_thread_env,
    png_bytes,
    save_original_checkpoint,
    save_weights,
    spread_checkpoint,
    truncated,
    unsafe_checkpoint,
)

pytestmark = pytest.mark.usefixtures("cpu_inference")  # the references are CPU float32


def plain_probabilities(ckpt: Path, images: list[Image.Image], temperature: float = 1.0) -> torch.Tensor:
    """The reference: cnn.py's own model and preprocessing, float32, no optimisation; softmax(logits / T)
    computed here by hand."""
    checkpoint = models.read_checkpoint(ckpt)
    model = checkpoint.model()
    batch = torch.stack([image_to_tensor(image, checkpoint.record.image_size) for image in images])
    with torch.no_grad():
        return (model(to_model_input(batch)) / temperature).softmax(dim=1)


# ---------------------------------------------------------------- inputs and predictions


def test_every_source_kind_gives_the_same_prediction(ckpt: Path, tmp_path: Path) -> None:
    array = galaxy_array(1, size=80)
    path = tmp_path / "galaxy.png"
    Image.fromarray(array).save(path)
    sources = [str(path), path, path.read_bytes(), Image.open(path), array]
    results = [cum.predict(source, ckpt) for source in sources]
    for result in results[1:]:
        assert result.probabilities == results[0].probabilities
    grey = array.mean(axis=2).astype(np.uint8)
    assert cum.predict(grey, ckpt).probabilities == cum.predict(Image.fromarray(grey), ckpt).probabilities


def test_prediction_fields_and_json(ckpt: Path) -> None:
    prediction = cum.predict(galaxy_array(2), ckpt, top_k=3)
    probs = prediction.probabilities
    assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=1e-6)
    assert prediction.class_id == int(np.argmax(probs))
    assert prediction.confidence == max(probs)
    assert prediction.class_name == CLASS_NAMES[prediction.class_id]
    assert prediction.class_names == CLASS_NAMES and prediction.model == "model.pth"
    assert [k[0] for k in prediction.top_k] == list(np.argsort(probs)[::-1][:3])
    assert [k[2] for k in prediction.top_k] == sorted((k[2] for k in prediction.top_k), reverse=True)
    assert len(cum.predict(galaxy_array(2), ckpt).top_k) == 10
    decoded = json.loads(json.dumps(prediction.to_dict()))
    assert decoded["class_name"] == prediction.class_name and len(decoded["top_k"]) == 3
    with pytest.raises(AttributeError):
        prediction.class_id = 0  # frozen


def test_main_returns_the_class_name_as_the_original(ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(galaxy_array(3)).save(path)
    assert cum.main(str(path), str(ckpt)) == cum.predict(path, ckpt).class_name


def test_an_original_checkpoint_predicts_as_the_same_weights_in_this_projects_format(
    ckpt: Path, tmp_path: Path
) -> None:
    weights = torch.load(ckpt, weights_only=True)["model_state_dict"]
    original = save_original_checkpoint(tmp_path / "model.pth", weights)
    for seed in range(4):
        image = tmp_path / f"g{seed}.png"
        Image.fromarray(galaxy_array(seed)).save(image)
        ours, theirs = cum.predict(image, ckpt), cum.predict(image, original)
        assert (theirs.class_names, theirs.probabilities) == (ours.class_names, ours.probabilities)
        assert cum.main(str(image), str(original)) == ours.class_name


def test_predicting_with_an_original_checkpoint_never_rewrites_it(
    original_model: CNNModel, tmp_path: Path
) -> None:
    """The original's file is converted in memory only, by predict() and by the command line alike."""
    original = aged(save_original_checkpoint(tmp_path / "model.pth", original_model.state_dict()))
    before = file_stamp(original)
    image = tmp_path / "g.png"
    Image.fromarray(galaxy_array(5)).save(image)
    assert cum.predict(image, original).class_name in CLASS_NAMES
    assert run_cli(cum.cli_main, [str(image), "--model", str(original)]) == 0
    assert file_stamp(original) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "model.pth"]


def test_inference_preprocessing_is_trainings(real_galaxies: list[tuple[Path, int]], tmp_path: Path) -> None:
    """The prepared model's input for a real galaxy is what training decodes into its cache, crop included."""
    for size, crop in ((SIZE, 1.0), (64, 0.5)):
        path = save_weights(tmp_path / f"{size}.pth", CNNModel(10, size).state_dict(), size=size, crop=crop)
        model = cum.load_model(path)
        for galaxy, _ in real_galaxies[:6] + [g for g in real_galaxies if g[0].suffix == ".png"][:2]:
            expected = data.decode_images([galaxy], model.record.preprocessing, 1, "decoding")[0][0]
            assert torch.equal(model.preprocess(open_image(galaxy)), expected)
            assert torch.equal(expected, image_to_tensor(Image.open(galaxy), size, crop))


@pytest.fixture(scope="module")
def ckpt64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 px and not centred: as in a trained model, the logits' differences are not a tiny part of
    large activations (which bfloat16 could not resolve)."""
    return spread_checkpoint(tmp_path_factory.mktemp("model64") / "m64.pth", size=64, centred=False)


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the bfloat16 path on any CPU, as on one with AVX512-BF16 or AMX (PyTorch computes bfloat16 on
    other CPUs too, only slower), with a model cache of this test's own."""
    monkeypatch.setattr(inference, "native_bf16", lambda device: device.type == "cpu")
    monkeypatch.setattr(inference, "_models", FileCache())


@pytest.mark.usefixtures("native_bf16")
@pytest.mark.parametrize("exact", [True, False])
def test_optimised_model_matches_the_plain_model(ckpt64: Path, exact: bool) -> None:
    ckpt = ckpt64
    images = [Image.fromarray(galaxy_array(seed, size=72)) for seed in range(100, 110)]
    reference = plain_probabilities(ckpt, images).double()
    (member,) = cum.load_model(ckpt).members
    assert member.bf16 is not member.fp32  # the bfloat16 copy is made
    ours = torch.tensor([cum.predict(image, ckpt, exact=exact).probabilities for image in images])
    batch = cum.predict_batch(images, ckpt, batch_size=5, exact=exact)
    batched = torch.tensor([p.probabilities for p in batch])
    assert reference.argmax(1).unique().numel() > 1, "the images should not all get one class"
    for probs in (ours, batched):
        assert torch.equal(probs.argmax(1), reference.argmax(1))
        # float32 is exact up to rounding; bfloat16 moved these random models' probabilities by up to 0.011
        assert (probs - reference).abs().max() < (1e-4 if exact else 2e-2)


@pytest.mark.usefixtures("native_bf16")
class FixedLogits(torch.nn.Module):
    """A network pass that gives these logits whatever its input, with another pass's features."""

    def __init__(self, network: torch.nn.Module, logits: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        self.logits = logits

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.network(x)[0], self.logits.clone()


def test_near_ties_are_recomputed_in_float32_and_clear_cases_are_not(
    ckpt64: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = cum.load_model(ckpt64)
    images = torch.from_numpy(np.stack([galaxy_array(s, 64) for s in range(4)])).permute(0, 3, 1, 2)
    # As if bfloat16 had given these logits. Rows 0 and 2: the top two are 1% of the logits' range apart
    # (near ties, decided in float32); rows 1 and 3: 50% apart (kept).
    logits = torch.tensor([[5.0, 4.9, -5.0], [5.0, 0.0, -5.0], [-5.0, 4.9, 5.0], [0.0, 5.0, -5.0]])
    logits = torch.nn.functional.pad(logits, (0, 7), value=-5.0)
    (member,) = model.members
    monkeypatch.setattr(model, "members", [inference.Member(member.fp32, FixedLogits(member.fp32, logits))])
    probs = model.classify(images)[0]
    with torch.inference_mode():
        fp32 = member.fp32(preprocessing.to_model_input(images))[1].softmax(1)
    # float32 over 2 images here and 4 there: equal up to the last bits (oneDNN may pick other kernels
    # for another batch size); not rechecking would leave the fake logits' softmax, off by far more.
    torch.testing.assert_close(probs[[0, 2]], fp32[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(probs[[1, 3]], logits[[1, 3]].softmax(1), rtol=0, atol=1e-6)


@pytest.mark.usefixtures("no_native_bf16")
def test_a_cpu_without_native_bfloat16_infers_in_float32_only(tmp_path: Path) -> None:
    """Where the CPU lacks AVX512-BF16 and AMX, bfloat16 is emulated and slower: no bfloat16 copy is made,
    and every prediction is the float32 one."""
    path = spread_checkpoint(tmp_path / "m.pth", size=64, centred=False)  # a file no cache has seen
    model = cum.load_model(path, device="cpu")
    assert model.members[0].bf16 is model.members[0].fp32
    images = torch.from_numpy(np.stack([galaxy_array(s, 64) for s in range(4)])).permute(0, 3, 1, 2)
    assert torch.equal(model.classify(images)[0], model.classify(images, exact=True)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_inference_agrees_with_the_cpu(ckpt64: Path) -> None:
    images = [galaxy_array(seed, size=72) for seed in range(100, 110)]
    cpu, gpu = (torch.tensor([p.probabilities for p in cum.predict_batch(images, ckpt64, device=device)])
                for device in ("cpu", "cuda"))
    assert torch.equal(gpu.argmax(1), cpu.argmax(1))
    assert (gpu - cpu).abs().max() < 2e-3  # cuDNN convolves in TF32 by default: about 1e-3 relative


def test_image_modes(ckpt: Path, tmp_path: Path) -> None:
    rgb = galaxy_array(4)
    reference = cum.predict(rgb, ckpt)
    sixteen = tmp_path / "16bit.png"
    Image.fromarray(rgb.mean(axis=2).astype(np.uint16) * 257).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    grey_8bit = cum.predict(rgb.mean(axis=2).astype(np.uint8), ckpt)
    assert cum.predict(sixteen, ckpt).probabilities == pytest.approx(grey_8bit.probabilities, abs=1e-6)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert cum.predict(png_bytes(Image.fromarray(rgba)), ckpt).probabilities == reference.probabilities


def decoded(image: Image.Image) -> np.ndarray:
    """The model's input for an image, as int (H, W, 3) pixels."""
    return preprocessing.Preprocessing(SIZE)(image).permute(1, 2, 0).numpy().astype(int)


def test_palette_greyscale_and_cmyk_images_decode_to_their_colours() -> None:
    rgb = galaxy_array(4)
    palette = Image.fromarray(rgb).convert("P")  # 256 colours chosen for this image
    assert np.array_equal(decoded(palette), np.asarray(palette.convert("RGB")))
    grey = Image.fromarray(rgb).convert("L")
    assert np.array_equal(decoded(grey), np.repeat(np.asarray(grey)[..., None], 3, axis=2))
    cmyk = Image.open(io.BytesIO(png_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG")))
    assert cmyk.mode == "CMYK"
    # JPEG rounds each channel (3 on average here); CMYK's channels read as RGB are off by 237.
    assert np.abs(decoded(cmyk) - rgb).mean() < 6
    odd = Image.fromarray(galaxy_array(4, size=300)).resize((301, 157))  # squashed, as training does
    assert np.array_equal(decoded(odd), np.asarray(odd.resize((SIZE, SIZE), Image.BILINEAR)))


# ---------------------------------------------------------------- bad inputs


def truncated_png() -> bytes:
    return truncated(png_bytes(Image.fromarray(galaxy_array(5))))


@pytest.mark.parametrize(
    "data", [b"", b"hello, this is text\n", truncated_png()], ids=["empty", "text", "truncated"]
)
def test_unreadable_data_raises_image_error(data: bytes, ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(cum.ImageError, match="not a readable image"):
        open_image(data)
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(cum.ImageError, match="bad.png"):
        cum.predict(path, ckpt)


def test_bad_arrays_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(cum.ImageError, match="uint8"):
        open_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(cum.ImageError, match="not found"):
        open_image(tmp_path / "missing.png")
    assert issubclass(cum.ImageError, Galaxy10Error)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = bomb_png(8_000, 8_000)  # 64 megapixels: over our 40 MP limit, under PIL's own
    assert len(bomb) < 100
    ours = "more than the 40,000,000 pixels allowed: use a smaller image"
    with pytest.raises(ImageTooLargeError, match=f"is 8000x8000 pixels, {ours}"):
        open_image(bomb)
    # PIL's own bomb check (it fires inside Image.open, over twice its limit) gives the same message.
    with pytest.raises(ImageTooLargeError, match=f"is 400,000,000 pixels, {ours}"):
        open_image(bomb_png(20_000, 20_000))
    with pytest.raises(ImageTooLargeError, match=f"more than the {Image.MAX_IMAGE_PIXELS:,} pixels allowed"):
        open_image(bomb_png(100_000, 100_000), max_pixels=10**12)  # 30 GB if decoded
    with pytest.raises(ImageTooLargeError):
        open_image(Image.new("L", (200, 200)), max_pixels=100 * 100)
    assert open_image(png_bytes(Image.new("L", (300, 300))), max_pixels=300 * 300).size == (300, 300)


def test_foreign_checkpoints_raise_a_clear_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pth"
    torch.save({"weights": [1, 2, 3]}, plain)
    state_dict = tmp_path / "state_dict.pth"
    torch.save(CNNModel(image_size=32).state_dict(), state_dict)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    for path in (plain, state_dict, text, tmp_path / "missing.pth"):
        with pytest.raises(Galaxy10Error, match=path.name):
            cum.predict(galaxy_array(0), path)


# ---------------------------------------------------------------- the cache and threads


def test_model_is_cached_and_reloaded_when_the_file_changes(tmp_path: Path) -> None:
    path = spread_checkpoint(tmp_path / "m.pth", seed=1)
    first = cum.load_model(path)
    assert cum.load_model(str(path)) is first
    before = cum.predict(galaxy_array(6), path).probabilities
    spread_checkpoint(path, seed=2)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = cum.load_model(path)
    assert second is not first and cum.load_model(path) is second
    assert cum.predict(galaxy_array(6), path).probabilities != before


def test_threads_share_one_model_and_agree(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shared.pth"  # a file no other test has loaded yet
    path.write_bytes(ckpt.read_bytes())
    arrays = [galaxy_array(seed) for seed in range(6)]
    expected = [cum.predict(a, ckpt).probabilities for a in arrays]
    loads: list[Path] = []
    real_read = inference.read_checkpoint
    monkeypatch.setattr(inference, "read_checkpoint", lambda p, **kw: loads.append(p) or real_read(p, **kw))
    results: dict[int, tuple[float, ...]] = {}
    heatmaps: dict[int, np.ndarray] = {}
    start = threading.Barrier(6)

    def work(i: int) -> None:
        start.wait()  # all six ask for the model at once
        results[i] = cum.predict(arrays[i], path).probabilities
        heatmaps[i] = cum.grad_cam(arrays[i], path)[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [path.resolve()]  # one load, one prepared model for all six threads
    # Exact: each thread runs the one prepared model on one image, as predict() did above.
    assert [results[i] for i in range(6)] == expected
    for i in range(6):
        np.testing.assert_allclose(heatmaps[i], cum.grad_cam(arrays[i], path)[1], atol=1e-5)


# ---------------------------------------------------------------- TTA and Grad-CAM


def test_tta_is_invariant_to_flips_and_rotations(ckpt: Path) -> None:
    array = galaxy_array(7)
    tta = np.array(cum.predict(array, ckpt, tta=True).probabilities)
    views = [np.rot90(array, 1), np.rot90(array, 2), np.fliplr(array), np.flipud(np.rot90(array, 1))]
    plain = [np.array(cum.predict(np.ascontiguousarray(v), ckpt).probabilities) for v in views]
    assert max(np.abs(p - plain[0]).max() for p in plain[1:]) > 1e-3, "the plain model is not invariant"
    for view in views:
        view_tta = cum.predict(np.ascontiguousarray(view), ckpt, tta=True).probabilities
        np.testing.assert_allclose(view_tta, tta, atol=2e-3)
    exact_tta = cum.predict(array, ckpt, tta=True, exact=True).probabilities
    eight = [np.rot90(v, k).copy() for v in (array, np.fliplr(array)) for k in range(4)]
    mean = np.mean([p.probabilities for p in cum.predict_batch(eight, ckpt, exact=True)], axis=0)
    np.testing.assert_allclose(exact_tta, mean, atol=1e-6)


def test_tta_on_a_batch_is_each_images_own_with_the_records_temperature(tmp_path: Path) -> None:
    """Several images in one batch with --tta: each gets the mean over its own 8 views of softmax(logits / T),
    computed here by hand from the plain float32 model (so views of one image are never averaged with
    another's, and the temperature is applied to every view)."""
    ckpt = with_temperature(spread_checkpoint(tmp_path / "model.pth"), 2.5)
    arrays = [galaxy_array(seed) for seed in (11, 12, 13, 14, 15)]
    batch = cum.predict_batch(arrays, ckpt, tta=True, exact=True, batch_size=5)
    for array, answer in zip(arrays, batch, strict=True):
        views = [Image.fromarray(np.rot90(v, k).copy()) for v in (array, np.fliplr(array)) for k in range(4)]
        by_hand = plain_probabilities(ckpt, views, temperature=2.5).double().mean(0).numpy()
        np.testing.assert_allclose(answer.probabilities, by_hand, atol=1e-5)
        alone = cum.predict(array, ckpt, tta=True, exact=True).probabilities
        assert answer.probabilities == pytest.approx(alone, abs=1e-5)
    assert len({a.class_id for a in batch}) > 1, "the images should not all get one class"


def test_grad_cam_heatmap(ckpt: Path) -> None:
    array = galaxy_array(8)
    prediction, heatmap = cum.grad_cam(array, ckpt)
    assert prediction.probabilities == cum.predict(array, ckpt, exact=True).probabilities  # both float32
    assert heatmap.shape == (SIZE, SIZE) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    other = (prediction.class_id + 1) % 10
    _, other_map = cum.grad_cam(array, ckpt, class_id=other)
    assert other_map.shape == (SIZE, SIZE) and not np.allclose(other_map, heatmap)
    with pytest.raises(ValueError, match="class_id"):
        cum.grad_cam(array, ckpt, class_id=10)
    image = Image.fromarray(galaxy_array(8, size=120))
    overlay = inference.overlay_heatmap(image, heatmap)
    assert overlay.size == image.size and overlay.mode == "RGB"
    assert not np.array_equal(np.asarray(overlay), np.asarray(image))


# ---------------------------------------------------------------- batch and command line


def test_predict_batch_keeps_order_and_reports_bad_items(ckpt: Path) -> None:
    arrays = [galaxy_array(seed) for seed in range(5)]
    sources = [arrays[0], b"junk", arrays[1], arrays[2], arrays[3], arrays[4]]
    results = cum.predict_batch(sources, ckpt, batch_size=2)
    assert isinstance(results[1], cum.ImageError)
    good = [r for r in results if not isinstance(r, cum.ImageError)]
    for result, array in zip(good, arrays, strict=True):
        assert result.probabilities == pytest.approx(cum.predict(array, ckpt).probabilities, abs=1e-5)


def test_cli_folder_csv_and_bad_files(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(galaxy_array(9)).save(folder / "a.png")
    Image.fromarray(galaxy_array(10)).save(folder / "sub" / "b.JPG")
    (folder / "broken.png").write_bytes(truncated_png())
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "predictions.csv"
    assert run_cli(cum.cli_main, [str(folder), "--model", str(ckpt), "--csv", str(out), "--top-k", "2"]) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "a.png" in captured.out and "b.JPG" in captured.out
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    trust_columns = ["entropy", "margin", "flag", "bands"]
    columns = ["path", "class_id", "class_name", "confidence", *trust_columns, *CLASS_NAMES, "error"]
    assert list(rows[0]) == columns
    assert [Path(r["path"]).name for r in rows] == ["a.png", "broken.png", "b.JPG"]
    broken = rows.pop(1)
    assert "not a readable image" in broken["error"] and broken["class_id"] == broken["confidence"] == ""
    for row in rows:
        probs = [float(row[name]) for name in CLASS_NAMES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["class_name"] == CLASS_NAMES[int(row["class_id"])]
        assert float(row["confidence"]) == max(probs) and row["error"] == ""
        assert 0 <= float(row["entropy"]) <= 1 and float(row["margin"]) == pytest.approx(
            sorted(probs)[-1] - sorted(probs)[-2], abs=1e-9)
        # This checkpoint has no outlier statistics: a confident answer is ok, a doubtful one uncertain.
        assert row["flag"] == ("ok" if float(row["confidence"]) >= 0.5 else "uncertain")
    # No temporary file; beside the table, what the run says of itself: the model, its provenance, counts.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "predictions.csv", "predictions.csv.json"]
    about = json.loads((tmp_path / "predictions.csv.json").read_text())
    flags = [row["flag"] for row in rows]
    assert about["rows"] == 3 and about["unreadable"] == 1 and about["model"] == ckpt.name
    assert about["flags"] == {flag: flags.count(flag) for flag in set(flags)}
    assert about["learned_from"] == "not recorded" and about["warning"] is None


def test_cli_exact_writes_float32_probabilities(ckpt: Path, tmp_path: Path) -> None:
    image = tmp_path / "g.png"
    Image.fromarray(galaxy_array(12)).save(image)
    out = tmp_path / "exact.csv"
    assert run_cli(cum.cli_main, [str(image), "--model", str(ckpt), "--csv", str(out), "--exact"]) == 0
    with out.open(newline="") as f:
        (row,) = csv.DictReader(f)
    expected = cum.predict(image, ckpt, exact=True).probabilities
    assert [float(row[name]) for name in CLASS_NAMES] == pytest.approx(expected, abs=1e-7)


def test_cli_bad_checkpoint_and_no_inputs_exit_2(ckpt: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "g.png"
    Image.fromarray(galaxy_array(11)).save(image)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    assert run_cli(cum.cli_main, [str(image), "--model", str(bad)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(cum.cli_main, [str(empty), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "bad.pth" in err and "nothing to classify" in err and "Traceback" not in err


@pytest.mark.slow  # a subprocess that imports torch
def test_the_command_line_refuses_an_unsafe_checkpoint_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "g.png"
    Image.fromarray(galaxy_array(11)).save(image)
    bad = unsafe_checkpoint(tmp_path / "bad.pth", tmp_path / "ran")
    done = subprocess.run([sys.executable, str(ROOT / "cnn_use_model.py"), str(image), "--model", str(bad)],
                          cwd=tmp_path, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.pth" in lines[0], done.stderr
    assert not (tmp_path / "ran").exists()


def write_h5(path: Path, n: int, labels: bool) -> Path:
    with h5py.File(path, "w") as f:
        f["images"] = np.stack([galaxy_array(seed, size=96) for seed in range(n)])
        if labels:
            f["ans"] = np.arange(n, dtype=np.uint8) % 3
    return path


def test_cli_h5_rows_with_accuracy_table(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs, "CHUNK_ROWS", 4)  # rows are read in several chunks
    h5 = write_h5(tmp_path / "galaxies.h5", n=30, labels=True)
    out = tmp_path / "rows.csv"
    assert run_cli(cum.cli_main, [str(h5), "--model", str(ckpt), "--csv", str(out), "--batch-size", "7"]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [f"{h5}#{i}" for i in range(30)]
    with h5py.File(h5) as f:
        truth = f["ans"][:]
        expected = [p.class_id for p in cum.predict_batch(list(f["images"][:]), ckpt)]
    assert [int(r["class_id"]) for r in rows] == expected
    text = capsys.readouterr().out
    accuracy = np.mean(np.array(expected) == truth)
    assert f"accuracy {accuracy:.1%}" in text
    assert "support" in text and "correct" in text
    table = {line[:2]: line.split() for line in text.splitlines() if line[:1].isdigit() and line[1] == " "}
    hits = sum(e == t == 0 for e, t in zip(expected, truth, strict=True))
    assert table["0 "][-3:] == ["10", str(hits), f"{hits / 10:.1%}"]
    assert table["5 "][-3:] == ["0", "0", "-"]


def test_cli_h5_without_labels_and_foreign_h5(ckpt: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    h5 = write_h5(tmp_path / "unlabelled.h5", n=3, labels=False)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(4)
    assert run_cli(cum.cli_main, [str(h5), str(foreign), "--model", str(ckpt)]) == 1
    captured = capsys.readouterr()
    assert f"{h5}#2" in captured.out and "accuracy" not in captured.out
    assert "foreign.h5" in captured.err and "Galaxy10" in captured.err


def test_an_h5_file_of_other_classes_is_classified_but_not_scored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 3-class model on a Galaxy10 file: its ids 0-2 are not the model's classes, so no accuracy (which
    would rename them), one line saying why, and every row still classified."""
    three = tmp_path / "three_class.pth"
    torch.manual_seed(0)
    record = models.ModelRecord("deepcnn5", ("smooth", "disk", "merging"), preprocessing.Preprocessing(SIZE))
    models.Checkpoint(record, CNNModel(3, SIZE).state_dict()).save(three)
    h5 = write_h5(tmp_path / "galaxy10.h5", n=12, labels=True)
    assert run_cli(cum.cli_main, [str(h5), "--model", str(three)]) == 0
    captured = capsys.readouterr()
    assert "accuracy" not in captured.out and f"{h5}#11" in captured.out
    (said,) = [line for line in captured.err.splitlines() if line.startswith("not scored")]
    assert "galaxy10.h5's labels are" in said and "['smooth', 'disk', 'merging']" in said


def test_the_command_line_says_what_the_model_learned_from_and_how_many_answers_were_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's kind of model (the synthetic sample): once per run on stderr, what it learned from with the
    warning the page gives, and at the end how many answers each flag got."""
    path = spread_checkpoint(tmp_path / "demo.pth")
    checkpoint = models.read_checkpoint(path)
    checkpoint.record = dataclasses.replace(checkpoint.record, trained_on=models.TrainingData(
        "balanced_data/train", 2380, synthetic=True))
    checkpoint.save(path)
    images = []
    for seed in range(3):
        images.append(tmp_path / f"g{seed}.png")
        Image.fromarray(galaxy_array(seed)).save(images[-1])
    assert run_cli(cum.cli_main, [*map(str, images), "--model", str(path)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == "model demo.pth: learned from the built-in synthetic sample (2,380 images)"
    assert err[1] == ("warning: demo.pth: synthetic galaxies only: do not trust its answers about real "
                      "galaxies")
    uncertain = sum(" uncertain " in line for line in captured.out.splitlines()[1:])
    assert err[-1] == f"0 of 3 answers flagged unlike-training, {uncertain} uncertain"


def test_real_galaxies_all_get_valid_predictions(ckpt: Path, real_galaxies: list[tuple[Path, int]]) -> None:
    results = cum.predict_batch([path for path, _ in real_galaxies], ckpt)
    assert len(results) == len(real_galaxies) == 60
    for result in results:
        assert isinstance(result, cum.Prediction), result
        assert 0 <= result.class_id < 10 and sum(result.probabilities) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- the checkpoint's crop and network


def framed_square(seed: int) -> np.ndarray:
    """A 64 px frame whose central 32 px square and border have two different random colours: the centre
    crop (--crop 0.5) and the whole frame, mostly border, look nothing alike."""
    rng = np.random.default_rng(seed)
    inner, outer = rng.uniform(0, 255, (2, 3))
    frame = np.broadcast_to(outer, (64, 64, 3)).copy()
    frame[16:48, 16:48] = inner
    return np.clip(frame + rng.normal(0, 20, frame.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cropped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[int], list[int]]:
    """A checkpoint that crops 0.5, framed images, the classes its network gives their centre crops, and
    those it gives the whole frames; the images are filed as val/<centre class>/<i>.png."""
    root = tmp_path_factory.mktemp("cropped")
    frames = [Image.fromarray(framed_square(seed)) for seed in range(12)]
    inputs = [to_model_input(torch.stack([image_to_tensor(frame, SIZE, crop) for frame in frames]))
              for crop in (0.5, 1.0)]
    torch.manual_seed(0)
    network = CNNModel(image_size=SIZE).eval()
    with torch.no_grad():  # centre and spread the logits over these images, so their classes differ
        logits = network(torch.cat(inputs))
        scale = 3.0 / (logits - logits.mean(0)).std()
        network.classifier[-1].weight.mul_(scale)
        network.classifier[-1].bias.copy_(-logits.mean(0) * scale)
        classes = [network(x).argmax(1).tolist() for x in inputs]
    model_path = root / "cropped.pth"
    save_weights(model_path, network.state_dict(), size=SIZE, crop=0.5)
    paths = []
    for label in range(10):
        (root / "val" / str(label)).mkdir(parents=True)
    for i, (frame, label) in enumerate(zip(frames, classes[0], strict=True)):
        paths.append(root / "val" / str(label) / f"{i:02d}.png")
        frame.save(paths[-1])
    order = sorted(range(len(paths)), key=lambda i: str(paths[i]))  # as folders are listed
    centre, whole = ([labels[i] for i in order] for labels in classes)
    return model_path, [paths[i] for i in order], centre, whole


def test_every_consumer_applies_the_checkpoints_crop(
    cropped: tuple[Path, list[Path], list[int], list[int]], tmp_path: Path
) -> None:
    model_path, images, centre, whole = cropped
    assert sum(c != w for c, w in zip(centre, whole, strict=True)) >= 4  # ignoring the crop would show
    assert [cum.predict(path, model_path, exact=True).class_id for path in images] == centre
    out = tmp_path / "folder.csv"
    assert run_cli(cum.cli_main, [str(images[0].parents[1]), "--model", str(model_path), "--exact",
                                  "--csv", str(out)]) == 0
    with out.open(newline="") as f:
        assert [int(row["class_id"]) for row in csv.DictReader(f)] == centre
    with h5py.File(tmp_path / "val.h5", "w") as f:
        f["images"] = np.stack([np.asarray(Image.open(path)) for path in images])
    rows = tmp_path / "rows.csv"
    assert run_cli(cum.cli_main, [str(tmp_path / "val.h5"), "--model", str(model_path), "--exact",
                                  "--csv", str(rows)]) == 0
    with rows.open(newline="") as f:
        assert [int(row["class_id"]) for row in csv.DictReader(f)] == centre
    tta = [cum.predict(path, model_path, tta=True, exact=True) for path in images]
    rotated = [cum.predict(np.rot90(np.asarray(Image.open(path))).copy(), model_path, tta=True, exact=True)
               for path in images]
    for a, b in zip(tta, rotated, strict=True):  # the same 8 views of the same central crop
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    args = ["--evaluate", "--model-path", str(model_path), "--val-dir", str(images[0].parents[1]),
            "--device", "cpu", "--precision", "fp32"]
    assert run_cli(cnn.main, args) == 0
    assert json.loads(models.output_path(model_path, "report.json").read_text())["accuracy"] == 1.0


def torchvision_checkpoint(path: Path, arch: str, seed: int = 0) -> Path:
    """A random torchvision network of this project at 32 px, with logits spread as a trained one's."""
    torch.manual_seed(seed)
    model = networks.build_model(arch, 10, 32).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    probe = torch.from_numpy(np.stack([galaxy_array(s) for s in range(16)])).permute(0, 3, 1, 2)
    output = model.net.get_submodule(networks.last_linear_name(model.net))
    with torch.no_grad():
        logits = model(to_model_input(probe))
        output.weight.mul_(3.0 / (logits - logits.mean(0)).std())
    return save_weights(path, model.state_dict(), arch=arch, size=32, crop=0.8)


@pytest.mark.usefixtures("native_bf16")
@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny", "efficientnet_b0"])
def test_torchvision_networks_are_prepared_for_inference_and_explained_by_grad_cam(
    arch: str, tmp_path: Path
) -> None:
    path = torchvision_checkpoint(tmp_path / f"{arch}.pth", arch)
    model = cum.load_model(path)
    (member,) = model.members
    assert model.record.arch == arch and model.record.crop == 0.8 and member.bf16 is not member.fp32
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in member.fp32.stages.modules())
    images = [Image.fromarray(galaxy_array(seed, size=48)) for seed in range(8)]
    plain = models.read_checkpoint(path).model()
    batch = torch.stack([image_to_tensor(image, 32, 0.8) for image in images])
    with torch.no_grad():
        reference = plain(to_model_input(batch)).softmax(1).double()
    exact = torch.tensor([p.probabilities for p in cum.predict_batch(images, path, exact=True)])
    assert (exact - reference).abs().max() < 1e-4
    fast = torch.tensor([p.probabilities for p in cum.predict_batch(images, path)])
    assert torch.equal(fast.argmax(1), reference.argmax(1)) and (fast - reference).abs().max() < 3e-2
    prediction, heatmap = cum.grad_cam(images[0], path)
    assert prediction.probabilities == pytest.approx(exact[0].tolist(), abs=1e-5)
    assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)


def test_the_grad_cam_overlay_covers_only_the_region_the_model_saw() -> None:
    image = Image.fromarray(np.full((60, 80, 3), 200, dtype=np.uint8))
    heatmap = np.ones((32, 32), dtype=np.float32)  # all evidence: the turbo colour map's red
    overlay = np.asarray(inference.overlay_heatmap(image, heatmap, crop=0.5)).astype(int)
    # crop 0.5 of the shorter side (60): the 30 x 30 square from (25, 15) to (55, 45)
    assert (overlay[:15] == 100).all() and (overlay[:, :25] == 100).all()  # outside: dimmed to half
    inside = overlay[15:45, 25:55]
    assert (inside[..., 0] > inside[..., 2] + 40).all()  # tinted red
    whole = np.asarray(inference.overlay_heatmap(image, heatmap)).astype(int)
    assert (whole[..., 0] > whole[..., 2] + 40).all()  # crop 1: the whole frame


# ---------------------------------------------------------------- one forward pass, one definition


def with_temperature(path: Path, temperature: float) -> Path:
    """The checkpoint at `path`, rewritten with this temperature in its record."""
    checkpoint = models.read_checkpoint(path)
    checkpoint.record = dataclasses.replace(checkpoint.record, temperature=temperature)
    checkpoint.save(path)
    return path


def galaxy_folders(root: Path, per_class: int = 2) -> Path:
    """root/<class id>/img_i.png for Galaxy10's ten classes: synthetic blobs, labelled at random."""
    for label in range(len(CLASS_NAMES)):
        (root / str(label)).mkdir(parents=True)
        for i in range(per_class):
            image = Image.fromarray(galaxy_array(100 + label * per_class + i))
            image.save(root / str(label) / f"img_{i}.png")
    return root


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_evaluate_reports_the_accuracy_of_the_served_answers(
    tmp_path: Path, precision: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """cnn.py --evaluate and cnn_use_model.py --out on one folder, with a temperature other than 1: the same
    answers, so the same accuracy; and the report's ECE is the hand computation from the calibrated
    probabilities of the plain float32 model (--precision fp32 measures what --exact serves)."""
    ckpt = with_temperature(spread_checkpoint(tmp_path / "model.pth"), 1.7)
    val = galaxy_folders(tmp_path / "val")
    assert run_cli(cnn.main, ["--evaluate", "--model-path", str(ckpt), "--val-dir", str(val),
                              "--precision", precision, "--device", "cpu"]) == 0
    report = json.loads(models.output_path(ckpt, "report.json").read_text())
    out = tmp_path / "answers.csv"
    args = [str(val), "--model", str(ckpt), "--out", str(out), "--device", "cpu"]
    assert run_cli(cum.cli_main, args + (["--exact"] if precision == "fp32" else [])) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    correct = [int(row["class_id"]) == int(Path(row["path"]).parent.name) for row in rows]
    assert report["accuracy"] == sum(correct) / len(rows) and len(rows) == report["n_samples"] == 20
    if precision == "fp32":
        from galaxy10.reports import expected_calibration_error

        images = [Image.open(row["path"]) for row in rows]
        probabilities = plain_probabilities(ckpt, images, temperature=1.7).double().numpy()
        truth = np.array([int(Path(row["path"]).parent.name) for row in rows])
        assert report["ece"] == pytest.approx(expected_calibration_error(truth, probabilities), abs=1e-6)
        table = np.array([[float(row[name]) for name in CLASS_NAMES] for row in rows])
        assert np.abs(table - probabilities).max() < 1e-5


@pytest.mark.slow  # trains a model or runs the network many times
def test_a_model_that_answers_with_its_views_averaged_does_so_everywhere_and_is_reported_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint recording --serve-tta: predict, the command line and --evaluate answer with the 8 flips
    and quarter turns averaged unless told --no-tta / tta=False, and the report's accuracy is that of those
    answers."""
    path = with_temperature(spread_checkpoint(tmp_path / "model.pth"), 1.7)
    checkpoint = models.read_checkpoint(path)
    checkpoint.record = dataclasses.replace(checkpoint.record, tta=True)
    checkpoint.save(path)
    image = galaxy_array(21)
    served, with_views, alone = (cum.predict(image, path, exact=True, tta=tta) for tta in (None, True, False))
    assert served.probabilities == with_views.probabilities != alone.probabilities
    val = galaxy_folders(tmp_path / "val")
    assert run_cli(cnn.main, ["--evaluate", "--model-path", str(path), "--val-dir", str(val),
                              "--precision", "fp32", "--device", "cpu"]) == 0
    report = json.loads(models.output_path(path, "report.json").read_text())
    assert report["served_with_tta"] and report["accuracy"] == report["tta"]["accuracy"]
    for flags, key in (([], "tta"), (["--no-tta"], "without_tta")):
        out = tmp_path / f"answers{len(flags)}.csv"
        command = [str(val), "--model", str(path), "--out", str(out), "--exact", *flags]
        assert run_cli(cum.cli_main, command) == 0
        with out.open(newline="") as f:
            rows = list(csv.DictReader(f))
        correct = sum(int(row["class_id"]) == int(Path(row["path"]).parent.name) for row in rows)
        assert report[key]["accuracy"] == correct / len(rows)


def test_every_answer_field_is_in_every_output_and_the_docs(ckpt: Path, tmp_path: Path) -> None:
    """The line, the table's columns and the JSON all carry prediction.ANSWERS, and docs/inference.md and
    docs/web.md list each one (adding a field is one edit there, and this test says what is missing)."""
    from galaxy10.catalog import output_schema
    from galaxy10.prediction import ANSWERS
    from galaxy10.web import PredictionOut

    schema = output_schema(CLASS_NAMES)
    assert list(ANSWERS) == schema.names[1:1 + len(ANSWERS)]
    assert set(ANSWERS) <= set(PredictionOut.model_fields)
    assert set(ANSWERS) <= set(cum.predict(galaxy_array(1), ckpt).to_dict())
    for page in ("inference.md", "web.md"):
        text = (ROOT / "docs" / page).read_text()
        assert [name for name in ANSWERS if f"`{name}`" not in text] == [], page
