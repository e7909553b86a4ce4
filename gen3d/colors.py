"""Colour spaces: the sRGB transfer function both ways, and the space each export format stores.

Images (data sets, previews, renders) are sRGB-encoded, and so are the colours a field learns
from them and the vertex colours :func:`gen3d.export.finish_mesh` bakes. A format that defines
its colours as linear gets them converted on the way out; :func:`color_space` is the one place
that says which format stores what, and every exporter asks it through :func:`encode_colors`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# glTF 2.0 defines COLOR_0 as linear and baseColorTexture as sRGB (texture images stay as they
# are; the material then says sRGB by using baseColorTexture). OBJ and PLY define neither: the
# tools that read their vertex colours, Blender's importers among them, take them as sRGB.
COLOR_SPACES = {
    "glb": {"vertex": "linear", "texture": "srgb"},
    "gltf": {"vertex": "linear", "texture": "srgb"},
    "obj": {"vertex": "srgb", "texture": "srgb"},
    "ply": {"vertex": "srgb", "texture": "srgb"},
}
USES = ("vertex", "texture")


def color_space(fmt: str, use: str = "vertex") -> str:
    """``"linear"`` or ``"srgb"``: how format ``fmt`` stores colours used as ``use`` (``"vertex"``
    colours, or ``"texture"`` images such as glTF's baseColorTexture, which are sRGB in every
    format we write). A format not listed gets sRGB, the images' own encoding: what readers of
    formats without a rule assume."""
    if use not in USES:
        raise ValueError(f"use must be one of {', '.join(USES)}, got {use!r}")
    return COLOR_SPACES.get(fmt, {}).get(use, "srgb")


def encode_colors(srgb: Any, fmt: str, use: str = "vertex") -> Any:
    """Colours given in sRGB (values in [0, 1]), as format ``fmt`` stores them for ``use``."""
    return srgb_to_linear(srgb) if color_space(fmt, use) == "linear" else srgb


def srgb_to_linear(x: Any) -> Any:
    """The sRGB decoding function (IEC 61966-2-1), exact: a numpy array (or anything
    ``np.asarray`` takes) or a torch tensor, which keeps its dtype, device and gradient."""
    x = _array(x)
    # Clamp inside the power so the branch where() discards has no NaN (torch's gradient sees it).
    curve = ((_at_least(x, 0.04045) + 0.055) / 1.055) ** 2.4
    return _where(x <= 0.04045, x / 12.92, curve)


def linear_to_srgb(x: Any) -> Any:
    """The sRGB encoding function (IEC 61966-2-1), exact; the inverse of :func:`srgb_to_linear`."""
    x = _array(x)
    curve = 1.055 * _at_least(x, 0.0031308) ** (1 / 2.4) - 0.055
    return _where(x <= 0.0031308, x * 12.92, curve)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")  # no torch import for numpy callers


def _array(x: Any) -> Any:
    return x if _is_tensor(x) else np.asarray(x, dtype=np.result_type(np.asarray(x).dtype, np.float32))


def _at_least(x: Any, low: float) -> Any:
    return x.clamp_min(low) if _is_tensor(x) else np.maximum(x, low)


def _where(condition: Any, a: Any, b: Any) -> Any:
    if _is_tensor(condition):
        import torch

        return torch.where(condition, a, b)
    return np.where(condition, a, b)
