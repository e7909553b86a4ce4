"""The text-to-3D recipes end to end on CPU with tiny random guidance models."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import trimesh
from conftest import ROOT, validate_gltf

from gen3d import hookimpl
from gen3d.errors import ConfigError
from gen3d.io import load_checkpoint
from gen3d.plugins import get_component
from gen3d import load_recipe
from gen3d.specs import Component
from gen3d.testing import guidance_batch
from gen3d import run_recipe

# Small and quick: 32 px views, a coarse grid, a 64^3 export, a short turntable.
SMALL = ["cameras.sizes=[32]", "cameras.size_at=[]", "representation.resolutions=[24, 32]", "representation.upsample_at=[10]",
         "export.resolution=64", "preview.turntable_frames=3", "preview.size=32", "checkpoint_every=10"]


def recipe(name: str, model, *extra: str):
    return load_recipe(ROOT / "recipes" / name, [f"guidance.model={model}", *SMALL, *extra])


def initial_table(rec) -> torch.Tensor:
    rep = rec.loop.representation
    aabb = torch.tensor([-rec.loop.box] * 3 + [rec.loop.box] * 3)
    diagonal = float((aabb[3:] - aabb[:3]).norm())
    field = get_component("representation", rep.type).factory(
        rep.config, aabb=aabb, step_size=diagonal / rec.loop.render.samples_per_diagonal)
    return field.table.detach().clone()


def check_run(out, rec, steps: int, gltf_validator=None):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["prompt"]
    state = load_checkpoint(out / "checkpoints" / "last.safetensors")
    table = state["loop"]["field"]["table"]
    start = torch.nn.functional.interpolate(
        initial_table(rec).t().reshape(1, -1, 24, 24, 24), size=(32,) * 3, mode="trilinear",
        align_corners=True).reshape(table.shape[1], -1).t()
    assert (table - start).abs().max() > 1e-3, "guidance did not change the field"
    mesh = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 100 and metrics["mesh_faces"] > 100
    assert (out / "mesh.obj").is_file() and (out / "turntable.gif").is_file()
    return metrics


def test_dreamfusion_recipe_runs_with_tiny_stable_diffusion(tiny_sd, tmp_path, gltf_validator):
    rec = recipe("dreamfusion.yaml", tiny_sd, "prompt=a hamburger", "steps=24", "shading.albedo_only_steps=8",
                 "cameras.batch=2")
    run_recipe(rec, tmp_path, quiet=True)
    metrics = check_run(tmp_path, rec, 24)
    assert metrics["export_level"] > 0
    (report,) = validate_gltf([tmp_path / "mesh.glb"])
    assert report["errors"] == 0, report


def test_clip_recipe_runs_with_tiny_clip(tiny_clip, tmp_path):
    rec = recipe("clip-nerf.yaml", tiny_clip, "prompt=a red ball", "steps=20")
    run_recipe(rec, tmp_path, quiet=True)
    check_run(tmp_path, rec, 20)


def test_the_guidance_itself_moves_the_field(tiny_clip, tmp_path):
    """Not only the regularisers: the same run with the guidance weighted 0 ends elsewhere."""
    tables = []
    for weight in (1.0, 0.0):
        rec = recipe("clip-nerf.yaml", tiny_clip, "prompt=a red ball", "steps=8", f"guidance.weight={weight}",
                     "export.formats=[ply]", "preview.turntable_frames=0")
        run_recipe(rec, tmp_path / str(weight), quiet=True)
        tables.append(load_checkpoint(tmp_path / str(weight) / "checkpoints" / "last.safetensors")
                      ["loop"]["field"]["table"])
    assert (tables[0] - tables[1]).abs().max() > 1e-4


def test_sds_gradient_reaches_the_field(tiny_sd, tmp_path):
    from gen3d.testing import build_loop

    rec = recipe("dreamfusion.yaml", tiny_sd, "prompt=a hamburger", "regularisers.entropy=0",
                 "regularisers.orientation=0", "shading.albedo_only_steps=0")
    loop = build_loop(rec, tmp_path)
    views = loop.sample_views(1, 32)
    origins, dirs = loop.view_rays(views.cameras)
    out = loop.renderer.render(loop.field, origins, dirs, torch.ones(3))
    images = out.rgb.view(1, 32, 32, 3).permute(0, 3, 1, 2)
    loop.guidance(guidance_batch(images, ["a hamburger"], 0, 10)).loss.backward()
    grad = loop.field.table.grad.coalesce()
    assert grad.values().abs().sum() > 0


def test_resume_continues_to_the_same_field(tiny_clip, tmp_path):
    straight = recipe("clip-nerf.yaml", tiny_clip, "prompt=a red ball", "steps=12", "checkpoint_every=6",
                      "export.formats=[ply]", "preview.turntable_frames=0")
    run_recipe(straight, tmp_path / "a", quiet=True)
    half = recipe("clip-nerf.yaml", tiny_clip, "prompt=a red ball", "steps=6", "checkpoint_every=6",
                  "export.formats=[ply]", "preview.turntable_frames=0")
    run_recipe(half, tmp_path / "b", quiet=True)
    run_recipe(straight, tmp_path / "b", resume=True, quiet=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")["loop"]["field"]["table"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors")["loop"]["field"]["table"]
    if torch.cuda.is_available():
        # CUDA's atomics make even two straight runs differ (max 0.03, mean 6e-6 here on an H100):
        # a resumed run must be as close as that, not bit-identical.
        assert (a - b).abs().mean() < 1e-4
    else:
        torch.testing.assert_close(a, b)


def test_prompt_is_required(tiny_clip, tmp_path):
    with pytest.raises(ConfigError, match="prompt is missing"):
        run_recipe(recipe("clip-nerf.yaml", tiny_clip, "steps=2"), tmp_path, quiet=True)


def test_grid_normals_are_the_density_gradient():
    component = get_component("representation", "grid-nerf")
    config = component.config(resolutions=[16], upsample_at=[], blob_density=10.0, blob_radius=0.6)
    aabb = torch.tensor([-1.0, -1, -1, 1, 1, 1])
    field = component.factory(config, aabb=aabb, step_size=0.02)
    with torch.no_grad():
        field.table[:, 0] += 0.3 * torch.randn(len(field.table))
    x = (torch.rand(64, 3) - 0.5) * 1.2
    normals = field.normals(x)
    # Finite differences of the raw density in the same cells (trilinear is linear along an axis).
    eps = 1e-4
    grad = torch.stack([(field.density(x + eps * e) - field.density(x - eps * e)) / (2 * eps)
                        for e in torch.eye(3)], dim=1)
    torch.testing.assert_close(normals, -torch.nn.functional.normalize(grad, dim=-1), atol=2e-2, rtol=0)
    # Differentiable w.r.t. the grid, so shading and the orientation loss train the geometry.
    normals.sum().backward()
    assert field.table.grad is not None


class TinyMLPField(torch.nn.Module):
    """A representation with only what rendering needs: density(x) and forward(x, d)."""

    def __init__(self, config, *, aabb, step_size):
        super().__init__()
        self.register_buffer("aabb", aabb.clone())
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Softplus(), torch.nn.Linear(32, 4))

    def density(self, x):
        return torch.nn.functional.softplus(self.net(x)[:, 0] + 2.0 - 4.0 * x.norm(dim=-1))

    def forward(self, x, d):
        out = self.net(x)
        return torch.nn.functional.softplus(out[:, 0] + 2.0 - 4.0 * x.norm(dim=-1)), torch.sigmoid(out[:, 1:])


@dataclass
class TinyMLPConfig:
    hidden: int = 32


class TinyMLPPlugin:
    @hookimpl
    def gen3d_representations(self):
        return [Component("tiny-mlp", TinyMLPField, TinyMLPConfig, "test-only MLP field")]


@pytest.fixture
def mlp_representation(register):
    register(TinyMLPPlugin())


def test_any_representation_that_renders_colour_and_opacity(mlp_representation, tiny_sd, tmp_path):
    """No make_optimizer, grow, normals or state helpers: the loop's defaults take over."""
    rec = load_recipe(ROOT / "recipes" / "dreamfusion.yaml", [
        f"guidance.model={tiny_sd}", "prompt=a hamburger", "representation={type: tiny-mlp}", "steps=6",
        "shading.albedo_only_steps=2", "cameras.sizes=[24]", "cameras.size_at=[]", "export.resolution=48",
        "export.formats=[glb]", "preview.turntable_frames=2", "preview.size=24", "checkpoint_every=3"])
    metrics = run_recipe(rec, tmp_path, quiet=True)
    assert metrics["steps"] == 6 and (tmp_path / "mesh.glb").is_file()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")["loop"]["field"]
    assert "net.0.weight" in state


def test_impossible_camera_ranges_are_refused():
    from gen3d_plugins.text_to_3d import CameraSampling

    for bad in ({"fov": [-5.0, 200.0]}, {"fov": [40.0, 190.0]}, {"distance": [0.0, 1.0]},
                {"elevation": [60.0, 10.0]}, {"sizes": [64, 128]}):
        with pytest.raises(ValueError):
            CameraSampling(**bad)
