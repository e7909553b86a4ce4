"""Baked textures: the atlas, the bake, the padding at seams, and the UVs as each file stores them."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from gen3d import finish_mesh, texture_of
from gen3d.config import Choice
from gen3d.errors import Gen3DError
from gen3d.export import Z_UP_TO_Y_UP, MeshSettings, export_mesh
from gen3d.specs import Component
from gen3d.texture import TEXTURE_KEY, MeshTexture, covered_texels, rasterize


def smooth_colors(points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """A colour that varies over the surface, in 0.1..0.9 (never the black of empty texels)."""
    return 0.5 + 0.4 * torch.stack([torch.sin(3 * points[:, 0]), torch.cos(2 * points[:, 1]), points[:, 2]], dim=1)


def sphere(subdivisions: int = 3) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.8)


def sample(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a uint8 image at UVs (0..1, v down, texel centres at (i + 0.5) / size), as 0..1
    floats: what a GPU's LINEAR filter reads, clamped to the edge."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip(uv[:, 1] * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float64) / 255
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def surface_samples(mesh: trimesh.Trimesh, uv: np.ndarray, count: int = 4000, seed: int = 0):
    """Random points inside random faces: their 3D positions and their UVs."""
    rng = np.random.default_rng(seed)
    faces = rng.integers(0, len(mesh.faces), count)
    bary = rng.dirichlet([1, 1, 1], count)
    corners = mesh.faces[faces]
    points = np.einsum("kc,kcd->kd", bary, mesh.vertices[corners])
    return points, np.einsum("kc,kcd->kd", bary, uv[corners])


@pytest.fixture(scope="module")
def textured():
    return finish_mesh(sphere(), smooth_colors, MeshSettings(target_faces=100_000, texture_size=256))


def truth_at(points: np.ndarray) -> np.ndarray:
    p = torch.as_tensor(points, dtype=torch.float32)
    return smooth_colors(p, p).numpy()


def test_texture_read_through_the_uvs_is_the_colour_of_the_surface(textured):
    texture = texture_of(textured)
    assert texture.image.shape == (256, 256, 3) and len(texture.uv) == len(textured.vertices)
    points, uv = surface_samples(textured, texture.uv)
    error = np.abs(sample(texture.image, uv) - truth_at(points))
    # Linear interpolation of 8-bit texels (rounding: up to 0.002) of a smoothly varying colour.
    assert error.mean() < 0.002 and error.max() < 0.01, (error.mean(), error.max())
    # Vertex colours are kept too, on the split vertices.
    assert np.abs(textured.visual.vertex_colors[:, :3] / 255 - truth_at(textured.vertices)).max() < 0.003


def mip(image: np.ndarray, levels: int) -> np.ndarray:
    """The image ``levels`` mipmap levels down (box filter), upsampled back to its size."""
    small = image.astype(np.float64)
    for _ in range(levels):
        small = 0.25 * (small[0::2, 0::2] + small[1::2, 0::2] + small[0::2, 1::2] + small[1::2, 1::2])
    return np.repeat(np.repeat(small, 2 ** levels, axis=0), 2 ** levels, axis=1).round().astype(np.uint8)


def test_padding_keeps_mipmaps_free_of_the_empty_space_between_charts(textured, monkeypatch):
    texture = texture_of(textured)
    points, uv = surface_samples(textured, texture.uv)
    padded = np.abs(sample(mip(texture.image, 3), uv) - truth_at(points)).mean(axis=1)
    # The same bake without padding: black between the charts bleeds in at chart edges.
    import gen3d.texture

    monkeypatch.setattr(gen3d.texture, "pad_charts", lambda image, filled: image * filled[..., None])
    bare = finish_mesh(sphere(), smooth_colors, MeshSettings(target_faces=100_000, texture_size=256))
    bare_texture = texture_of(bare)
    bare_points, bare_uv = surface_samples(bare, bare_texture.uv)
    unpadded = np.abs(sample(mip(bare_texture.image, 3), bare_uv) - truth_at(bare_points)).mean(axis=1)
    assert np.percentile(padded, 99) < 0.05, np.percentile(padded, 99)  # 8 texels averaged: the colour blurs, no more
    assert np.percentile(unpadded, 99) > 3 * np.percentile(padded, 99)


def test_the_atlas_splits_vertices_only_at_seams_and_they_keep_colour_and_normal(textured):
    original = sphere()
    _, first, inverse = np.unique(textured.vertices, axis=0, return_index=True, return_inverse=True)
    assert len(first) == len(original.vertices)  # copies only: every position of the sphere once
    inverse = inverse.reshape(-1)
    for attribute in (textured.visual.vertex_colors, np.asarray(textured.vertex_normals)):
        assert np.array_equal(attribute, attribute[first][inverse])  # every copy as its first
    # Normals of the whole surface, not of one side of a seam: a sphere's are its radii.
    radial = textured.vertices / np.linalg.norm(textured.vertices, axis=1, keepdims=True)
    assert np.einsum("kd,kd->k", np.asarray(textured.vertex_normals), radial).min() > 0.99


def test_target_faces_decimates_before_unwrapping():
    fine = sphere(subdivisions=5)  # 20480 faces
    mesh = finish_mesh(fine, smooth_colors, MeshSettings(target_faces=2000, texture_size=128))
    assert 1800 <= len(mesh.faces) <= 2000
    assert np.linalg.norm(mesh.vertices, axis=1) == pytest.approx(0.8, abs=0.01)  # still the sphere
    assert texture_of(mesh).image.shape == (128, 128, 3)
    untouched = finish_mesh(sphere(subdivisions=5), smooth_colors, MeshSettings(target_faces=30_000, colors="vertex"))
    assert len(untouched.faces) == 20480 and texture_of(untouched) is None  # under the target: kept


def test_every_texel_of_a_triangle_is_found_once():
    # Two triangles sharing the diagonal of the square [2, 6]^2 (texel units): the 4x4 texels
    # whose centres lie inside, each once, and around them every texel whose centre is within
    # EDGE_REACH (2.25) of one of those: two rings, less the corner texel at each corner.
    uv_px = np.array([[2.0, 2.0], [6.0, 2.0], [6.0, 6.0], [2.0, 6.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    texel, face, bary = rasterize(uv_px, faces, 10, 10)
    assert len(texel) == len(set(texel.tolist())) == 8 * 8 - 4
    x, y = texel % 10, texel // 10
    assert x.min() == 0 and x.max() == 7 and y.min() == 0 and y.max() == 7
    inside = (x >= 2) & (x <= 5) & (y >= 2) & (y <= 5)
    assert inside.sum() == 16
    np.testing.assert_allclose(bary.sum(1), 1)
    assert (bary >= 0).all()  # points on the triangles
    nearest = np.einsum("kc,kcd->kd", bary, uv_px[faces[face]])
    centre = np.stack([x, y], 1) + 0.5
    np.testing.assert_allclose(nearest[inside], centre[inside])  # inside: the centre itself
    # Outside: a point on the edge of the square, about as near as the square's nearest point
    # (the triangle of the nearest covered texel may be the other one, across the diagonal).
    on_edge = np.isclose(nearest[~inside], 2).any(1) | np.isclose(nearest[~inside], 6).any(1)
    assert on_edge.all()
    gap = np.linalg.norm(nearest - centre, axis=1) - np.linalg.norm(np.clip(centre, 2, 6) - centre, axis=1)
    assert gap[~inside].max() < 0.6


def test_texels_found_in_chunks_are_those_found_at_once():
    # Big textures (2048 px and up) overflow one chunk of candidates; every chunk after the first
    # must still place its candidates in their own triangle's box (a 2048 px bake was noise).
    rng = np.random.default_rng(0)
    uv_px = rng.uniform(0, 64, size=(300, 2))
    faces = rng.integers(0, 300, size=(200, 3))
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    whole = covered_texels(uv_px[faces], 64, 64, budget=1 << 30)
    chunked = covered_texels(uv_px[faces], 64, 64, budget=500)
    assert len(whole[0]) > 1000
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


def test_copies_and_turns_keep_the_texture_and_the_normals(textured, tmp_path):
    seen = {}

    def write(oriented, path):
        seen["mesh"] = oriented
        path.write_text("")

    write.up_axis = "Y"
    probe = Choice(kind="exporter", type="probe", component=Component("probe", lambda config: write))
    export_mesh(textured, tmp_path, [probe])
    oriented = seen["mesh"]
    assert np.array_equal(texture_of(oriented).uv, texture_of(textured).uv)
    turned = np.asarray(textured.vertex_normals) @ Z_UP_TO_Y_UP[:3, :3].T
    np.testing.assert_allclose(np.asarray(oriented.vertex_normals), turned, atol=1e-6)
    assert texture_of(textured) is not None  # the caller's mesh keeps its own


# --- UVs in the files: glTF's v points down, OBJ's up --------------------------------------------
QUADRANTS = {"top-left": (230, 20, 20), "top-right": (20, 230, 20), "bottom-left": (20, 20, 230),
             "bottom-right": (230, 230, 230)}


def quadrant_mesh() -> trimesh.Trimesh:
    """A square of two triangles whose corners sit at the centres of the four quadrants of an
    image with one colour in each: vertex k should show QUADRANTS' k-th colour."""
    vertices = np.array([[0.0, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 1]])  # x right, z up
    mesh = trimesh.Trimesh(vertices, [[0, 1, 3], [0, 3, 2]], process=False)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:32, :32], image[:32, 32:] = QUADRANTS["top-left"], QUADRANTS["top-right"]
    image[32:, :32], image[32:, 32:] = QUADRANTS["bottom-left"], QUADRANTS["bottom-right"]
    # v down: (0.25, 0.25) is the top-left quadrant. Vertex 2 (z = 1, the top) is top-left.
    uv = np.array([[0.25, 0.75], [0.75, 0.75], [0.25, 0.25], [0.75, 0.25]], dtype=np.float32)
    mesh.visual.vertex_colors = np.full((4, 4), 255, dtype=np.uint8)
    mesh.metadata[TEXTURE_KEY] = MeshTexture(uv=uv, image=image)
    return mesh


