"""Mesh exporters: ``glb`` (glTF 2.0 binary), ``obj`` (+ ``.mtl``, + ``.png``), ``ply``.

A mesh comes with vertex colours, and with a baked texture when ``export.colors`` is
``texture`` (``gen3d.texture_of(mesh)``: per-vertex UVs, v down, and an sRGB image). Each format
is written the way its readers take it, checked by opening the files in Blender 3.4 with its
default importers (tests/test_export_fidelity.py renders them against held-out images):

- ``glb``: Y up, as glTF specifies. Textured: ``TEXCOORD_0`` and the PNG embedded as the
  material's ``baseColorTexture`` (sRGB by the specification, so the image's own values), and
  no ``COLOR_0`` (it would multiply the texture). Otherwise ``COLOR_0``, linear as glTF specifies.
- ``obj``: Y up, the common convention: Blender's OBJ importer turns Y up into Z up by default.
  Textured: ``vt`` lines (v up, OBJ's convention: 1 - v), ``f v/vt/vn`` and ``map_Kd mesh.png``
  (written beside it) in a white material. Otherwise sRGB colours on the ``v x y z r g b`` lines
  (Blender reads them as sRGB).
- ``ply``: Z up, our world's: Blender's PLY importer takes the file as it is. Vertex colours,
  sRGB, always: PLY has no standard texture, and Blender's PLY importer reads none.

A writer names the up axis it wants its mesh in (``@gen3d.up_axis``);
:func:`gen3d.export.export_mesh` hands it the mesh turned that way. The colour space of each
format comes from :func:`gen3d.colors.color_space`, the one table every exporter uses.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from gen3d import Component, encode_colors, hookimpl, texture_of, up_axis


def format_colors(mesh: trimesh.Trimesh, fmt: str) -> np.ndarray:
    """The mesh's vertex colours (sRGB bytes) as [N, 4] floats in 0..1, RGB in ``fmt``'s colour space."""
    rgba = np.asarray(mesh.visual.vertex_colors, dtype=np.float64) / 255.0
    rgba[:, :3] = encode_colors(rgba[:, :3], fmt)
    return rgba


def png_bytes(image: np.ndarray) -> bytes:
    """An sRGB [H, W, 3] uint8 image as PNG bytes (stored as they are: PNG's own space is sRGB)."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def merged_vertices(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, index)``: one vertex per position, ``keep`` the first of each (in order) and
    ``index`` each vertex's new index. A texture atlas splits vertices along its seams (the
    copies are exact); formats that index positions on their own need the split only in UVs."""
    _, first, inverse = np.unique(np.asarray(mesh.vertices), axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.reshape(-1)]


@up_axis("Y")
def write_glb(mesh: trimesh.Trimesh, path: Path) -> None:
    path.write_bytes(glb_bytes(mesh))


@up_axis("Z")
def write_ply(mesh: trimesh.Trimesh, path: Path) -> None:
    colors = (format_colors(mesh, "ply") * 255 + 0.5).astype(np.uint8)
    vertices, faces, normals = np.asarray(mesh.vertices), np.asarray(mesh.faces), np.asarray(mesh.vertex_normals)
    if texture_of(mesh) is not None:  # PLY gets vertex colours only: the atlas' seams need not split it
        keep, index = merged_vertices(mesh)
        vertices, faces, normals, colors = vertices[keep], index[faces], normals[keep], colors[keep]
    out = trimesh.Trimesh(vertices, faces, vertex_normals=normals, vertex_colors=colors, process=False)
    path.write_bytes(trimesh.exchange.ply.export_ply(out, encoding="binary", vertex_normal=True))


@up_axis("Y")
def write_obj(mesh: trimesh.Trimesh, path: Path) -> None:
    texture = texture_of(mesh)
    if texture is None:
        write_obj_vertex_colors(mesh, path)
        return
    image = path.with_suffix(".png")
    image.write_bytes(png_bytes(texture.image))
    material = path.with_suffix(".mtl")
    material.write_text("# gen3d: the colour is the texture; Kd is white so it shows as it is\n"
                        "newmtl gen3d_texture\nKd 1.000 1.000 1.000\nKa 0.000 0.000 0.000\n"
                        f"Ks 0.000 0.000 0.000\nd 1.0\nillum 1\nmap_Kd {image.name}\n")
    keep, index = merged_vertices(mesh)
    faces = np.asarray(mesh.faces)
    corners = np.stack([index[faces] + 1, faces + 1, index[faces] + 1], axis=2).reshape(-1, 9)  # v/vt/vn
    uv = np.asarray(texture.uv, dtype=np.float64)
    with open(path, "w") as f:
        f.write(f"# gen3d mesh: {len(keep)} vertices, {len(faces)} faces, Y up, colours in {image.name}\n")
        f.write(f"mtllib {material.name}\no gen3d\n")
        np.savetxt(f, np.asarray(mesh.vertices)[keep], fmt="v %.6f %.6f %.6f")
        np.savetxt(f, np.stack([uv[:, 0], 1 - uv[:, 1]], axis=1), fmt="vt %.6f %.6f")  # OBJ's v points up
        np.savetxt(f, np.asarray(mesh.vertex_normals)[keep], fmt="vn %.5f %.5f %.5f")
        f.write("usemtl gen3d_texture\ns 1\n")
        np.savetxt(f, corners, fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")


def write_obj_vertex_colors(mesh: trimesh.Trimesh, path: Path) -> None:
    material = path.with_suffix(".mtl")
    material.write_text("# gen3d: colours are per vertex (the v lines); this material is white so they show\n"
                        "newmtl gen3d_vertex_colors\nKd 1.000 1.000 1.000\nKa 0.000 0.000 0.000\n"
                        "Ks 0.000 0.000 0.000\nd 1.0\nillum 1\n")
    colors = format_colors(mesh, "obj")[:, :3]
    normals = np.asarray(mesh.vertex_normals)
    faces = np.asarray(mesh.faces) + 1
    with open(path, "w") as f:
        f.write(f"# gen3d mesh: {len(mesh.vertices)} vertices, {len(faces)} faces, Y up, sRGB vertex colours\n")
        f.write(f"mtllib {material.name}\no gen3d\n")
        np.savetxt(f, np.hstack([mesh.vertices, colors]), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(f, normals, fmt="vn %.5f %.5f %.5f")
        f.write("usemtl gen3d_vertex_colors\ns 1\n")
        np.savetxt(f, np.repeat(faces, 2, axis=1), fmt="f %d//%d %d//%d %d//%d")


# --- GLB ---------------------------------------------------------------------------------------
# Written here rather than by trimesh, which stores COLOR_0 in 8 bits (linear values in 8 bits
# leave the darks coarse: sRGB errors up to 6/255) and leaves bufferView.target unset (which the
# Khronos validator reports).
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UNSIGNED_SHORT, UNSIGNED_INT = 5126, 5123, 5125
TRIANGLES = 4
LINEAR, LINEAR_MIPMAP_LINEAR, CLAMP_TO_EDGE = 9729, 9987, 33071


def glb_bytes(mesh: trimesh.Trimesh) -> bytes:
    """One mesh as a glTF 2.0 binary: positions, unit normals, 16- or 32-bit indices and a matte
    material; its colour either the baked texture (float TEXCOORD_0, the PNG embedded as
    baseColorTexture) or linear 16-bit COLOR_0 (which multiplies the white base colour)."""
    texture = texture_of(mesh)
    positions = np.asarray(mesh.vertices, dtype="<f4")
    gltf: dict = {"asset": {"version": "2.0", "generator": "gen3d"}, "accessors": [], "bufferViews": []}
    binary = bytearray()

    def view(data: bytes, target: int | None) -> int:
        gltf["bufferViews"].append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(data),
                                    **({"target": target} if target else {})})
        binary.extend(data + b"\0" * (-len(data) % 4))  # each view starts 4-byte aligned
        return len(gltf["bufferViews"]) - 1

    def add(data: np.ndarray, component: int, kind: str, target: int, **extra) -> int:
        gltf["accessors"].append({"bufferView": view(data.tobytes(), target), "componentType": component,
                                  "count": len(data), "type": kind, **extra})
        return len(gltf["accessors"]) - 1

    attributes = {
        "POSITION": add(positions, FLOAT, "VEC3", ARRAY_BUFFER,
                        min=positions.min(0).tolist(), max=positions.max(0).tolist()),
        "NORMAL": add(unit_normals(mesh), FLOAT, "VEC3", ARRAY_BUFFER),
    }
    material: dict = {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}
    if texture is None:
        colors = np.round(format_colors(mesh, "glb") * 65535).astype("<u2")
        attributes["COLOR_0"] = add(colors, UNSIGNED_SHORT, "VEC4", ARRAY_BUFFER, normalized=True)
    else:
        # Floats, not the 16-bit normalized integers glTF also allows: readers such as trimesh take
        # those as raw integers, and floats cost only 4 bytes a vertex more.
        uv = np.asarray(texture.uv, dtype="<f4")
        attributes["TEXCOORD_0"] = add(uv, FLOAT, "VEC2", ARRAY_BUFFER)
        gltf.update(images=[{"bufferView": view(png_bytes(texture.image), None), "mimeType": "image/png"}],
                    # Trilinear minification: a far-away asset averages its texture instead of shimmering.
                    samplers=[{"magFilter": LINEAR, "minFilter": LINEAR_MIPMAP_LINEAR,
                               "wrapS": CLAMP_TO_EDGE, "wrapT": CLAMP_TO_EDGE}],
                    textures=[{"sampler": 0, "source": 0}])
        material["baseColorTexture"] = {"index": 0, "texCoord": 0}
    # 65535 is the primitive-restart index, which glTF forbids in a 16-bit index buffer.
    small = len(positions) < 65535
    faces = np.asarray(mesh.faces, dtype="<u2" if small else "<u4").reshape(-1)
    indices = add(faces, UNSIGNED_SHORT if small else UNSIGNED_INT, "SCALAR", ELEMENT_ARRAY_BUFFER)
    gltf.update(
        buffers=[{"byteLength": len(binary)}],
        materials=[{"name": "gen3d_texture" if texture is not None else "gen3d_vertex_colors",
                    "pbrMetallicRoughness": material}],
        meshes=[{"name": "gen3d", "primitives": [{"attributes": attributes, "indices": indices, "material": 0,
                                                  "mode": TRIANGLES}]}],
        nodes=[{"name": "gen3d", "mesh": 0}], scenes=[{"nodes": [0]}], scene=0)
    return glb_container(json.dumps(gltf, separators=(",", ":")).encode(), bytes(binary))


def unit_normals(mesh: trimesh.Trimesh) -> np.ndarray:
    """Vertex normals of unit length, as glTF requires (a vertex of only degenerate faces gets +Y)."""
    normals = np.asarray(mesh.vertex_normals, dtype=np.float64)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 1e-8, normals / np.maximum(length, 1e-8), [0.0, 1.0, 0.0])
    return normals.astype("<f4")


def glb_container(content: bytes, binary: bytes) -> bytes:
    """The GLB framing: a 12-byte header, then a JSON chunk (space-padded) and a BIN chunk (zero-padded)."""
    content += b" " * (-len(content) % 4)
    binary += b"\0" * (-len(binary) % 4)
    chunks = (struct.pack("<II", len(content), 0x4E4F534A) + content
              + struct.pack("<II", len(binary), 0x004E4942) + binary)
    return struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks


def _writer(function):
    return lambda config: function


@hookimpl
def gen3d_exporters():
    return [
        Component("glb", _writer(write_glb), None,
                  "glTF 2.0 binary, Y up, baked baseColorTexture (sRGB) or linear vertex colours (COLOR_0)"),
        Component("obj", _writer(write_obj), None,
                  "Wavefront OBJ + MTL, Y up, map_Kd PNG texture or sRGB vertex colours"),
        Component("ply", _writer(write_ply), None, "binary PLY, Z up, sRGB vertex colours (no texture)"),
    ]
