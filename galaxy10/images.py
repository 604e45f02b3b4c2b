"""Reading one image, whatever it comes as: a path, encoded bytes (an upload), a PIL image or a uint8
array, as a loaded PIL image (`open_image`). The size is checked from the header before anything is
decoded, so a small file that declares a huge image never allocates it; what cannot be read is an
`ImageError`, one line. Inference (cnn_use_model.py), the web page (main.py) and training (data.py) read
every image here, so all three turn a file into pixels the same way.

Survey cutouts in FITS (g, r, z bands) become RGB by the colour mapping the Legacy Surveys make their own
JPEG cutouts with, legacypipe's (`cutout_pixels`).
"""
from __future__ import annotations

import gzip
import io
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from galaxy10.errors import Galaxy10Error

# 40 megapixels is a 6,300 px square, far beyond any survey cutout; the decoded RGB is 120 MB.
MAX_PIXELS = 40_000_000

Source = str | os.PathLike | bytes | Image.Image | np.ndarray

# Files read as images, by the end of their name (`Path.suffix` of x.fits.gz is only .gz).
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fz")  # .fz: tile-compressed; .gz: gzip
IMAGE_SUFFIXES = PIL_SUFFIXES + FITS_SUFFIXES
ACCEPTED = "a PNG, JPEG, TIFF or FITS file"  # what every "not a readable image" message asks for
FITS_MAGIC = b"SIMPLE  ="  # every FITS file starts with this card
GZIP_MAGIC = b"\x1f\x8b"

# The colour mapping of legacypipe (github.com/legacysurvey/legacypipe, py/legacypipe/survey.py): get_rgb
# calls sdss_rgb(imgs, bands), whose defaults are m=0.03, Q=20 and, per band, (RGB plane, scale):
# g=(2, 6.0), r=(1, 3.4), z=(0, 2.2), i.e. z drives red, r green and g blue; images in nanomaggies.
# (The scales g 0.0066, r 0.01, z 0.025 belong to its get_rgb_OLD, a linear (-3, 10) mapping removed in 2020.)
RGB_SCALES = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}
ASINH_M = 0.03
ASINH_Q = 20.0
GRZ = ("g", "r", "z")  # the band order of the Legacy Surveys cutout service's (3, H, W) cubes
GREY_BAND = "r"  # one band not named g, r or z is stretched with r's scale, the middle of the three


class ImageError(Galaxy10Error):
    """The input cannot be read as an image."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the limit (a decompression bomb, or just too big)."""