EXPECTED = {(0, 0): "bottom-left", (1, 0): "bottom-right", (0, 1): "top-left", (1, 1): "top-right"}  # (x, z)


def glb_parts(path):
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 12)
    gltf = json.loads(data[20:20 + length])
    return gltf, data[28 + length:]


def test_glb_uvs_point_v_down_and_the_texture_is_embedded_as_base_colour(tmp_path):
    from test_export import exporters

    export_mesh(quadrant_mesh(), tmp_path, exporters("glb"))
    gltf, binary = glb_parts(tmp_path / "mesh.glb")
    primitive = gltf["meshes"][0]["primitives"][0]
    assert "COLOR_0" not in primitive["attributes"]  # it would multiply the texture
    material = gltf["materials"][primitive["material"]]["pbrMetallicRoughness"]
    image_info = gltf["images"][gltf["textures"][material["baseColorTexture"]["index"]]["source"]]
    assert image_info["mimeType"] == "image/png"
    view = gltf["bufferViews"][image_info["bufferView"]]
    image = np.asarray(Image.open(io.BytesIO(binary[view["byteOffset"]:view["byteOffset"] + view["byteLength"]])))

    def attribute(name):
        accessor = gltf["accessors"][primitive["attributes"][name]]
        v = gltf["bufferViews"][accessor["bufferView"]]
        dtype, width = {5126: "<f4", 5123: "<u2"}[accessor["componentType"]], {"VEC2": 2, "VEC3": 3}[accessor["type"]]
        values = np.frombuffer(binary, dtype, accessor["count"] * width, v["byteOffset"]).reshape(-1, width)
        return values / 65535 if accessor.get("normalized") else values

    positions, uv = attribute("POSITION"), attribute("TEXCOORD_0")
    for (x, z), quadrant in EXPECTED.items():
        k = int(np.argmin(np.linalg.norm(positions - [x, z, 0], axis=1)))  # glTF is Y up: world z is y
        assert tuple(sample(image, uv[k:k + 1])[0] * 255 + 0.5) == pytest.approx(QUADRANTS[quadrant], abs=1), quadrant


