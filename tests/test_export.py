"""Mesh extraction and exports, checked with the real tools: glTF validator and Blender."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import trimesh

from conftest import blender_import, validate_gltf
from gen3d.colors import srgb_to_linear
from gen3d.config import Choice, Context
from gen3d.errors import ConfigError, Gen3DError
from gen3d.export import MeshSettings, export_mesh, extract_mesh, level_from_silhouettes
from gen3d.texture import texture_of
from gen3d.plugins import get_registry
from gen3d.recipe import resolve_exporters
from gen3d.render import RenderSettings, VolumeRenderer
from gen3d.specs import Component

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


class RampBall:
    """Density rising linearly inwards from the sphere r = 0.6 (0) to r = 0.4 (100): a soft surface
    like the ones a radiance field learns."""

    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])

    def density(self, x):
        return (500 * (0.6 - x.norm(dim=-1))).clamp(0, 100)

    def __call__(self, x, d):
        return self.density(x), torch.full((len(x), 3), 0.5)


def test_export_level_reproduces_the_silhouettes():
    # Parallel rays at distances 0..0.7 from the ball's centre; the images say the object's
    # outline is at 0.5. A ray at distance b meets peak density 500 (0.6 - b), so the level that
    # draws the outline at 0.5 is 50, whatever the density scale.
    renderer = VolumeRenderer(RampBall.aabb, RenderSettings(samples_per_diagonal=1024))
    offsets = torch.linspace(0.0, 0.7, 701)
    origins = torch.stack([torch.full_like(offsets, -3.0), offsets, torch.zeros_like(offsets)], dim=1)
    dirs = torch.tensor([[1.0, 0.0, 0.0]]).expand(len(offsets), 3)
    level = level_from_silhouettes(renderer, RampBall(), origins, dirs, covered=offsets < 0.5)
    assert level == pytest.approx(50.0, rel=0.03)
    exact = extract_mesh(RampBall(), MeshSettings(resolution=96, level=level, fill_fraction=0, colors="vertex"))
    assert np.linalg.norm(exact.vertices, axis=1).mean() == pytest.approx(0.5, abs=0.005)
    # Filling the inside keeps only fill_band voxels of the outer ramp, 3.6 voxels wide here from
    # the outside level (12.5) to the level: a band of 6 keeps it (and the voxel past the level
    # that marching cubes interpolates to); the default 4 cuts it, the surface moves out.
    kept = extract_mesh(RampBall(), MeshSettings(resolution=96, level=level, fill_band=6, colors="vertex"))
    assert np.linalg.norm(kept.vertices, axis=1).mean() == pytest.approx(0.5, abs=0.005)
    cut = extract_mesh(RampBall(), MeshSettings(resolution=96, level=level, colors="vertex"))
    assert 0.505 < np.linalg.norm(cut.vertices, axis=1).mean() < 0.5 + 2 / 96
    # An outline at 0.45 asks for a higher level; no covered ray at all: no level.
    assert level_from_silhouettes(renderer, RampBall(), origins, dirs, offsets < 0.45) == pytest.approx(75, rel=0.03)
    assert level_from_silhouettes(renderer, RampBall(), origins, dirs, offsets < 0) is None


def exporters(*formats: str) -> list:
    """The formats' exporters, resolved against the installed plugins as a recipe's are."""
    settings = MeshSettings(formats=list(formats))
    resolve_exporters(settings, Context(registry=get_registry()), "export")
    return settings.exporters


def export_ellipsoid(out, colors: str):
    mesh = extract_mesh(Ellipsoid(), MeshSettings(resolution=64, level=50.0, colors=colors, texture_size=256))
    files = export_mesh(mesh, out, exporters("glb", "obj", "ply"))
    return mesh, out, files


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The ellipsoid exported with vertex colours only."""
    return export_ellipsoid(tmp_path_factory.mktemp("export"), "vertex")


@pytest.fixture(scope="module")
def exported_textured(tmp_path_factory):
    """The ellipsoid exported with a baked texture (export.colors' default)."""
    return export_ellipsoid(tmp_path_factory.mktemp("textured"), "texture")


def test_extracted_mesh_matches_the_field(exported):
    mesh, _, _ = exported
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert np.allclose(extent, 2 * SEMI_AXES.numpy(), atol=0.05)
    assert mesh.is_watertight
    assert mesh.volume > 0  # normals point outwards
    colors = mesh.visual.vertex_colors[:, :3].astype(float)
    top, bottom = mesh.vertices[:, 2] > 0.6, mesh.vertices[:, 2] < -0.6
    assert colors[top, 2].mean() > 180 and colors[bottom, 0].mean() > 180


