"""The torch rasteriser against direct computations: coverage, barycentrics, the z-buffer, the
perspective-correct interpolation, gradients (finite differences) and silhouette gradients."""

from __future__ import annotations

import math

import numpy as np
import torch

from gen3d.cameras import Cameras, look_at
from gen3d.raster import antialias, clip_matrices, edge_neighbors, interpolate, project, rasterize

H, W = 24, 32


def pixel_centres() -> np.ndarray:
    """[H, W, 2] NDC (x, y) of every pixel centre (row i: y = 2 (i + 0.5) / H - 1)."""
    x = 2 * (np.arange(W) + 0.5) / W - 1
    y = 2 * (np.arange(H) + 0.5) / H - 1
    return np.stack(np.meshgrid(x, y, indexing="xy"), axis=-1)


def flat_triangle(xy, z=0.0, w=1.0, dtype=torch.float32) -> torch.Tensor:
    """Clip coordinates [1, 3, 4] of a triangle at NDC ``xy`` (3 x 2), depth ``z``, all at ``w``."""
    pos = torch.tensor([[x * w, y * w, z * w, w] for x, y in xy], dtype=dtype)
    return pos[None]


def test_coverage_and_barycentrics_of_a_known_triangle():
    xy = np.array([[-0.7, -0.8], [0.6, -0.3], [-0.2, 0.9]])
    tri = torch.tensor([[0, 1, 2]])
    rast = rasterize(flat_triangle(xy), tri, (H, W))[0].numpy()
    # Direct: solve p = u a + v b + (1 - u - v) c for each pixel centre.
    a, b, c = xy
    m = np.stack([a - c, b - c], axis=1)
    uv = np.linalg.solve(m[None, None], (pixel_centres() - c)[..., None])[..., 0]
    inside = (uv[..., 0] >= 0) & (uv[..., 1] >= 0) & (uv.sum(-1) <= 1)
    assert inside.sum() > 50
    np.testing.assert_array_equal(rast[..., 3] == 1, inside)
    np.testing.assert_allclose(rast[inside][:, :2], uv[inside], atol=1e-5)
    assert (rast[~inside] == 0).all()


def test_z_buffer_keeps_the_nearest_triangle_in_either_order():
    near = [[-0.9, -0.9], [0.5, -0.9], [-0.9, 0.5]]
    far = [[-0.5, -0.5], [0.9, -0.5], [0.9, 0.9]]
    pos = torch.cat([flat_triangle(near, z=-0.5), flat_triangle(far, z=0.5)], dim=1)
    for tri in (torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[3, 4, 5], [0, 1, 2]])):
        rast = rasterize(pos, tri, (H, W))[0]
        ids = rast[..., 3].long() - 1
        drawn = torch.where(ids >= 0, tri[ids.clamp_min(0), 0], torch.full_like(ids, -1))
        only_far = rasterize(flat_triangle(far, z=0.5), torch.tensor([[0, 1, 2]]), (H, W))[0, ..., 3] > 0
        only_near = rasterize(flat_triangle(near, z=-0.5), torch.tensor([[0, 1, 2]]), (H, W))[0, ..., 3] > 0
        overlap = only_far & only_near
        assert overlap.sum() > 10
        assert (drawn[overlap] == 0).all()  # the near triangle (vertices 0..2) wins where both cover
        assert (drawn[only_far & ~only_near] == 3).all()
        np.testing.assert_allclose(rast[..., 2][overlap].numpy(), -0.5, atol=1e-6)