def test_obj_uvs_point_v_up_and_the_material_maps_the_png(tmp_path):
    from test_export import exporters

    files = export_mesh(quadrant_mesh(), tmp_path, exporters("obj"))
    assert sorted(p.name for p in files) == ["mesh.mtl", "mesh.obj", "mesh.png"]
    mtl = (tmp_path / "mesh.mtl").read_text()
    assert "map_Kd mesh.png" in mtl and "Kd 1.000 1.000 1.000" in mtl
    lines = (tmp_path / "mesh.obj").read_text().splitlines()
    v = np.array([line.split()[1:] for line in lines if line.startswith("v ")], dtype=float)
    vt = np.array([line.split()[1:] for line in lines if line.startswith("vt ")], dtype=float)
    image = np.asarray(Image.open(tmp_path / "mesh.png"))
    for line in (line for line in lines if line.startswith("f ")):
        for corner in line.split()[1:]:
            iv, ivt, _ = (int(i) - 1 for i in corner.split("/"))
            x, z = round(v[iv, 0]), round(v[iv, 1])  # OBJ is Y up too
            # OBJ's v points up: the image row is (1 - v) of the height.
            uv_down = np.array([[vt[ivt, 0], 1 - vt[ivt, 1]]])
            assert tuple(sample(image, uv_down)[0] * 255 + 0.5) == pytest.approx(QUADRANTS[EXPECTED[(x, z)]], abs=1)
    # trimesh reads OBJ UVs the OBJ way and images top row first: the same colours.
    loaded = trimesh.load(tmp_path / "mesh.obj", process=False)
    colors = loaded.visual.to_color().vertex_colors[:, :3]
    for k, (x, _, z) in enumerate(np.asarray(loaded.vertices) @ Z_UP_TO_Y_UP[:3, :3]):
        assert tuple(colors[k]) == pytest.approx(QUADRANTS[EXPECTED[(round(x), round(z))]], abs=2)