@pytest.mark.parametrize("which", ["exported", "exported_textured"])
def test_files_written_each_in_its_formats_orientation(which, request):
    mesh, out, files = request.getfixturevalue(which)
    texture = ["mesh.png"] if which == "exported_textured" else []
    assert sorted(p.name for p in files) == sorted(["mesh.glb", "mesh.mtl", "mesh.obj", "mesh.ply", *texture])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left behind
    # The ellipsoid is tall along world Z: glTF and OBJ are written Y up, PLY Z up as it is.
    tall_axis = {}
    for name in ("mesh.glb", "mesh.obj", "mesh.ply"):
        loaded = trimesh.load(out / name, force="mesh", process=False)
        extent = loaded.bounds[1] - loaded.bounds[0]
        assert sorted(extent) == pytest.approx(sorted(mesh.extents), abs=1e-4), name
        tall_axis[name] = "XYZ"[int(np.argmax(extent))]
    assert tall_axis == {"mesh.glb": "Y", "mesh.obj": "Y", "mesh.ply": "Z"}
    obj_text = (out / "mesh.obj").read_text()
    material = "gen3d_texture" if texture else "gen3d_vertex_colors"
    assert "mtllib mesh.mtl" in obj_text and f"usemtl {material}" in obj_text


def read_glb_accessor(path, attribute: str) -> tuple[np.ndarray, dict]:
    """One vertex attribute of a GLB's first primitive, as floats (normalized integers scaled to 0..1),
    and its accessor."""
    data = path.read_bytes()
    (json_length,) = struct.unpack_from("<I", data, 12)
    gltf = json.loads(data[20:20 + json_length])
    binary = data[28 + json_length:]  # after the JSON chunk and the BIN chunk's own 8-byte header
    accessor = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"][attribute]]
    view = gltf["bufferViews"][accessor["bufferView"]]
    dtype = np.dtype({5121: "<u1", 5123: "<u2", 5126: "<f4"}[accessor["componentType"]])
    width = {"VEC3": 3, "VEC4": 4}[accessor["type"]]
    values = np.frombuffer(binary, dtype, accessor["count"] * width, view["byteOffset"] + accessor.get("byteOffset", 0))
    values = values.reshape(-1, width).astype(np.float64)
    return (values / np.iinfo(dtype).max if accessor.get("normalized") else values), accessor


def test_colours_in_each_formats_colour_space(exported):
    mesh, out, _ = exported
    srgb = mesh.visual.vertex_colors[:, :3] / 255.0
    # glTF's COLOR_0 is linear by its specification, in 16 bits so the darks keep their steps.
    color, accessor = read_glb_accessor(out / "mesh.glb", "COLOR_0")
    assert accessor["componentType"] == 5123 and accessor["normalized"]
    assert np.abs(color[:, :3] - srgb_to_linear(srgb)).max() < 1e-4
    assert np.all(color[:, 3] == 1.0)
    # PLY and OBJ vertex colours stay sRGB (as Blender reads them): the mesh's own values.
    ply = trimesh.load(out / "mesh.ply", process=False)
    assert np.array_equal(ply.visual.vertex_colors, mesh.visual.vertex_colors)
    obj_rgb = np.array([line.split()[4:7] for line in (out / "mesh.obj").read_text().splitlines()
                        if line.startswith("v ")], dtype=np.float64)
    assert np.abs(obj_rgb - srgb).max() < 1e-4


def test_textured_files_hold_the_baked_texture_as_srgb(exported_textured):
    from PIL import Image

    mesh, out, _ = exported_textured
    image = texture_of(mesh).image
    # baseColorTexture and map_Kd are sRGB: the PNG holds the baked values as they are, in both files.
    assert np.array_equal(np.asarray(Image.open(out / "mesh.png")), image)
    loaded = trimesh.load(out / "mesh.glb", force="mesh", process=False)
    assert np.array_equal(np.asarray(loaded.visual.material.baseColorTexture.convert("RGB")), image)
    # The texture looked up at the vertices is the field's colour there (red bottom, blue top).
    colors = loaded.visual.to_color().vertex_colors[:, :3].astype(float)
    top, bottom = loaded.vertices[:, 1] > 0.6, loaded.vertices[:, 1] < -0.6  # Y up
    assert colors[top, 2].mean() > 180 and colors[bottom, 0].mean() > 180