def open_image(source: Source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any ordinary image (a path, encoded bytes, a PIL image or a uint8 array) as a loaded PIL image.

    FITS is read by name for paths (`FITS_SUFFIXES`) and by content for bytes (`is_fits_data`). The size
    is checked from the header before anything is decoded, so a small file that declares a huge image
    never allocates it.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "the image")
        return source
    if isinstance(source, np.ndarray):
        return _image_from_array(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if is_fits_data(source):
            return _open_fits(io.BytesIO(source), "the uploaded data", max_pixels)
        return _decode(io.BytesIO(source), "the uploaded data", max_pixels)
    if isinstance(source, str) and not source:
        raise ImageError("the path is empty: give the path of an image file")
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{path} not found: give the path of an image file")
    with path.open("rb") as file:
        if is_fits_name(path):
            return _open_fits(file, str(path), max_pixels)
        return _decode(file, str(path), max_pixels)


def is_image_file(path: Path) -> bool:
    """A file whose name says it is an image this module reads (what folders of images are searched for)."""
    return path.name.lower().endswith(IMAGE_SUFFIXES) and path.is_file()


def is_fits_name(path: Path) -> bool:
    return path.name.lower().endswith(FITS_SUFFIXES)


def is_fits_data(data: bytes | bytearray | memoryview) -> bool:
    """FITS bytes, plain or gzipped (an upload has no trustworthy name, so its content decides)."""
    head = bytes(memoryview(data)[: len(FITS_MAGIC)])
    if head.startswith(GZIP_MAGIC):
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(len(FITS_MAGIC))
        except (OSError, EOFError):
            return False
    return head == FITS_MAGIC


def _decode(file: io.IOBase, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # PIL only warns between its limit and twice its limit; a warning here is a bomb too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(file)  # lazy: reads the header only
            _check_pixels(image.size, max_pixels, name)
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            allowed = min(max_pixels, Image.MAX_IMAGE_PIXELS)
            raise too_large(name, declared_pixels(str(err)), allowed) from None
        except ImageTooLargeError:
            raise
        except Exception as err:  # PIL raises many types for damaged or foreign data
            raise ImageError(f"{name} is not a readable image ({_reason(err)}): use {ACCEPTED}") from None
    return image


def declared_pixels(message: str) -> int | None:
    """The pixel count in PIL's decompression-bomb message ("Image size (N pixels) exceeds ...")."""
    match = re.search(r"\((\d+) pixels\)", message)
    return int(match[1]) if match else None


def too_large(name: str, pixels: int | None, allowed: int, size: str = "") -> ImageTooLargeError:
    """The one message for an image over the pixel limit, whoever noticed it (this module or PIL)."""
    what = size or (f"{pixels:,} pixels" if pixels else "larger")
    return ImageTooLargeError(f"{name} is {what}, more than the {allowed:,} pixels allowed: use a smaller "
                              "image")


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not a format PIL can identify"  # its message ends with a memory address
    return str(err) or type(err).__name__


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise too_large(name, width * height, max_pixels, f"{width}x{height} pixels")
    if width == 0 or height == 0:
        raise ImageError(f"{name} is empty ({width}x{height} pixels)")


def _image_from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(
            f"an image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {array.dtype} {array.shape}"
        )
    _check_pixels((array.shape[1], array.shape[0]), max_pixels, "the array")
    return Image.fromarray(np.ascontiguousarray(array))


def _open_fits(file: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """A FITS cutout as a PIL image: a (3, H, W) cube of g, r, z (the Legacy Surveys cutout service's), or
    one 2-D extension per band named by BAND or FILTER (two or three of g, r, z, assembled), as RGB; else the
    first 2-D image, grey. `image.info["bands"]` says which bands made it. The pixel limit is checked on the
    headers' NAXIS1 x NAXIS2 before any data is read."""
    from astropy.io import fits  # here, not at the top: only FITS inputs pay for importing astropy
    from astropy.utils.exceptions import AstropyWarning

    with warnings.catch_warnings():
        # astropy warns about non-standard headers it reads anyway; what went wrong is said in one line
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            head = file.read(len(GZIP_MAGIC))
            file.seek(0)
            if head == GZIP_MAGIC:  # astropy knows gzip by a file's name, not inside a file object
                file = gzip.GzipFile(fileobj=file)
            if file.read(len(FITS_MAGIC)) != FITS_MAGIC:
                raise ImageError(f"{name} is not a readable image (it is named FITS but does not start as a "
                                 f"FITS file does): use {ACCEPTED}")
            file.seek(0)
            with fits.open(file, memmap=False) as hdus:  # lazy: each header is read only when reached
                cube, bands, bands_text = _band_cube(hdus, name, max_pixels)
        except ImageError:
            raise
        except Exception as err:  # astropy and gzip raise many types for damaged or foreign data
            raise ImageError(f"{name} is not a readable FITS file ({_reason(err)}): use {ACCEPTED}") from None
    image = Image.fromarray(cutout_pixels(cube, bands, name))
    image.format = "FITS"
    image.info["bands"] = bands_text
    return image


def _band_cube(hdus: Iterable[Any], name: str, max_pixels: int) -> tuple[np.ndarray, tuple[str, ...], str]:
    """The (B, H, W) planes to colour, their bands and what to say of them ("g,r,z", "r", "one band"): the
    first image HDU's cube, or the g, r, z planes of one HDU per band where the file holds two or three of
    them, else the first image alone."""
    images = [hdu for hdu in hdus if _holds_image(hdu)]
    if not images:
        raise ImageError(f"{name} holds no 2-D or 3-D image data in any HDU: give a cutout image")
    first = images[0]
    height, width = first.header["NAXIS2"], first.header["NAXIS1"]
    _check_pixels((width, height), max_pixels, name)
    if first.header["NAXIS"] == 3 or len(images) == 1:
        bands = _band_names(first.header, name)
        cube = np.asarray(first.data, dtype=np.float32).reshape(len(bands), height, width)
        return cube, bands, describe_bands(bands, first.header)
    by_band: dict[str, Any] = {}
    for hdu in images:
        band = _named_band(hdu.header)
        same_size = (hdu.header["NAXIS"], hdu.header["NAXIS1"], hdu.header["NAXIS2"]) == (2, width, height)
        if band in RGB_SCALES and band not in by_band and same_size:
            by_band[band] = hdu
    if len(by_band) < 2:
        bands = _band_names(first.header, name)
        cube = np.asarray(first.data, dtype=np.float32).reshape(1, height, width)
        return cube, bands, describe_bands(bands, first.header)
    bands = tuple(band for band in GRZ if band in by_band)
    cube = np.stack([np.asarray(by_band[band].data, dtype=np.float32) for band in bands])
    return cube, bands, ",".join(bands)


def describe_bands(bands: Sequence[str], header: Any) -> str:
    """What a prediction says of an image's bands: "g,r,z", a named band, or "one band" (unnamed)."""
    if len(bands) > 1:
        return ",".join(bands)
    return bands[0] if _named_band(header) in RGB_SCALES else "one band"


def bands_of(image: Image.Image) -> str:
    """The bands an image was made from: a FITS cutout's (open_image records them), else RGB or grey."""
    if "bands" in image.info:
        return str(image.info["bands"])
    return "grey" if image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else "RGB"


def _holds_image(hdu: Any) -> bool:
    """An HDU (primary, image extension or tile-compressed) with 2-D or 3-D data: a cutout saved as an empty
    primary HDU and image extensions is read from the extensions."""
    axes = hdu.header.get("NAXIS", 0)
    sizes = [hdu.header.get(f"NAXIS{i}", 0) for i in range(1, axes + 1)]
    return hdu.is_image and axes in (2, 3) and all(size > 0 for size in sizes)


def _named_band(header: Any) -> str:
    """The band a single-band header names: BAND, BAND0, or the first word of FILTER (e.g. "r DECam")."""
    words = str(header.get("BAND") or header.get("BAND0") or header.get("FILTER") or "").split()
    return words[0].lower() if words else ""


def _band_names(header: Any, name: str) -> tuple[str, ...]:
    """The bands of the image's planes: BAND0..BAND2 where the header names them (as the cutout service's
    does), else g, r, z in that order; one band is named by BAND, BAND0 or the first word of FILTER."""
    count = header["NAXIS3"] if header["NAXIS"] == 3 else 1
    if count == 3:
        named = tuple(str(header.get(f"BAND{i}", "")).strip().lower() for i in range(3))
        if not any(named):
            return GRZ
        if sorted(named) != sorted(GRZ):
            raise ImageError(f"{name} has bands {', '.join(named)}: a 3-band cutout must hold g, r and z")
        return named
    if count == 1:
        band = _named_band(header)
        return (band,) if band in RGB_SCALES else (GREY_BAND,)
    raise ImageError(f"{name} has {count} bands: a cutout must have 3 (g, r, z, as the Legacy Surveys cutout "
                     "service gives them) or 1")


def cutout_pixels(cube: np.ndarray, bands: Sequence[str], name: str = "the cutout") -> np.ndarray:
    """A (B, H, W) cube of g, r, z (B=3) or one band (B=1), in nanomaggies, as 8-bit pixels: (H, W, 3)
    RGB by legacypipe's mapping, or (H, W) grey by the same stretch of the one band."""
    finite = np.isfinite(cube)
    if not finite.any():
        raise ImageError(f"{name} holds no finite pixel values (all NaN or infinite): not a usable cutout")
    # NaN marks no data (off the footprint, masked): counted as empty sky, 0 nanomaggies.
    planes = asinh_stretch(np.where(finite, cube, np.float32(0)), bands)
    if len(bands) == 1:
        picture = planes[0]
    else:
        picture = np.zeros(planes.shape[1:] + (3,), np.float32)
        for plane, band in zip(planes, bands, strict=True):
            picture[..., RGB_SCALES[band][0]] = plane
    # legacypipe writes its JPEGs with matplotlib's imsave(origin="lower"): FITS row 0 is the bottom of the
    # picture; matplotlib makes 8 bits as (x * 255) truncated.
    return (np.flipud(picture) * 255).astype(np.uint8)


def asinh_stretch(cube: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """legacypipe's sdss_rgb stretch, (B, H, W) in [0, 1]: each band scaled, x = image * scale + m; the
    mean intensity I = mean(max(0, x)) over bands; each band x * asinh(Q I) / (sqrt(Q) I), clipped to [0, 1]
    (where I is 0 the result is 0)."""
    scales = np.array([RGB_SCALES[band][1] for band in bands], np.float32)[:, None, None]
    scaled = cube * scales + np.float32(ASINH_M)
    intensity = np.maximum(scaled, 0).sum(axis=0) / len(bands)
    gain = np.arcsinh(ASINH_Q * intensity) / np.sqrt(ASINH_Q) / (intensity + (intensity == 0) * 1e-6)
    return np.clip(scaled * gain.astype(np.float32), 0, 1)
