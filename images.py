"""Reading one image, whatever it comes as: a path, encoded bytes (an upload), a PIL image or a uint8
array, as a loaded PIL image (`open_image`). The size is checked from the header before anything is
decoded, so a small file that declares a huge image never allocates it; what cannot be read is an
`ImageError`, one line. Inference (cnn_use_model.py) and the web page (main.py) read every image here.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from galaxy10 import Galaxy10Error

# 40 megapixels is a 6,300 px square, far beyond any survey cutout; the decoded RGB is 120 MB.
MAX_PIXELS = 40_000_000

Source = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(Galaxy10Error):
    """The input cannot be read as an image."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the limit (a decompression bomb, or just too big)."""


def open_image(source: Source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any ordinary image (a path, encoded bytes, a PIL image or a uint8 array) as a loaded PIL image.

    The size is checked from the header before anything is decoded, so a small file that declares a
    huge image never allocates it.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "the image")
        return source
    if isinstance(source, np.ndarray):
        return _image_from_array(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(source), "the uploaded data", max_pixels)
    if isinstance(source, str) and not source:
        raise ImageError("the path is empty: give the path of an image file")
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{path} not found: give the path of an image file")
    with path.open("rb") as file:
        return _decode(file, str(path), max_pixels)


def _decode(file: io.IOBase, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # PIL only warns between its limit and twice its limit; a warning here is a bomb too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(file)  # lazy: reads the header only
            _check_pixels(image.size, max_pixels, name)
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageTooLargeError(f"{name} is too large to decode safely ({err})") from None
        except ImageTooLargeError:
            raise
        except Exception as err:  # PIL raises many types for damaged or foreign data
            reason = _reason(err)
            raise ImageError(f"{name} is not a readable image ({reason}): use a PNG or JPEG file") from None
    return image


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not a format PIL can identify"  # its message ends with a memory address
    return str(err) or type(err).__name__


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} pixels, more than the {max_pixels:,} allowed: use a smaller image"
        )
    if width == 0 or height == 0:
        raise ImageError(f"{name} is empty ({width}x{height} pixels)")


def _image_from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(
            f"an image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {array.dtype} {array.shape}"
        )
    _check_pixels((array.shape[1], array.shape[0]), max_pixels, "the array")
    return Image.fromarray(np.ascontiguousarray(array))