def test_perspective_correct_interpolation_lands_on_the_pixel_ray():
    # A slanted triangle in front of a camera: interpolated world points must project to the pixel centres.
    camera = Cameras(look_at(torch.tensor([0.3, -2.5, 0.8]), torch.zeros(3))[None], torch.tensor([30.0]),
                     torch.tensor([30.0]), torch.tensor([W / 2]), torch.tensor([H / 2]), W, H)
    verts = torch.tensor([[-1.0, 0.0, -0.8], [1.2, 0.6, -0.5], [0.0, -0.4, 1.0]])
    clip = project(verts, clip_matrices(camera))
    rast = rasterize(clip, torch.tensor([[0, 1, 2]]), (H, W))
    points = interpolate(verts, rast, torch.tensor([[0, 1, 2]]))[0]
    covered = rast[0, ..., 3] > 0
    assert covered.sum() > 30
    again = project(points[covered], clip_matrices(camera))[0]
    ndc = (again[:, :2] / again[:, 3:]).numpy()
    np.testing.assert_allclose(ndc, pixel_centres()[covered.numpy()], atol=1e-4)


def test_interpolate_gradients_match_finite_differences():
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    base = torch.tensor([[-0.8, -0.7, 0.1, 1.0], [0.7, -0.6, 0.2, 1.3], [0.6, 0.8, 0.3, 0.9],
                         [-0.7, 0.6, 0.0, 1.1]], dtype=torch.float64)
    attr = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    weights = torch.rand(1, H, W, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(pos, values):
        rast = rasterize(pos[None], tri, (H, W))
        return (interpolate(values, rast, tri) * weights).sum()

    assert torch.autograd.gradcheck(loss, (base.clone().requires_grad_(), attr.clone().requires_grad_()),
                                    eps=1e-6, atol=1e-5)


def test_silhouette_loss_moves_an_edge_vertex_outwards():
    # A white triangle on black; the target is white further right: only the antialiased edge
    # can say that the right-hand vertex should move right.
    pos = flat_triangle([[-0.6, -0.6], [0.2, 0.0], [-0.6, 0.6]]).requires_grad_()
    tri = torch.tensor([[0, 1, 2]])
    rast = rasterize(pos, tri, (H, W))
    white = (rast[..., 3:] > 0).float()
    image = antialias(white, rast, pos, tri)
    target = rasterize(flat_triangle([[-0.6, -0.6], [0.5, 0.0], [-0.6, 0.6]]), tri, (H, W))[..., 3:] > 0
    loss = ((image - target.float()) ** 2).sum()
    loss.backward()
    assert pos.grad[0, 1, 0] < 0  # moving vertex 1 right (+x) lowers the loss
    # Without antialiasing the discrete coverage gives no gradient at all.
    silent = pos.detach().clone().requires_grad_()
    r2 = rasterize(silent, tri, (H, W))
    ((interpolate(torch.ones(3, 1), r2, tri) - target.float()) ** 2).sum().backward()
    assert torch.count_nonzero(silent.grad) == 0


def test_antialias_blends_an_edge_pixel_by_its_coverage():
    # A vertical edge at x = column 10 + 0.8 px: the pixel to its right (column 11, centre 11.5)
    # is not covered, its left neighbour is; the edge reaches 0.3 px past their midpoint at 11.0.
    x_edge = 2 * (11.3) / W - 1
    pos = flat_triangle([[-1.0, -3.0], [x_edge, -3.0], [x_edge, 3.0]])
    pos = torch.cat([pos, flat_triangle([[-1.0, 3.0]])], dim=1)
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(pos, tri, (H, W))
    white = (rast[..., 3:] > 0).float()
    out = antialias(white, rast, pos, tri)[0, H // 2, :, 0]
    assert white[0, H // 2, 10, 0] == 1 and white[0, H // 2, 11, 0] == 0
    assert math.isclose(float(out[11]), 0.3, abs_tol=1e-5)
    assert float(out[10]) == 1.0 and float(out[12]) == 0.0


def test_edge_neighbors_of_a_closed_mesh():
    tetra = torch.tensor([[0, 1, 2], [0, 3, 1], [1, 3, 2], [0, 2, 3]])
    neighbors = edge_neighbors(tetra)
    assert (neighbors >= 0).all()
    for f in range(4):
        for k in range(3):
            a, b = int(tetra[f, k]), int(tetra[f, (k + 1) % 3])
            g = int(neighbors[f, k])
            assert g != f and {a, b} <= set(tetra[g].tolist())