@pytest.mark.parametrize("which", ["exported", "exported_textured"])
def test_glb_passes_the_khronos_validator_without_a_remark(which, request, gltf_validator):
    _, out, _ = request.getfixturevalue(which)
    (report,) = validate_gltf([out / "mesh.glb"])
    # Infos and hints too: bufferView.target (ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER) set on every
    # vertex view (and on none of the image's), the texture a power of two.
    assert (report["errors"], report["warnings"], report["infos"], report["hints"]) == (0, 0, 0, 0), report


@pytest.mark.blender
def test_blender_imports_every_format_upright_with_colours(exported, exported_textured, blender):
    for mesh, out, _ in (exported, exported_textured):
        for report in blender_import(blender, [out / "mesh.glb", out / "mesh.obj", out / "mesh.ply"]):
            size = np.array(report["max"]) - np.array(report["min"])
            # Blender is Z up like our world: the tall axis must come back as Z, the sizes unchanged.
            assert size == pytest.approx(mesh.bounds[1] - mesh.bounds[0], abs=0.02), report
            assert report["vertices"] >= len(np.unique(mesh.vertices, axis=0)) * 0.9
            if texture_of(mesh) is not None and not report["file"].endswith(".ply"):
                # The texture arrives as an sRGB image with its pixels, on a mesh with UVs.
                (image,) = report["images"]
                assert image["size"] == [256, 256] and image["colorspace"] == "sRGB" and image["std"] > 0.1, report
                assert report["uv_layers"] >= 1, report
            else:
                assert report["colors"] > 0 and report["color_std"] > 0.1, report


def test_each_writer_gets_the_mesh_in_the_up_axis_it_names(tmp_path, exported):
    mesh, _, _ = exported
    tall_axis = {}

    def writer(name: str, up_axis: str | None = None) -> Choice:
        def write(oriented, path):
            tall_axis[name] = "XYZ"[int(np.argmax(oriented.extents))]
            path.write_text("")
        if up_axis:
            write.up_axis = up_axis
        return Choice(kind="exporter", type=name, component=Component(name, lambda config: write))

    export_mesh(mesh, tmp_path, [writer("z", "Z"), writer("y", "Y"), writer("unsaid")])
    assert tall_axis == {"z": "Z", "y": "Y", "unsaid": "Z"}  # naming none: our world as it is
    assert mesh.extents.argmax() == 2  # the caller's mesh is left as it was
    with pytest.raises(Gen3DError, match="up_axis must be 'Y' or 'Z'"):
        export_mesh(mesh, tmp_path, [writer("x", "X")])


def test_unknown_format_lists_known_exporters():
    with pytest.raises(ConfigError, match="unknown exporter 'usdz'.*Known exporters: glb, obj, ply"):
        exporters("usdz")


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

    mesh = extract_mesh(Shell(), MeshSettings(resolution=96, level=30.0, colors="vertex"))
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert radii.min() > 0.55  # no inner surface at r ~ 0.57
    assert mesh.is_watertight  # the weak cap (peak 24 < level 30) is closed, not a hole
    plain = extract_mesh(Shell(), MeshSettings(resolution=96, level=30.0, fill_fraction=0.0, colors="vertex"))
    assert np.linalg.norm(plain.vertices, axis=1).min() < 0.58  # without filling: inner shell too


class SphereSDF:
    """A field with a surface of its own (an SDF: negative inside) and no density level to choose."""

    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])

    def surface(self, x):
        return x.norm(dim=-1) - 0.5

    def albedo(self, x):
        return torch.full((len(x), 3), 0.25)


def test_a_surface_field_exports_its_zero_set_without_a_level():
    mesh = extract_mesh(SphereSDF(), MeshSettings(resolution=64, colors="vertex"))
    assert np.linalg.norm(mesh.vertices, axis=1) == pytest.approx(0.5, abs=0.004)
    assert mesh.is_watertight and mesh.volume > 0  # outward normals: negative inside is inside
    assert np.allclose(mesh.visual.vertex_colors[:, :3], 64, atol=1)


def test_a_density_field_is_exported_through_its_signed_surface():
    from gen3d import DensitySurface

    surface = DensitySurface(RampBall(), level=50.0)
    assert float(surface.surface(torch.tensor([[0.0, 0.0, 0.0]]))) == pytest.approx(-50.0)  # inside: negative
    assert float(surface.surface(torch.tensor([[0.9, 0.0, 0.0]]))) == pytest.approx(50.0)
    with pytest.raises(ConfigError, match="export.level is not set"):
        extract_mesh(RampBall(), MeshSettings(resolution=32))
