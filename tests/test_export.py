"""Mesh extraction and exports, checked with the real tools: glTF validator and Blender."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from conftest import blender_import, validate_gltf
from gen3d.errors import ConfigError, Gen3DError
from gen3d.export import MeshSettings, export_mesh, extract_mesh

SEMI_AXES = torch.tensor([0.3, 0.5, 0.8])  # tall along world Z: "upright" is easy to check


class Ellipsoid:
    """An analytic field: dense inside an ellipsoid, colour varying with height (red bottom, blue top)."""

    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])

    def density(self, x):
        r = (x / SEMI_AXES).norm(dim=-1)
        return 100 * torch.sigmoid((1 - r) * 40)

    def albedo(self, x):
        t = ((x[:, 2:3] + 0.8) / 1.6).clamp(0, 1)
        return torch.cat([1 - t, 0.2 * torch.ones_like(t), t], dim=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    mesh = extract_mesh(Ellipsoid(), MeshSettings(resolution=64, level=50.0))
    files = export_mesh(mesh, out, ["glb", "obj", "ply"])
    return mesh, out, files


def test_extracted_mesh_matches_the_field(exported):
    mesh, _, _ = exported
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert np.allclose(extent, 2 * SEMI_AXES.numpy(), atol=0.05)
    assert mesh.is_watertight
    assert mesh.volume > 0  # normals point outwards
    colors = mesh.visual.vertex_colors[:, :3].astype(float)
    top, bottom = mesh.vertices[:, 2] > 0.6, mesh.vertices[:, 2] < -0.6
    assert colors[top, 2].mean() > 180 and colors[bottom, 0].mean() > 180


def test_files_written_and_y_up(exported):
    mesh, out, files = exported
    assert sorted(p.name for p in files) == ["mesh.glb", "mesh.mtl", "mesh.obj", "mesh.ply"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left behind
    ply = trimesh.load(out / "mesh.ply", process=False)
    extent = ply.bounds[1] - ply.bounds[0]
    assert extent[1] == pytest.approx(1.6, abs=0.05)  # world Z became the file's Y
    assert len(np.unique(ply.visual.vertex_colors[:, 2])) > 10
    obj_text = (out / "mesh.obj").read_text()
    assert "mtllib mesh.mtl" in obj_text and "usemtl gen3d_vertex_colors" in obj_text


def test_glb_passes_the_khronos_validator(exported, gltf_validator):
    _, out, _ = exported
    (report,) = validate_gltf([out / "mesh.glb"])
    assert report["errors"] == 0, report


@pytest.mark.blender
def test_blender_imports_glb_and_obj_upright_with_colours(exported, blender):
    mesh, out, _ = exported
    for report in blender_import(blender, [out / "mesh.glb", out / "mesh.obj"]):
        size = np.array(report["max"]) - np.array(report["min"])
        # Blender is Z up like our world: the tall axis must come back as Z, the sizes unchanged.
        assert size == pytest.approx(mesh.bounds[1] - mesh.bounds[0], abs=0.02), report
        assert report["vertices"] >= len(mesh.vertices) * 0.9
        assert report["colors"] > 0 and report["color_std"] > 0.1, report


def test_unknown_format_lists_known_exporters(tmp_path, exported):
    mesh, _, _ = exported
    with pytest.raises(ConfigError, match="unknown exporter 'usdz'.*Known exporters: glb, obj, ply"):
        export_mesh(mesh, tmp_path, ["usdz"])


def test_empty_field_is_a_clear_error():
    class Empty(Ellipsoid):
        def density(self, x):
            return torch.zeros(len(x))

    with pytest.raises(Gen3DError, match="never crosses the export level"):
        extract_mesh(Empty(), MeshSettings(resolution=16, level=10.0))


def test_hollow_shell_gives_one_outer_surface():
    """A field that is dense only in a thin shell (as NeRF leaves solids) exports its outside only."""

    class Shell(Ellipsoid):
        def density(self, x):
            r = x.norm(dim=-1)
            return 60 * torch.exp(-((r - 0.6) / 0.04) ** 2) * (1 - 0.6 * (x[:, 2] > 0.5).float())  # weak cap

    mesh = extract_mesh(Shell(), MeshSettings(resolution=96, level=30.0))
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert radii.min() > 0.55  # no inner surface at r ~ 0.57
    assert mesh.is_watertight  # the weak cap (peak 24 < level 30) is closed, not a hole
    plain = extract_mesh(Shell(), MeshSettings(resolution=96, level=30.0, fill_fraction=0.0))
    assert np.linalg.norm(plain.vertices, axis=1).min() < 0.58  # without filling: inner shell too
