"""The sRGB transfer function and the colour space each export format stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen3d.colors import color_space, encode_colors, linear_to_srgb, srgb_to_linear


def test_srgb_transfer_function_is_exact_and_inverts():
    # IEC 61966-2-1: the linear segment below 0.04045, the 2.4 power above; sRGB 0.5 is linear 0.2140.
    assert srgb_to_linear(0.5) == pytest.approx(((0.5 + 0.055) / 1.055) ** 2.4, abs=1e-12)
    assert srgb_to_linear(0.02) == pytest.approx(0.02 / 12.92, abs=1e-12)
    assert srgb_to_linear(np.array([0.0, 1.0])) == pytest.approx([0.0, 1.0], abs=1e-12)
    x = np.linspace(0, 1, 4097)
    assert np.abs(linear_to_srgb(srgb_to_linear(x)) - x).max() < 1e-12
    assert np.abs(srgb_to_linear(linear_to_srgb(x)) - x).max() < 1e-12
    # The two pieces meet: no step at the threshold.
    assert srgb_to_linear(0.04045 + 1e-9) - srgb_to_linear(0.04045 - 1e-9) == pytest.approx(0, abs=1e-8)


def test_numpy_dtypes_and_torch_tensors_are_kept():
    assert srgb_to_linear(np.zeros(3, dtype=np.float32)).dtype == np.float32
    assert linear_to_srgb(np.zeros(3)).dtype == np.float64
    t = torch.linspace(-0.1, 1.1, 101, dtype=torch.float64, requires_grad=True)
    y = srgb_to_linear(t)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    assert torch.allclose(y.detach(), torch.from_numpy(srgb_to_linear(t.detach().numpy())))
    y.sum().backward()
    assert torch.isfinite(t.grad).all()  # the discarded branch leaks no NaN into the gradient
    assert torch.allclose(linear_to_srgb(y).detach(), t.detach(), atol=1e-10)


def test_each_format_stores_its_own_colour_space():
    assert color_space("glb") == color_space("gltf") == "linear"  # glTF's COLOR_0
    assert color_space("glb", "texture") == "srgb"  # glTF's baseColorTexture
    assert color_space("obj") == color_space("ply") == "srgb"  # as Blender reads their vertex colours
    assert color_space("xyz") == "srgb"  # a format without a rule keeps the images' encoding
    rgb = np.array([[0.5, 0.2, 0.9]])
    assert encode_colors(rgb, "glb") == pytest.approx(srgb_to_linear(rgb))
    assert encode_colors(rgb, "ply") is rgb
    with pytest.raises(ValueError, match="use must be one of vertex, texture"):
        color_space("glb", "normal")
