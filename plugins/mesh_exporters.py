"""Mesh exporters: ``glb`` (glTF 2.0 binary), ``obj`` (+ ``.mtl``), ``ply``, all with vertex colours.

Each format is written the way its readers take it, checked by opening the files in Blender 3.4
with its default importers (tests/test_export_fidelity.py renders them against held-out images):

- ``glb``: Y up, as glTF specifies; ``COLOR_0`` linear, as glTF specifies.
- ``obj``: Y up, the common convention: Blender's OBJ importer turns Y up into Z up by default.
  Colours sRGB, on the ``v x y z r g b`` lines (Blender reads them as sRGB).
- ``ply``: Z up, our world's: Blender's PLY importer takes the file as it is. Colours sRGB.

A writer names the up axis it wants its mesh in (``@gen3d.up_axis``);
:func:`gen3d.export.export_mesh` hands it the mesh turned that way. The colour space of each
format comes from :func:`gen3d.colors.color_space`, the one table every exporter uses.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import trimesh

from gen3d import Component, encode_colors, hookimpl, up_axis


def format_colors(mesh: trimesh.Trimesh, fmt: str) -> np.ndarray:
    """The mesh's vertex colours (sRGB bytes) as [N, 4] floats in 0..1, RGB in ``fmt``'s colour space."""
    rgba = np.asarray(mesh.visual.vertex_colors, dtype=np.float64) / 255.0
    rgba[:, :3] = encode_colors(rgba[:, :3], fmt)
    return rgba


@up_axis("Y")
def write_glb(mesh: trimesh.Trimesh, path: Path) -> None:
    path.write_bytes(glb_bytes(mesh))


@up_axis("Z")
def write_ply(mesh: trimesh.Trimesh, path: Path) -> None:
    colors = (format_colors(mesh, "ply") * 255 + 0.5).astype(np.uint8)
    out = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_normals=mesh.vertex_normals, vertex_colors=colors,
                          process=False)
    path.write_bytes(trimesh.exchange.ply.export_ply(out, encoding="binary", vertex_normal=True))


@up_axis("Y")
def write_obj(mesh: trimesh.Trimesh, path: Path) -> None:
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


def glb_bytes(mesh: trimesh.Trimesh) -> bytes:
    """One mesh as a glTF 2.0 binary: positions, unit normals, linear 16-bit COLOR_0, uint32 indices,
    and a matte white material (COLOR_0 multiplies its base colour)."""
    positions = np.asarray(mesh.vertices, dtype="<f4")
    colors = np.round(format_colors(mesh, "glb") * 65535).astype("<u2")
    gltf: dict = {"asset": {"version": "2.0", "generator": "gen3d"}, "accessors": [], "bufferViews": []}
    binary = bytearray()

    def add(data: np.ndarray, component: int, kind: str, target: int, **extra) -> int:
        gltf["bufferViews"].append({"buffer": 0, "byteOffset": len(binary), "byteLength": data.nbytes,
                                    "target": target})
        binary.extend(data.tobytes())  # every element here is a multiple of 4 bytes: views stay aligned
        gltf["accessors"].append({"bufferView": len(gltf["bufferViews"]) - 1, "componentType": component,
                                  "count": len(data), "type": kind, **extra})
        return len(gltf["accessors"]) - 1

    attributes = {
        "POSITION": add(positions, FLOAT, "VEC3", ARRAY_BUFFER,
                        min=positions.min(0).tolist(), max=positions.max(0).tolist()),
        "NORMAL": add(unit_normals(mesh), FLOAT, "VEC3", ARRAY_BUFFER),
        "COLOR_0": add(colors, UNSIGNED_SHORT, "VEC4", ARRAY_BUFFER, normalized=True),
    }
    indices = add(np.asarray(mesh.faces, dtype="<u4").reshape(-1), UNSIGNED_INT, "SCALAR", ELEMENT_ARRAY_BUFFER)
    gltf.update(
        buffers=[{"byteLength": len(binary)}],
        materials=[{"name": "gen3d_vertex_colors", "pbrMetallicRoughness": {
            "baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}}],
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
        Component("glb", _writer(write_glb), None, "glTF 2.0 binary, Y up, linear vertex colours (COLOR_0)"),
        Component("obj", _writer(write_obj), None, "Wavefront OBJ + MTL, Y up, sRGB vertex colours"),
        Component("ply", _writer(write_ply), None, "binary PLY, Z up, sRGB vertex colours"),
    ]