def test_ply_has_vertex_colours_and_no_seam_copies(textured, tmp_path):
    from test_export import exporters

    export_mesh(textured, tmp_path, exporters("ply"))
    ply = trimesh.load(tmp_path / "mesh.ply", process=False)
    assert len(ply.vertices) == len(sphere().vertices) and len(ply.faces) == len(textured.faces)
    assert ply.is_watertight  # merged seams: one closed surface again
    assert np.abs(ply.visual.vertex_colors[:, :3] / 255 - truth_at(ply.vertices)).max() < 0.003


def test_settings_are_checked():
    with pytest.raises(ValueError, match="colors must be one of texture, vertex"):
        MeshSettings(colors="uv")
    with pytest.raises(ValueError, match="texture_size must be a power of two"):
        MeshSettings(texture_size=1000)
    with pytest.raises(ValueError, match="target_faces must be at least 16"):
        MeshSettings(target_faces=3)
    with pytest.raises(ValueError, match="target_faces must be at most 200000 with colors: texture"):
        MeshSettings(target_faces=300_000)
    assert MeshSettings(target_faces=300_000, colors="vertex").target_faces == 300_000


def test_a_mesh_too_big_to_unwrap_is_a_clear_error(monkeypatch):
    import gen3d.export

    settings = MeshSettings(target_faces=5000, texture_size=64)
    monkeypatch.setattr(gen3d.export, "MAX_TEXTURED_FACES", 1000)  # the sphere's 1280 faces stand for a big mesh
    with pytest.raises(Gen3DError, match="textured export of 1280 faces.*set export.target_faces"):
        finish_mesh(sphere(), smooth_colors, settings)


def test_keeping_every_face_with_a_texture_is_refused_before_any_work():
    with pytest.raises(ValueError, match="target_faces: null keeps every face.*colors: vertex"):
        MeshSettings(target_faces=None)
    assert MeshSettings(target_faces=None, colors="vertex").target_faces is None


def test_a_crash_of_xatlas_is_a_clear_error_not_the_end_of_the_process(monkeypatch):
    # xatlas segfaults on some meshes (an 82 k-face icosphere here); it runs in a child process,
    # so the run gets a one-line error instead of dying. The crash is simulated: which meshes
    # crash it may change with its version.
    import gen3d.texture as texture

    monkeypatch.setattr(texture, "UNWRAP_SCRIPT", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    mesh = sphere(subdivisions=2)
    with pytest.raises(Gen3DError, match=r"xatlas could not unwrap the mesh \(320 faces\).*crashed.*target_faces"):
        texture.unwrap(np.asarray(mesh.vertices), np.asarray(mesh.faces), 256)
