"""Volume rendering follows C = sum T_i a_i c_i + (1 - sum w_i) bg; skipping empty space changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gen3d.cameras import Cameras, PixelFilter, focal_from_fov, look_at, orbit, subpixel_offsets
from gen3d.render import (OccupancyGrid, RenderSettings, VolumeRenderer, packed_exclusive_sum, packed_weights,
                          pixel_means, ray_aabb)

AABB = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])


class Blob:
    """Two soft coloured balls in empty space."""

    aabb = AABB

    def density(self, x):
        a = torch.sigmoid((0.35 - (x - torch.tensor([0.3, 0.0, 0.0])).norm(dim=-1)) * 60)
        b = torch.sigmoid((0.25 - (x - torch.tensor([-0.4, 0.2, 0.1])).norm(dim=-1)) * 60)
        return 30 * a + 50 * b

    def __call__(self, x, d):
        rgb = torch.stack([x[:, 0] * 0.5 + 0.5, 0.5 + 0.3 * d[:, 1], x[:, 2] * 0.5 + 0.5], dim=-1)
        return self.density(x), rgb.clamp(0, 1)


def reference_render(field, origin, direction, step, background):
    """The textbook formula, one ray at a time, no skipping."""
    near, far = ray_aabb(origin[None], direction[None], AABB)
    color, transmittance = torch.zeros(3), 1.0
    t = float(near) + 0.5 * step
    while t < float(far):
        x = (origin + t * direction)[None]
        sigma, rgb = field(x, direction[None])
        alpha = 1 - math.exp(-float(sigma) * step)
        color += transmittance * alpha * rgb[0]
        transmittance *= 1 - alpha
        t += step
    return color + transmittance * background


def some_rays(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    origins = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * 3
    targets = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    return origins, torch.nn.functional.normalize(targets - origins, dim=-1)


def test_render_matches_textbook_formula():
    renderer = VolumeRenderer(AABB, RenderSettings(samples_per_diagonal=200, early_stop=0))
    origins, dirs = some_rays(16)
    bg = torch.tensor([0.2, 0.9, 0.4])
    out = renderer.render(Blob(), origins, dirs, bg)
    for i in range(16):
        expected = reference_render(Blob(), origins[i], dirs[i], renderer.step_size, bg)
        assert torch.allclose(out.rgb[i], expected, atol=1e-4), i


def test_occupancy_and_early_stop_skip_work_not_results():
    field = Blob()
    plain = VolumeRenderer(AABB, RenderSettings(samples_per_diagonal=256, early_stop=0))
    fast = VolumeRenderer(AABB, RenderSettings(samples_per_diagonal=256, early_stop=1e-4, occupancy_resolution=32))
    fraction = fast.update_occupancy(field, step=0)
    assert 0.02 < fraction < 0.5
    origins, dirs = some_rays(256)
    a = plain.render(field, origins, dirs, torch.ones(3))
    b = fast.render(field, origins, dirs, torch.ones(3))
    assert b.samples < a.samples / 3
    assert torch.allclose(a.rgb, b.rgb, atol=2e-3)
    assert torch.allclose(a.opacity, b.opacity, atol=2e-3)


def test_rays_that_miss_the_box_show_background():
    renderer = VolumeRenderer(AABB, RenderSettings())
    origins = torch.tensor([[5.0, 5.0, 5.0]])
    dirs = torch.tensor([[1.0, 0.0, 0.0]])
    out = renderer.render(Blob(), origins, dirs, torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(out.rgb, torch.tensor([[0.1, 0.2, 0.3]])) and out.samples == 0


class Slab:
    """A red slab 0.005 < x < 0.055, thinner than a marching step: a thin part seen edge-on."""

    aabb = AABB

    def density(self, x):
        return torch.where((x[:, 0] > 0.005) & (x[:, 0] < 0.055), 200.0, 0.0)

    def __call__(self, x, d):
        return self.density(x), torch.tensor([1.0, 0.0, 0.0]).expand(len(x), 3)


def test_eval_offsets_render_what_stratified_training_fits():
    # A step (0.17) three times the slab's width: a training ray, shifted at random, finds the
    # slab with probability width / step; the one fixed shift of a plain rendering misses it.
    renderer = VolumeRenderer(AABB, RenderSettings(samples_per_diagonal=20, early_stop=0))
    step = renderer.step_size
    expected = 0.05 / step * (1 - math.exp(-200 * step))
    origins, dirs = torch.tensor([[-3.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    trained = renderer.render(Slab(), origins.expand(4000, 3), dirs.expand(4000, 3), torch.ones(3),
                              stratified=True).opacity.mean()
    assert abs(float(trained) - expected) < 0.03
    plain = renderer.render_chunked(Slab(), origins, dirs, torch.ones(3))
    assert float(plain.opacity) == 0.0
    averaged = renderer.render_chunked(Slab(), origins, dirs, torch.ones(3), offsets=16)
    assert abs(float(averaged.opacity) - expected) <= 1 / 16
    assert torch.allclose(averaged.rgb, torch.tensor([[1.0, 1 - expected, 1 - expected]]), atol=1 / 16)
    # offsets=n is the mean of n plain renderings at shifts (i + 0.5) / n.
    shifted = [renderer.render(Slab(), origins, dirs, torch.ones(3), offset=(i + 0.5) / 16) for i in range(16)]
    assert torch.allclose(averaged.opacity, sum(r.opacity for r in shifted) / 16)


def test_occupancy_grid_indexing():
    grid = OccupancyGrid(AABB, 4)
    grid.occupied.zero_()
    grid.occupied[3, 0, 2] = True
    points = torch.tensor([[0.9, -0.9, 0.1], [0.9, -0.9, -0.1], [1.5, 0, 0]])
    assert grid.query(points).tolist() == [True, False, False]


def test_rendering_is_differentiable():
    class Learnable(Blob):
        def __init__(self):
            self.scale = torch.tensor(1.0, requires_grad=True)

        def __call__(self, x, d):
            sigma, rgb = super().__call__(x, d)
            return sigma * self.scale, rgb

    field = Learnable()
    renderer = VolumeRenderer(AABB, RenderSettings(early_stop=0))
    origins, dirs = some_rays(32)
    renderer.render(field, origins, dirs, torch.ones(3)).rgb.sum().backward()
    assert field.scale.grad is not None and field.scale.grad != 0


def test_camera_conventions_z_up_opengl():
    eye = torch.tensor([4.0, 0.0, 0.0])
    c2w = look_at(eye, torch.zeros(3))
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # camera up = world Z
    f = focal_from_fov(math.radians(60), 64)
    cams = Cameras(c2w[None], torch.tensor([f]), torch.tensor([f]), torch.tensor([32.0]), torch.tensor([32.0]), 64, 64)
    o, d = cams.rays(torch.tensor([0, 0]), torch.tensor([32.0, 32.0]), torch.tensor([32.0, 0.0]))
    assert torch.allclose(d[0], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)  # centre pixel looks at the target
    assert d[1, 2] > 0  # the top row of the image looks upwards (+Z)
    ring = orbit(8, 3.0, 30.0, 0.7, 32)
    assert torch.allclose(ring.c2w[:, :3, 3].norm(dim=-1), torch.full((8,), 3.0), atol=1e-5)


def test_blackman_harris_rays_reproduce_the_filtered_coverage_of_an_edge():
    """Equal-weight rays at the filter's strata, across a straight edge at offset e from the
    pixel centre, against the filter's own integral (Blender's window, Filter Size 1.5 = 3 px)."""
    bh = PixelFilter("blackman-harris", 1.5)
    x = np.linspace(-1.5, 1.5, 30001)
    phase = 2 * np.pi * (x / 3 + 0.5)
    window = 0.35875 - 0.48829 * np.cos(phase) + 0.14128 * np.cos(2 * phase) - 0.01168 * np.cos(3 * phase)
    std = np.sqrt((window * x**2).sum() / window.sum())
    rays = bh.offsets((torch.arange(64) + 0.5) / 64)  # strata middles along one axis
    assert abs(float(rays.std()) - std) < 0.01 and abs(std - 0.415) < 0.001  # wider than a box's 0.289
    assert torch.allclose(rays, -rays.flip(0), atol=1e-4) and rays.abs().max() < 1.5
    for edge in (-0.6, -0.2, 0.0, 0.3, 0.9):
        covered = float((rays < edge).float().mean())
        exact = window[x < edge].sum() / window.sum()
        assert abs(covered - exact) <= 1 / 64 + 1e-3, (edge, covered, exact)
    # Two rays a side sit where the filter's weight is a quarter and three quarters.
    two = subpixel_offsets(1, 2, pixel_filter=bh)[0, :2, 0] - 0.5
    quarter = x[np.searchsorted(np.cumsum(window) / window.sum(), 0.25)]
    assert torch.allclose(two, torch.tensor([quarter, -quarter], dtype=torch.float32), atol=2e-3)
    # Jittered rays stay in their strata and spread over the filter.
    jittered = subpixel_offsets(4000, 2, generator=torch.Generator().manual_seed(0), pixel_filter=bh) - 0.5
    assert (jittered[:, 0, 0] < 0).all() and (jittered[:, 1, 0] > 0).all()
    assert abs(float(jittered.std()) - std) < 0.02
    with pytest.raises(ValueError, match="pixel filter must be one of box, blackman-harris"):
        PixelFilter("gauss")


def test_supersampled_pixels_cover_the_pixel_evenly():
    centres = subpixel_offsets(5, 3)
    assert centres.shape == (5, 9, 2)
    assert torch.allclose(centres.mean(dim=1), torch.full((5, 2), 0.5))  # centred on the pixel
    assert torch.allclose(centres[0, :3, 0], torch.tensor([1 / 6, 0.5, 5 / 6]))  # x varies fastest
    jittered = subpixel_offsets(1000, 2, generator=torch.Generator().manual_seed(0))
    cell = (jittered * 2).floor()  # stratified: sample k stays in sub-cell k
    assert torch.equal(cell, (subpixel_offsets(1, 2) * 2).floor().expand(1000, 4, 2))
    assert 0.2 < jittered.std() < 0.35  # spread over the cells, not stuck at their centres
    f = focal_from_fov(math.radians(50), 8)
    cams = Cameras(look_at(torch.tensor([3.0, 0, 0]), torch.zeros(3))[None], torch.tensor([f]), torch.tensor([f]),
                   torch.tensor([4.0]), torch.tensor([4.0]), 8, 6)
    one, d1 = cams.image_rays(0)
    many, d4 = cams.image_rays(0, supersample=2)
    assert one.shape == (48, 3) and many.shape == (192, 3)
    # a pixel's four rays surround its centre ray
    assert torch.allclose(pixel_means(d4, 48), d1, atol=1e-3)
    assert torch.equal(pixel_means(torch.arange(8.0)[:, None], 2), torch.tensor([[1.5], [5.5]]))
    # Mixed: pixels 1 and 4 marked fine get 3x3 rays, the rest one; means land on each pixel.
    pixels = torch.arange(6)
    fine = torch.tensor([False, True, False, False, True, False])
    _, dirs, ray_pixel = cams.mixed_pixel_rays(torch.zeros(6, dtype=torch.long), pixels, fine, 1, 3)
    assert len(dirs) == 4 + 2 * 9 and torch.equal(torch.bincount(ray_pixel), torch.tensor([1, 9, 1, 1, 9, 1]))
    assert torch.allclose(pixel_means(dirs, 6, ray_pixel), d1[:6], atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_packed_path_matches_cpu():
    field = Blob()
    cpu = VolumeRenderer(AABB, RenderSettings(samples_per_diagonal=256, early_stop=0), use_nerfacc_cuda=False)
    origins, dirs = some_rays(256)
    expected = cpu.render(field, origins, dirs, torch.ones(3))

    class CudaBlob(Blob):
        aabb = AABB.cuda()

        def density(self, x):
            return super().density(x.cpu()).to(x.device)

        def __call__(self, x, d):
            sigma, rgb = super().__call__(x.cpu(), d.cpu())
            return sigma.cuda(), rgb.cuda()

    gpu = VolumeRenderer(AABB.cuda(), RenderSettings(samples_per_diagonal=256, early_stop=0))
    assert gpu.path == "nerfacc-cuda-packed"
    rays = origins.cuda(), dirs.cuda(), torch.ones(3).cuda()
    # Same compositing: with every cell occupied the packed path sees the same samples.
    gpu.estimator.binaries[:] = True
    got = gpu.render(CudaBlob(), *rays)
    assert torch.allclose(got.rgb.cpu(), expected.rgb, atol=5e-3)
    assert torch.allclose(got.opacity.cpu(), expected.opacity, atol=5e-3)
    # Shifted samples (RenderSettings.eval_offsets) land where the CPU path puts them.
    shifted = gpu.render(CudaBlob(), *rays, offset=0.1)
    assert torch.allclose(shifted.rgb.cpu(), cpu.render(field, origins, dirs, torch.ones(3), offset=0.1).rgb, atol=5e-3)
    # Skipping: once nerfacc's grid has learnt the blob, faint samples (alpha < 1e-2) are dropped;
    # that may lighten a grazing ray a little, never change the picture (measured on an H100:
    # 5.7k of 42k samples kept, max error 0.046, mean 0.004).
    for step in range(0, 300, 20):  # let the estimator's EMA warm up
        gpu.update_occupancy(CudaBlob(), step)
    skipped = gpu.render(CudaBlob(), *rays)
    assert skipped.samples < got.samples
    assert (skipped.rgb.cpu() - expected.rgb).abs().max() < 0.06
    assert (skipped.rgb.cpu() - expected.rgb).abs().mean() < 0.006


def test_packed_exclusive_sum_per_ray_with_empty_rays():
    # Rays 0 and 3 have no samples; sums restart at each ray's first sample.
    ray = torch.tensor([1, 1, 1, 2, 4, 4])
    values = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 11.0])
    got = packed_exclusive_sum(values, ray, n_rays=5)
    assert torch.equal(got, torch.tensor([0.0, 1.0, 3.0, 0.0, 0.0, 7.0]))
    assert packed_exclusive_sum(values[:0], ray[:0], 5).numel() == 0


def test_packed_weights_keep_precision_behind_many_opaque_rays():
    # 5000 opaque rays before the one we check: a float32 global cumulative sum would lose it.
    ray = torch.arange(5001).repeat_interleave(3)
    optical = torch.full((len(ray),), 50.0)
    optical[-3:] = torch.tensor([0.1, 0.2, 0.3])
    w = packed_weights(optical, ray, 5001)[-3:]
    a = 1 - torch.exp(-torch.tensor([0.1, 0.2, 0.3]))
    expected = torch.stack([a[0], (1 - a[0]) * a[1], (1 - a[0]) * (1 - a[1]) * a[2]])
    assert torch.allclose(w, expected, atol=1e-6)


def test_filtered_means_average_light_not_srgb_numbers():
    """A pixel of a white and a black ray is sRGB 0.735 (linear 0.5) in linear light, 0.5 as
    sRGB numbers; a white ray over half the pixel keeps white as the colour over the
    background; a pixel of one ray is the ray as it is."""
    from gen3d import filtered_means

    background = torch.tensor([0.0, 0.0, 1.0])
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0],  # pixel 0: white, black
                        [1.0, 1.0, 1.0], [0.0, 0.0, 1.0],  # pixel 1: white, nothing (the background)
                        [0.3, 0.5, 0.65]])  # pixel 2: one ray, 0.7 opaque (0.5, 0.5, 0.5) over blue
    opacity = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.7])
    ray_pixel = torch.tensor([0, 0, 1, 1, 2])
    linear = filtered_means(rgb, opacity, background, 3, ray_pixel)
    torch.testing.assert_close(linear[0], torch.full((3,), 0.7354), atol=1e-4, rtol=0)
    torch.testing.assert_close(linear[1], torch.tensor([0.5, 0.5, 1.0]))
    torch.testing.assert_close(linear[2], rgb[4], atol=1e-5, rtol=0)
    plain = filtered_means(rgb, opacity, background, 3, ray_pixel, space="srgb")
    torch.testing.assert_close(plain[0], torch.full((3,), 0.5))
