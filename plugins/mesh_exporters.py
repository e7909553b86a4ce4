"""Mesh exporters: ``glb`` (glTF 2.0 binary), ``obj`` (+ ``.mtl``), ``ply``, all with vertex colours.

Each receives a Y-up mesh and the path to write. GLB and PLY go through trimesh; OBJ is written
here because trimesh writes no material file for a vertex-coloured mesh, and Blender (3.4+)
reads the ``v x y z r g b`` vertex colours we write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from gen3d import hookimpl
from gen3d.specs import Component


def write_glb(mesh: trimesh.Trimesh, path: Path) -> None:
    path.write_bytes(trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh), include_normals=True))


def write_ply(mesh: trimesh.Trimesh, path: Path) -> None:
    path.write_bytes(trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=True))


def write_obj(mesh: trimesh.Trimesh, path: Path) -> None:
    material = path.with_suffix(".mtl")
    material.write_text("# gen3d: colours are per vertex (the v lines); this material is white so they show\n"
                        "newmtl gen3d_vertex_colors\nKd 1.000 1.000 1.000\nKa 0.000 0.000 0.000\n"
                        "Ks 0.000 0.000 0.000\nd 1.0\nillum 1\n")
    colors = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    normals = np.asarray(mesh.vertex_normals)
    faces = np.asarray(mesh.faces) + 1
    with open(path, "w") as f:
        f.write(f"# gen3d mesh: {len(mesh.vertices)} vertices, {len(faces)} faces, Y up\n")
        f.write(f"mtllib {material.name}\no gen3d\n")
        np.savetxt(f, np.hstack([mesh.vertices, colors]), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(f, normals, fmt="vn %.5f %.5f %.5f")
        f.write("usemtl gen3d_vertex_colors\ns 1\n")
        np.savetxt(f, np.repeat(faces, 2, axis=1), fmt="f %d//%d %d//%d %d//%d")


def _writer(function):
    return lambda config: function


@hookimpl
def gen3d_exporters():
    return [
        Component("glb", _writer(write_glb), None, "glTF 2.0 binary, Y up, vertex colours (COLOR_0)"),
        Component("obj", _writer(write_obj), None, "Wavefront OBJ + MTL, Y up, vertex colours"),
        Component("ply", _writer(write_ply), None, "binary PLY, Y up, vertex colours"),
    ]
