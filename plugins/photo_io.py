"""Reading photos the way a person sees them, and writing PNGs atomically (for the preprocessing stage).

:func:`read_image` accepts what cameras and editors produce: JPEG, PNG, WebP, TIFF; grey,
palette, RGBA, CMYK, 16-bit; EXIF-rotated phone photos (turned upright, as every viewer shows
them). Very large photos are shrunk to a working size while decoding. Anything it cannot read is
a :class:`gen3d.DataError` that names the file.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gen3d import DataError, atomic_path


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


# Photos up to this many pixels are read (PIL's own guard, ~179 MP, would refuse a 200 MP camera's
# photos). Beyond it the file is refused before decoding: it would need gigabytes of memory.
MAX_PIXELS = 1_000_000_000


@contextmanager
def _pixel_limit(limit: int):
    """PIL's decompression-bomb limit set to ``limit`` within the block, restored after."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def read_image(path: Path | str, max_side: int | None = None, *, reduce_to: int | None = None) -> LoadedImage:
    """Read ``path`` upright as RGB (+ alpha); shrink so the longer side is at most ``max_side``.

    ``reduce_to``: a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size (much faster, much less
    memory) as long as its longer side stays at least this; nothing else is resized, and
    ``input_size`` / ``scale`` say how the pixels relate to the file's.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings(), _pixel_limit(MAX_PIXELS):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big photos are expected here
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise DataError(f"{path}: the image is too large to read ({width}x{height} = "
                                    f"{width * height / 1e6:.0f} megapixels; at most {MAX_PIXELS / 1e6:.0f})")
                return _decode(img, path, max_side, reduce_to or max_side)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def _decode(img: Image.Image, path: Path, max_side: int | None, reduce_to: int | None) -> LoadedImage:
    width, height = img.size
    if width == 0 or height == 0:
        raise DataError(f"{path}: the image is empty ({width}x{height})")
    rotated = _exif_orientation(img) in (5, 6, 7, 8)  # these turn the picture by 90 degrees
    input_size = (height, width) if rotated else (width, height)
    if reduce_to and img.format == "JPEG" and max(width, height) >= 2 * reduce_to:
        # JPEG can decode at 1/2, 1/4, 1/8 size directly: much faster for large photos. draft()
        # picks the strongest reduction that keeps both sides at least the size asked for.
        factor = reduce_to / max(width, height)
        img.draft("RGB", (max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))))
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
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) grey: scale by the file's bit depth to 8 bits, not clip at 255. The depth
        # comes from the mode, not the values: a dark 16-bit picture (all values <= 255) stays dark.
        grey = np.asarray(img, dtype=np.float64)
        top = _full_scale(img, grey)
        grey = np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1), None
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return np.asarray(img.convert("RGB")), None
    rgba = np.asarray(img.convert("RGBA"))
    alpha = rgba[..., 3]
    return np.ascontiguousarray(rgba[..., :3]), (alpha if alpha.min() < 255 else None)


def _full_scale(img: Image.Image, grey: np.ndarray) -> float:
    """The value that means white for a high-bit-depth grey image."""
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode == "I":
        bits = _bits_per_sample(img)
        if bits is None:  # PNG and PPM hold at most 16 bits; a 32-bit TIFF says so in its tags
            bits = 16 if img.format in ("PNG", "PPM") or grey.max() <= 65535 else 32
        return float(2 ** bits - 1)
    # float ("F"): no bit depth to go by; 0..1 is the usual convention
    return 1.0 if grey.max() <= 1.0 else (65535.0 if grey.max() > 255 else 255.0)


def _bits_per_sample(img: Image.Image) -> int | None:
    try:
        bits = img.tag_v2.get(258)  # TIFF BitsPerSample
    except AttributeError:
        return None
    if isinstance(bits, (tuple, list)):
        bits = bits[0] if bits else None
    return int(bits) if bits else None


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 grey ``[h, w]``, RGB or RGBA ``[h, w, 3|4]`` array as PNG, atomically."""
    with atomic_path(path) as tmp:
        # compress_level 3: masks of 4000 px photos write in a fraction of the default's time.
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG", compress_level=3)
