"""FITS cutouts (images.py): g, r, z cubes to RGB by legacypipe's sdss_rgb mapping, one band to grey, the
files it refuses in one line, multi-extension and compressed files; and FITS through inference, the web
API and training folders, which must all make the same pixels of a file."""
from __future__ import annotations

import csv
import gzip
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from fastapi.testclient import TestClient
from PIL import Image

import cnn_use_model as cum
from galaxy10 import data, inputs, preprocessing
from galaxy10.dataset import CLASS_NAMES
from galaxy10.errors import run_cli
from galaxy10.images import ImageError, ImageTooLargeError, is_fits_data, is_image_file, open_image
from main import create_app

from helpers import SIZE, png_bytes, spread_checkpoint

pytestmark = pytest.mark.usefixtures("cpu_inference")  # the references are CPU float32

SIDE = 64
# The sky level every band maps to where it is 0: x = m, I = m, so x * asinh(Q I) / (sqrt(Q) I).
SKY = math.floor(255 * math.asinh(20 * 0.03) / math.sqrt(20))  # 32


def galaxy_cube(side: int = SIDE) -> np.ndarray:
    """A (3, side, side) g, r, z cube in nanomaggies: an elliptical blob, redder (brighter in z) than blue,
    off centre so that a flip or a transposition would show."""
    y, x = np.mgrid[0:side, 0:side]
    blob = np.exp(-(((x - 0.4 * side) / 8.0) ** 2 + ((y - 0.6 * side) / 5.0) ** 2))
    return np.stack([0.02 * blob, 0.05 * blob, 0.12 * blob]).astype(np.float32)


def write_fits(path: Path, data: np.ndarray | None, header: dict[str, str] | None = None) -> Path:
    hdu = fits.PrimaryHDU(data)
    hdu.header.update(header or {})
    hdu.writeto(path)
    return path


