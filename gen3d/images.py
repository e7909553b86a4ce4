"""Reading photos the way a person sees them, and writing PNGs atomically.

:func:`read_image` accepts what cameras and editors produce: JPEG, PNG, WebP, TIFF; grey,
palette, RGBA, CMYK, 16-bit; EXIF-rotated phone photos (turned upright, as every viewer shows
them). Very large photos are shrunk to a working size while decoding. Anything it cannot read is
a :class:`~gen3d.errors.DataError` that names the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError
from .io import atomic_path


@dataclass
class LoadedImage:
    """An upright 8-bit RGB image, maybe shrunk, and how it relates to the file's own pixels."""

    rgb: np.ndarray  # uint8 [h, w, 3] working pixels
    alpha: np.ndarray | None  # uint8 [h, w] when the file has real transparency, else None
    input_size: tuple[int, int]  # (width, height) of the upright input, before shrinking
    path: Path
    exif_rotated: bool = False

    @property
    def scale(self) -> float:
        """Working pixels per input pixel (1 unless the input was shrunk)."""
        return self.rgb.shape[1] / self.input_size[0]


def read_image(path: Path | str, max_side: int | None = None) -> LoadedImage:
    """Read ``path`` upright as RGB (+ alpha); shrink so the longer side is at most ``max_side``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big photos are expected here
            with Image.open(path) as img:
                return _decode(img, path, max_side)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def _decode(img: Image.Image, path: Path, max_side: int | None) -> LoadedImage:
    width, height = img.size
    if width == 0 or height == 0:
        raise DataError(f"{path}: the image is empty ({width}x{height})")
    rotated = _exif_orientation(img) in (5, 6, 7, 8)  # these turn the picture by 90 degrees
    input_size = (height, width) if rotated else (width, height)
    if max_side and img.format == "JPEG" and max(width, height) > 2 * max_side:
        # JPEG can decode at 1/2, 1/4, 1/8 size directly: much faster for 4000 px photos.
        img.draft("RGB", (max_side, max_side))
    img = ImageOps.exif_transpose(img)
    rgb, alpha = _to_rgb_alpha(img)
    if alpha is not None and alpha.max() == 0:
        raise DataError(f"{path}: the image is fully transparent (its alpha channel is 0 everywhere)")
    if max_side and max(rgb.shape[:2]) > max_side:
        factor = max_side / max(input_size)
        size = (max(1, round(input_size[0] * factor)), max(1, round(input_size[1] * factor)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)  # area averaging: no aliasing
        alpha = None if alpha is None else cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
    return LoadedImage(np.ascontiguousarray(rgb), alpha, input_size, path, exif_rotated=rotated)


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError):  # a broken EXIF block must not stop us from reading the pixels
        return 1


def _to_rgb_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit (or 32-bit) grey: scale its range to 8 bits rather than clipping at 255.
        grey = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and grey.max() <= 1.0 else (65535.0 if grey.max() > 255 else 255.0)
        grey = np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1), None
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return np.asarray(img.convert("RGB")), None
    rgba = np.asarray(img.convert("RGBA"))
    alpha = rgba[..., 3]
    return np.ascontiguousarray(rgba[..., :3]), (alpha if alpha.min() < 255 else None)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 grey ``[h, w]``, RGB or RGBA ``[h, w, 3|4]`` array as PNG, atomically."""
    with atomic_path(path) as tmp:
        # compress_level 3: masks of 4000 px photos write in a fraction of the default's time.
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG", compress_level=3)
