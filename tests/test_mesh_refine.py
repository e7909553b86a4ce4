"""Marching tetrahedra on an analytic sphere, and the mesh-refine stage after a tiny reconstruction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
import yaml

from gen3d import ConfigError, load_recipe, run_recipe
from gen3d.tets import cube_tets, laplacian_loss, marching_tets, normal_laplacian_loss, tet_grid

ROOT = Path(__file__).resolve().parents[1]
RADIUS = 0.6


def sphere_grid(resolution=24):
    grid = tet_grid(torch.tensor([-1.0, -1, -1, 1, 1, 1]), resolution)
    return grid, grid.positions.norm(dim=1) - RADIUS


def test_cube_split_fills_the_cube():
    corners = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.float64)
    volumes = [abs(torch.linalg.det(corners[t[1:]] - corners[t[0]])) / 6 for t in cube_tets()]
    assert sum(volumes) == pytest.approx(1.0) and all(v == pytest.approx(1 / 6) for v in volumes)


def test_marching_tets_on_a_sphere_is_closed_outward_and_round():
    grid, sdf = sphere_grid()
    mesh = marching_tets(grid.positions, sdf, grid.tets)
    out = trimesh.Trimesh(mesh.verts.numpy(), mesh.faces.numpy(), process=False)
    assert out.is_watertight and out.is_winding_consistent
    assert out.volume > 0  # outward winding gives a positive signed volume
    centroids = out.triangles_center
    assert (np.einsum("ij,ij->i", out.face_normals, centroids) > 0).all()  # every face faces away from the centre
    radius = np.linalg.norm(out.vertices, axis=1)
    assert np.abs(radius - RADIUS).mean() < 0.004 and np.abs(radius - RADIUS).max() < 0.02
    assert out.volume == pytest.approx(4 / 3 * np.pi * RADIUS ** 3, rel=0.03)


def test_marching_tets_is_differentiable_in_sdf_and_positions():
    grid, sdf = sphere_grid(16)
    shift = torch.zeros((), requires_grad=True)
    mesh = marching_tets(grid.positions, sdf + shift, grid.tets)
    mean_radius = mesh.verts.norm(dim=1).mean()
    mean_radius.backward()
    # Raising an SDF of unit slope everywhere pulls the surface in by as much (linear interpolation
    # along chords bends that slightly).
    assert shift.grad == pytest.approx(-1.0, abs=0.05)
    positions = grid.positions.clone().requires_grad_()
    mesh = marching_tets(positions, sdf, grid.tets)
    mesh.verts.sum().backward()
    assert positions.grad.abs().sum() > 0


def flat_grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An n x n lattice of unit squares' corners in the plane z = 0, each square two triangles."""
    xy = torch.stack(torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="ij"), -1).reshape(-1, 2)
    verts = torch.cat([xy, torch.zeros(n * n, 1)], 1)
    idx = torch.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].reshape(-1), idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1), idx[:-1, 1:].reshape(-1)
    return verts, torch.cat([torch.stack([a, b, c], 1), torch.stack([a, c, d], 1)])


def test_laplacian_of_a_flat_regular_grid_is_zero_inside():
    verts, faces = flat_grid(5)
    assert float(laplacian_loss(verts, faces)) > 0  # the border pulls inwards
    bumped = verts.clone()
    bumped[12, 2] = 1.0
    assert float(laplacian_loss(bumped, faces)) > float(laplacian_loss(verts, faces))


def test_normal_smoothing_ignores_where_vertices_sit_along_the_surface():
    """Marching tetrahedra place vertices unevenly: the normal Laplacian leaves that alone (the
    whole Laplacian does not, and evening it out moves the surface), and a bump costs in both."""
    flat, faces = flat_grid(7)
    uneven = flat.clone()
    uneven[:, :2] += 0.3 * torch.rand(49, 2, generator=torch.Generator().manual_seed(0))
    bumped = flat.clone()
    bumped[24, 2] = 0.5
    assert float(normal_laplacian_loss(uneven, faces)) < 1e-12 < float(normal_laplacian_loss(bumped, faces))
    assert float(laplacian_loss(uneven, faces)) > float(laplacian_loss(flat, faces))