def fits_bytes(data: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    fits.PrimaryHDU(data).writeto(buffer)
    return buffer.getvalue()


def pixels(source: Path | bytes) -> np.ndarray:
    return np.asarray(open_image(source))


def by_hand(g: float, r: float, z: float) -> tuple[int, int, int]:
    """legacypipe's sdss_rgb for one pixel, straight from the formula (scales g 6.0, r 3.4, z 2.2, m 0.03,
    Q 20): x = v * scale + m; I = mean(max(0, x)); channel = x * asinh(Q I) / (sqrt(Q) I), clipped, 8 bits."""
    xg, xr, xz = g * 6.0 + 0.03, r * 3.4 + 0.03, z * 2.2 + 0.03
    intensity = (max(0, xg) + max(0, xr) + max(0, xz)) / 3
    gain = math.asinh(20 * intensity) / math.sqrt(20) / intensity
    red, green, blue = (math.floor(255 * min(1.0, max(0.0, x * gain))) for x in (xz, xr, xg))
    return red, green, blue


# ---------------------------------------------------------------- the mapping


def test_grz_cutout_is_rgb_by_legacypipes_mapping(tmp_path: Path) -> None:
    cube = galaxy_cube()
    image = open_image(write_fits(tmp_path / "g.fits", cube))
    assert (image.mode, image.size, image.format) == ("RGB", (SIDE, SIDE), "FITS")
    rgb = np.asarray(image)
    for row, col in ((38, 25), (40, 30), (10, 50)):  # FITS rows count from the bottom: picture row SIDE-1-row
        assert tuple(rgb[SIDE - 1 - row, col]) == by_hand(*cube[:, row, col]), (row, col)
    assert tuple(rgb[SIDE - 1 - 10, 50]) == (SKY, SKY, SKY)  # empty sky, by hand
    centre = rgb[SIDE - 1 - 38, 25]
    assert centre[0] > centre[1] > centre[2]  # brighter in z than r than g: red


@pytest.mark.parametrize("band, channel", [("z", 0), ("r", 1), ("g", 2)])
def test_z_drives_red_r_green_g_blue(band: str, channel: int, tmp_path: Path) -> None:
    cube = np.zeros((3, 16, 16), np.float32)
    cube["grz".index(band)] = 1.0  # bright in that band alone
    rgb = pixels(write_fits(tmp_path / "one.fits", cube))
    assert (rgb[..., channel] == 255).all()
    assert (np.delete(rgb, channel, axis=-1) < 255).all()


def test_bands_named_in_the_header_are_put_in_place(tmp_path: Path) -> None:
    cube = galaxy_cube()
    named = write_fits(tmp_path / "zrg.fits", cube[::-1], {"BAND0": "z", "BAND1": "r", "BAND2": "g"})
    assert np.array_equal(pixels(named), pixels(write_fits(tmp_path / "grz.fits", cube)))


def test_fits_row_zero_is_the_bottom_of_the_picture(tmp_path: Path) -> None:
    """legacypipe saves its JPEGs with origin="lower"."""
    cube = np.zeros((3, 8, 8), np.float32)
    cube[:, 0, 0] = 1.0
    rgb = pixels(write_fits(tmp_path / "corner.fits", cube))
    assert (rgb[7, 0] > 150).all() and (rgb[0, 0] == SKY).all()


@pytest.mark.parametrize("shape", [(SIDE, SIDE), (1, SIDE, SIDE)], ids=["2d", "one-plane"])
def test_one_band_is_grey_by_the_same_stretch(shape: tuple[int, ...], tmp_path: Path) -> None:
    band = galaxy_cube()[1].reshape(shape)
    image = open_image(write_fits(tmp_path / "r.fits", band))
    assert image.mode == "L"
    rgb = np.asarray(image.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    x = float(band.reshape(SIDE, SIDE)[38, 25]) * 3.4 + 0.03  # r scale; x * asinh(Q x) / (sqrt(Q) x)
    assert rgb[SIDE - 1 - 38, 25, 0] == math.floor(255 * math.asinh(20 * x) / math.sqrt(20))


def test_one_named_band_is_stretched_by_its_own_scale(tmp_path: Path) -> None:
    band = galaxy_cube()[1]
    unnamed = pixels(write_fits(tmp_path / "x.fits", band))
    assert np.array_equal(pixels(write_fits(tmp_path / "r.fits", band, {"FILTER": "r DECam SDSS"})), unnamed)
    assert (pixels(write_fits(tmp_path / "g.fits", band, {"BAND0": "g"})) >= unnamed).all()  # g's 6.0 > 3.4
    assert not np.array_equal(pixels(tmp_path / "g.fits"), unnamed)


def test_nans_are_sky(tmp_path: Path) -> None:
    cube = galaxy_cube()
    holed = cube.copy()
    holed[:, :5, :] = np.nan
    cube[:, :5, :] = 0.0
    assert np.array_equal(pixels(write_fits(tmp_path / "nan.fits", holed)),
                          pixels(write_fits(tmp_path / "zero.fits", cube)))


# ---------------------------------------------------------------- refused in one line


@pytest.mark.parametrize(
    "data, header, words",
    [
        (np.zeros((5, 8, 8), np.float32), {}, "5 bands"),
        (np.full((3, 8, 8), np.nan, np.float32), {}, "no finite pixel values"),
        (np.zeros((3, 8, 8), np.float32), {"BAND0": "g", "BAND1": "r", "BAND2": "i"}, "must hold g, r and z"),
        (None, {}, "no 2-D or 3-D image data"),
        (np.zeros((2, 3, 8, 8), np.float32), {}, "no 2-D or 3-D image data"),
    ],
    ids=["5-bands", "all-nan", "gri", "no-data", "4-d"],
)
def test_unusable_fits_is_one_line(data: np.ndarray | None, header: dict[str, str], words: str,
                                   tmp_path: Path) -> None:
    path = write_fits(tmp_path / "bad.fits", data, header)
    with pytest.raises(ImageError, match=words) as err:
        open_image(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_damaged_fits_is_one_line(tmp_path: Path) -> None:
    whole = fits_bytes(galaxy_cube())
    for broken in (whole[: len(whole) // 2], b"SIMPLE  = not a header"):
        with pytest.raises(ImageError, match="not a readable FITS file") as err:
            open_image(broken)
        assert "\n" not in str(err.value)


def test_pixel_limit_is_checked_on_the_header_before_the_data(tmp_path: Path) -> None:
    """The header claims 3 x 20000 x 20000 floats (4.8 GB) and holds none: only the header is read."""
    header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 3, "NAXIS1": 20000, "NAXIS2": 20000,
                          "NAXIS3": 3})
    path = tmp_path / "huge.fits"
    path.write_bytes(header.tostring().encode("ascii"))
    with pytest.raises(ImageTooLargeError, match="20000x20000 pixels"):
        open_image(path)


def test_cli_says_a_five_band_file_is_unreadable_in_one_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    ckpt = spread_checkpoint(tmp_path / "m.pth")
    path = write_fits(tmp_path / "five.fits", np.zeros((5, 8, 8), np.float32))
    assert run_cli(cum.cli_main, [str(path), "--model", str(ckpt)]) == 1
    err = capsys.readouterr().err
    said = [line for line in err.replace("\r", "\n").splitlines() if "five.fits" in line]
    assert "Traceback" not in err and len(said) == 1, err
    assert said[0].startswith("unreadable: ") and "5 bands" in said[0] and said[0].endswith("or 1"), err


# ---------------------------------------------------------------- files as surveys store them


def test_multi_extension_file_reads_the_first_image_hdu(tmp_path: Path) -> None:
    cube = galaxy_cube()
    path = tmp_path / "mef.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(cube), fits.ImageHDU(np.zeros((5, 4, 4)))]).writeto(path)
    assert np.array_equal(pixels(path), pixels(write_fits(tmp_path / "plain.fits", cube)))


def test_tile_compressed_fz_is_read(tmp_path: Path) -> None:
    cube = galaxy_cube()
    path = tmp_path / "g.fits.fz"
    lossless = fits.CompImageHDU(cube, compression_type="GZIP_1", quantize_level=0.0)
    fits.HDUList([fits.PrimaryHDU(), lossless]).writeto(path)
    assert np.array_equal(pixels(path), pixels(write_fits(tmp_path / "plain.fits", cube)))


def test_gzipped_fits_is_read_from_a_path_and_from_bytes(tmp_path: Path) -> None:
    cube = galaxy_cube()
    plain = pixels(write_fits(tmp_path / "plain.fits", cube))
    path = tmp_path / "g.fits.gz"
    path.write_bytes(gzip.compress(fits_bytes(cube)))
    assert np.array_equal(pixels(path), plain)
    assert np.array_equal(pixels(path.read_bytes()), plain)
    assert np.array_equal(pixels(fits_bytes(cube)), plain)


def test_fits_is_known_by_name_for_files_and_by_content_for_bytes(tmp_path: Path) -> None:
    names = ["a.fits", "b.FIT", "c.fits.gz", "d.fits.fz", "e.png", "f.gz", "g.txt", "h.tar.gz"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [n for n in names if is_image_file(tmp_path / n)] == names[:5]
    png = png_bytes(Image.new("RGB", (4, 4)))
    assert is_fits_data(fits_bytes(galaxy_cube())) and is_fits_data(gzip.compress(fits_bytes(galaxy_cube())))
    assert not is_fits_data(png) and not is_fits_data(gzip.compress(png)) and not is_fits_data(b"\x1f\x8b")


# ---------------------------------------------------------------- inference, the web API, training


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return spread_checkpoint(tmp_path_factory.mktemp("fits-model") / "based_on_balanced_data_model.pth")


def test_predict_reads_a_fits_cutout(ckpt: Path, tmp_path: Path) -> None:
    path = write_fits(tmp_path / "g.fits", galaxy_cube())
    prediction = cum.predict(path, ckpt)
    assert prediction.class_name in CLASS_NAMES
    model = cum.load_model(ckpt)
    same = cum.predict(open_image(path), ckpt)
    assert prediction.probabilities == same.probabilities
    assert model.preprocess(open_image(path)).shape == (3, SIZE, SIZE)


def test_web_api_classifies_a_fits_upload(ckpt: Path, tmp_path: Path) -> None:
    path = write_fits(tmp_path / "g.fits", galaxy_cube())
    with TestClient(create_app(ckpt.parent)) as client:
        response = client.post("/api/predict", files={"file": ("g.fits", path.read_bytes())})
        page = client.post("/upload-file/", files={"file": ("g.fits.gz", gzip.compress(path.read_bytes()))})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = cum.predict(path, ckpt)
    assert (body["class_id"], body["class_name"]) == (expected.class_id, expected.class_name)
    assert page.status_code == 200 and "FITS" in page.text


def test_training_reads_fits_folders_as_inference_does(ckpt: Path, tmp_path: Path) -> None:
    root = tmp_path / "train"
    for label, suffix in enumerate((".fits", ".fits.gz")):
        (root / str(label)).mkdir(parents=True)
        for i in range(2):
            cube = galaxy_cube() * (1 + i + label)
            raw = fits_bytes(cube)
            (root / str(label) / f"{i}{suffix}").write_bytes(gzip.compress(raw) if label else raw)
    Image.fromarray(pixels(root / "0" / "0.fits")).save(root / "1" / "png.png")
    scan = data.scan_image_folder(root)
    assert [p.name for p in scan.paths] == ["0.fits", "1.fits", "0.fits.gz", "1.fits.gz", "png.png"]
    assert scan.labels == [0, 0, 1, 1, 1]
    model = cum.load_model(ckpt)
    for path in scan.paths:
        trained_on = data.decode_images([path], preprocessing.Preprocessing(SIZE), 1, "decoding")[0][0]
        assert torch.equal(trained_on, model.preprocess(open_image(path)))
    found = inputs.find_inputs([str(root)])
    assert sorted(p.name for p in found.sources) == sorted(p.name for p in scan.paths) and not found.problems


# ---------------------------------------------------------------- one extension per band; what was used


def per_band_file(path: Path, bands: dict[str, np.ndarray], keyword: str = "BAND") -> Path:
    """An empty primary HDU, then one image extension per band, named by `keyword`."""
    extensions = []
    for band, plane in bands.items():
        hdu = fits.ImageHDU(plane)
        hdu.header[keyword] = band if keyword != "FILTER" else f"{band} DECam SDSS c0001"
        extensions.append(hdu)
    fits.HDUList([fits.PrimaryHDU(), *extensions]).writeto(path)
    return path


@pytest.mark.parametrize("keyword", ["BAND", "FILTER"])
def test_one_extension_per_band_is_assembled_like_the_cube(tmp_path: Path, keyword: str) -> None:
    g, r, z = galaxy_cube()
    cube = pixels(write_fits(tmp_path / "cube.fits", galaxy_cube()))
    shuffled = per_band_file(tmp_path / "bands.fits", {"z": z, "i": r * 9, "g": g, "r": r}, keyword)
    assert np.array_equal(pixels(shuffled), cube)  # the i band is left out, the others found by name
    image = open_image(shuffled)
    assert (image.mode, image.info["bands"]) == ("RGB", "g,r,z")
    two = open_image(per_band_file(tmp_path / "two.fits", {"g": g, "r": r}, keyword))
    assert two.mode == "RGB" and two.info["bands"] == "g,r"


def test_every_answer_says_which_bands_made_the_picture(ckpt: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    g, r, z = galaxy_cube()
    files = {"grz.fits": write_fits(tmp_path / "grz.fits", galaxy_cube()),
             "gr.fits": per_band_file(tmp_path / "gr.fits", {"g": g, "r": r}),
             "r.fits": write_fits(tmp_path / "r.fits", r, {"FILTER": "r DECam"}),
             "unnamed.fits": write_fits(tmp_path / "unnamed.fits", r),
             "galaxy.png": tmp_path / "galaxy.png"}
    Image.fromarray(pixels(files["grz.fits"])).save(files["galaxy.png"])
    expected = {"grz.fits": "g,r,z", "gr.fits": "g,r", "r.fits": "r", "unnamed.fits": "one band",
                "galaxy.png": "RGB"}
    assert {name: cum.predict(path, ckpt).bands for name, path in files.items()} == expected
    out = tmp_path / "answers.csv"
    assert run_cli(cum.cli_main, [*map(str, files.values()), "--model", str(ckpt), "--out", str(out)]) == 0
    with out.open() as f:
        assert [row["bands"] for row in csv.DictReader(f)] == list(expected.values())
    assert run_cli(cum.cli_main, [str(files["gr.fits"]), "--model", str(ckpt)]) == 0
    header, line = capsys.readouterr().out.splitlines()[-2:]
    assert "bands" in header.split() and " g,r " in line
    with TestClient(create_app(ckpt.parent)) as client:
        answer = client.post("/api/predict", files={"file": ("x", files["gr.fits"].read_bytes())}).json()
        page = client.post("/upload-file/", files={"file": ("x", files["gr.fits"].read_bytes())}).text
    assert answer["bands"] == "g,r" and "<dt>Bands</dt><dd>g,r</dd>" in page


def test_a_file_named_fits_that_is_not_one_is_told_the_formats_in_one_line(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "notes.fits"
    fake.write_text("SIMPLE or not, this is text\n" * 40)
    accepted = "use a PNG, JPEG, TIFF or FITS file"
    assert run_cli(cum.cli_main, [str(fake), "--model", str(ckpt)]) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if "notes.fits" in line]
    assert len(said) == 1 and accepted in said[0] and "ignore_missing" not in said[0]
    with TestClient(create_app(ckpt.parent)) as client:
        response = client.post("/api/predict", files={"file": ("notes.fits", fake.read_bytes())})
    assert response.status_code == 415 and accepted in response.json()["detail"]
