"""Reading image files: header checks before decoding, and decoding to float arrays in [0, 1].

No torch here: the dataset reorganizers use it too, and `bmad --help` / `bmad prepare` should
not pay torch's import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bmad.errors import DataError

_READ_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)
"""What Pillow raises for a file it cannot decode (a header claiming over 179 M pixels: DecompressionBombError;
a broken PNG chunk: SyntaxError)."""


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, reading only its header."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except _READ_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {exc}", hint="replace or remove the file") from None


def check_pixels(im: Image.Image, path: Path) -> None:
    """DataError for an image larger than Pillow's decompression-bomb threshold
    (``Image.MAX_IMAGE_PIXELS``, about 89 M pixels, over which Pillow warns): checked on the
    header before decoding, because a few hundred bytes of JPEG can claim 13,000 x 13,000 pixels
    and decode to gigabytes."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise DataError(f"image {path} is {im.width}x{im.height} pixels, more than the {limit:,} that bmad decodes "
                        "(Pillow's decompression-bomb limit)", hint="replace or remove the file, or downscale it")


def read_image(path: Path) -> np.ndarray:
    """An image as float32 [C, H, W] in [0, 1] (C = 1 or 3), 8- and 16-bit aware."""
    try:
        with Image.open(path) as im:
            check_pixels(im, path)
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                arr = arr / (65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0)
                return np.clip(arr, 0, 1)[None]
            if im.mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                if not np.isfinite(arr).all():
                    raise DataError(f"image {path} has NaN or infinite pixel values", hint="replace or remove the file")
                return np.clip(arr, 0, 1)[None]
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "LA") else "RGB")
            arr = np.asarray(im, dtype=np.float32)
            arr /= 255.0  # in place: an RGB image's float copy is 12 bytes a pixel already
    except _READ_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {exc}", hint="replace or remove the file") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_mask(path: Path) -> np.ndarray:
    """A mask as bool [H, W] (> 0)."""
    arr = read_image(path)
    return arr.max(axis=0) > 0