def tiny_refine_recipe(small_dataset, tmp_path, refine_steps=60, **refine):
    """The shipped recipe made tiny: a few reconstruction steps on the 32 px toy, then a short refine."""
    data = yaml.safe_load((ROOT / "recipes" / "nerf-refine.yaml").read_text())
    nerf, stage = data["stages"]
    nerf.update(steps=60, max_seconds=None, checkpoint_every=1000)
    nerf["data"]["path"] = str(small_dataset)
    nerf["representation"].update(resolutions=[16, 32], upsample_at=[20])
    nerf["render"].update(samples_per_diagonal=64, occupancy_resolution=16, edge_supersample=1, eval_offsets=1)
    nerf["train"] = {"rays_per_step": 1024, "tighten_box_at": 30}
    nerf["export"] = {"resolution": 48, "formats": ["ply"], "colors": "vertex"}
    nerf["preview"] = {"turntable_frames": 0, "test_images": 1}
    stage.update(steps=refine_steps, max_seconds=None, checkpoint_every=10)
    stage["data"]["path"] = str(small_dataset)
    stage["tets"] = {"resolution": 24, "band": 2}
    stage["color_resolution"] = 32
    stage["smooth_start"] = 0  # a 24-cell grid's cells are too coarse to blur
    stage.update(refine)
    stage["export"] = {"formats": ["glb"], "colors": "vertex", "target_faces": None}
    stage["preview"] = {"turntable_frames": 2, "test_images": 1}
    path = tmp_path / "refine.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_silhouettes_through_the_rasteriser_grow_a_small_sphere():
    """The whole differentiable path (marching tets -> rasterize -> antialias -> mask loss ->
    SDF values): a 0.5 sphere fitted to a 0.6 sphere's coverage grows, its mask error falls."""
    from gen3d.cameras import orbit
    from gen3d.raster import antialias, clip_matrices, edge_neighbors, project, rasterize

    torch.manual_seed(0)
    grid = tet_grid(torch.tensor([-1.0, -1, -1, 1, 1, 1]), 24)
    cameras = orbit(8, 3.0, 20.0, 0.8, 48)

    def coverage(mesh, views):
        clip = project(mesh.verts, clip_matrices(views))
        rast = rasterize(clip, mesh.faces, (48, 48))
        return antialias((rast[..., 3:] > 0).float(), rast, clip, mesh.faces, edge_neighbors(mesh.faces))

    with torch.no_grad():
        target = coverage(marching_tets(grid.positions, grid.positions.norm(dim=1) - 0.6, grid.tets), cameras)
    sdf = (grid.positions.norm(dim=1) - 0.5).requires_grad_()
    optimizer = torch.optim.Adam([sdf], lr=0.01)
    losses, radii = [], []
    for step in range(30):
        mesh = marching_tets(grid.positions, sdf, grid.tets)
        loss = ((coverage(mesh, cameras[torch.arange(step % 2, 8, 2)]) - target[step % 2::2]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        radii.append(float(mesh.verts.norm(dim=1).mean()))
    assert radii[-1] > radii[0] + 0.01, radii
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses


@pytest.mark.slow
def test_refine_after_a_tiny_reconstruction_improves_chamfer(small_dataset, tmp_path):
    # The start is drawn on a 20-point lattice, coarser than the 24-cell tetrahedra: a start the
    # images can correct (drawn as the export draws it, it is as good as a 24-cell grid can hold).
    metrics = run_recipe(tiny_refine_recipe(small_dataset, tmp_path, start_resolution=20), tmp_path / "run",
                         quiet=True)
    refine = metrics["stages"]["refine"]
    assert refine["renderer"].startswith("raster-")
    assert refine["mesh_faces"] > 1000 and np.isfinite(refine["psnr_test"])
    assert refine["chamfer_start"] > metrics["stages"]["nerf"]["chamfer"]  # the coarse start is worse...
    assert refine["chamfer"] < 0.95 * refine["chamfer_start"], refine  # ... and the images correct it
    curve = json.loads((tmp_path / "run" / "stages" / "refine" / "curves.json").read_text())["points"]
    assert np.mean([p["mask"] for p in curve[-5:]]) < np.mean([p["mask"] for p in curve[:5]])  # the outlines fit
    assert (tmp_path / "run" / "mesh.glb").is_file() and (tmp_path / "run" / "turntable.gif").is_file()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["chamfer"] == refine["chamfer"]


def test_refine_needs_init_from(small_dataset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"loop: mesh-refine\nsteps: 3\ndata: {{path: {small_dataset}}}\n")
    recipe = load_recipe(bad)
    with pytest.raises(ConfigError, match="set init_from"):
        run_recipe(recipe, tmp_path / "run", quiet=True)


@pytest.mark.slow
def test_refine_resumes_mid_stage_to_the_same_mesh(small_dataset, tmp_path, monkeypatch):
    from gen3d.io import load_checkpoint
    from gen3d.trainer import Interrupted
    from gen3d_plugins.mesh_refine import MeshRefine

    recipe = tiny_refine_recipe(small_dataset, tmp_path, refine_steps=20)
    straight = run_recipe(recipe, tmp_path / "a", quiet=True)
    original = MeshRefine.step

    def interrupt(self, step):
        if step == 13:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(MeshRefine, "step", interrupt)
    with pytest.raises(Interrupted, match="interrupted at step 13"):
        run_recipe(recipe, tmp_path / "b", quiet=True)
    monkeypatch.setattr(MeshRefine, "step", original)
    resumed = run_recipe(recipe, tmp_path / "b", resume=True, quiet=True)
    a, b = (load_checkpoint(tmp_path / run / "stages" / "refine" / "checkpoints" / "last.safetensors")["loop"]["field"]
            for run in ("a", "b"))
    assert torch.allclose(a["sdf"], b["sdf"], atol=1e-5) and torch.allclose(a["colors.table"], b["colors.table"], atol=1e-5)
    assert resumed["chamfer"] == pytest.approx(straight["chamfer"], abs=1e-4)


def test_start_distances_reproduce_the_start_surface():
    """The tetrahedra's SDF values (exact distances to the start mesh, signed by its winding
    number) march back to that mesh: on a 32-cell grid a sphere of radius 0.6 comes back within
    a few thousandths of its radius, without inner shells."""
    from gen3d_plugins.mesh_refine import signed_distances

    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.6)
    grid = tet_grid(torch.tensor([-1.0, -1, -1, 1, 1, 1]), 32)
    sdf = signed_distances(grid.positions, sphere)
    assert (sdf[grid.positions.norm(dim=1) < 0.3] < 0).all() and (sdf[grid.positions.norm(dim=1) > 0.9] > 0).all()
    mesh = marching_tets(grid.positions, sdf, grid.tets)
    radii = mesh.verts.norm(dim=1)
    assert abs(float(radii.mean()) - 0.6) < 0.003 and float((radii - 0.6).abs().max()) < 0.01


def test_pixel_filter_matrix_weighs_the_finer_samples_of_each_pixel():
    """A box of one pixel averages the pixel's own samples; Blackman-Harris 1.5 px (Cycles'
    window over 3 px) reaches into the neighbours, symmetrically; every row sums to 1."""
    from gen3d import PixelFilter

    box = PixelFilter("box", 1.0).matrix(4, 2)
    assert torch.allclose(box[1], torch.tensor([0, 0, 0.5, 0.5, 0, 0, 0, 0]))
    bh = PixelFilter("blackman-harris", 1.5).matrix(8, 4)
    assert torch.allclose(bh.sum(1), torch.ones(8))
    around = bh[4, 12:24]  # the samples of pixels 3, 4 and 5: the window's 3 px
    assert torch.allclose(around, around.flip(0), atol=1e-6) and around[:4].sum() > 0.01
    assert bh[4, :12].sum() == 0 and bh[4, 24:].sum() == 0


def test_refine_supersampled_views_are_the_filtered_fine_render(small_dataset, tmp_path):
    """draw_filtered rasterises through cameras ``supersample`` times finer (focal lengths and
    centres scaled) and, with a one-pixel box, returns the fine render's 2x2 means; a bad
    supersample is a config error naming it."""
    from types import SimpleNamespace

    from gen3d_plugins.mesh_refine import MeshRefine, MeshRefineConfig

    from gen3d_plugins.nerf_data import NerfDataConfig, load

    cameras = load(NerfDataConfig(path=Path(small_dataset))).test.cameras[:2]
    fine = torch.rand(2, cameras.height * 2, cameras.width * 2, 4)

    def draw(mesh, seen, background):
        assert (seen.width, seen.height) == (cameras.width * 2, cameras.height * 2)
        torch.testing.assert_close(seen.fx, cameras.fx * 2) and torch.testing.assert_close(seen.cx, cameras.cx * 2)
        return fine

    loop = SimpleNamespace(config=MeshRefineConfig(supersample=2, filter_space="srgb"), draw=draw)
    filtered = MeshRefine.draw_filtered(loop, None, cameras, torch.ones(2, 3))
    means = fine.reshape(2, cameras.height, 2, cameras.width, 2, 4).mean(dim=(2, 4))
    torch.testing.assert_close(filtered, means, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="supersample"):
        tiny_refine_recipe(small_dataset, tmp_path, supersample=9)


def test_refine_filters_views_in_linear_light_as_blender_does(small_dataset):
    """filter_space linear (the default): a pixel half white, half black is sRGB 0.735 (linear
    0.5), not 0.5; a pixel half covered by white keeps white as its colour, with alpha 0.5, and
    only then goes over the background; a fully covered pixel of one colour keeps it."""
    from types import SimpleNamespace

    from gen3d_plugins.mesh_refine import MeshRefine, MeshRefineConfig
    from gen3d_plugins.nerf_data import NerfDataConfig, load

    cameras = load(NerfDataConfig(path=Path(small_dataset))).test.cameras[:1]
    h, w = cameras.height, cameras.width
    fine = torch.zeros(1, 2 * h, 2 * w, 4)  # drawn over black: colour x coverage, coverage
    fine[0, :2, :2] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # pixel (0, 0): white left, black right
    fine[0, :2, 1, :3] = 0.0
    fine[0, 2:4, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # pixel (1, 0): white on the left half only
    fine[0, 4:6, :2] = torch.tensor([0.2, 0.4, 0.6, 1.0])  # pixel (2, 0): one colour

    def draw(mesh, seen, background):
        assert (background == 0).all()  # the colour comes premultiplied by its coverage
        return fine

    loop = SimpleNamespace(config=MeshRefineConfig(supersample=2), draw=draw)
    out = MeshRefine.draw_filtered(loop, None, cameras, torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.7354, 0.7354, 0.7354, 1.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([0.5, 0.5, 1.0, 0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 2, 0], torch.tensor([0.2, 0.4, 0.6, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 5, 5], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # empty: the background
