"""Run inside Blender: import each file and report what Blender sees, as JSON lines.

blender -b --python tests/tools/blender_import.py -- FILE...
"""

import json
import sys

import numpy

numpy.bool = numpy.bool_  # Blender 3.4's glTF importer uses np.bool, gone from newer numpy

import bpy  # noqa: E402
from mathutils import Vector  # noqa: E402

# Each format through Blender's own importer at its default settings, as a user opens the file.
IMPORTERS = {
    ".glb": lambda path: bpy.ops.import_scene.gltf(filepath=path),
    ".gltf": lambda path: bpy.ops.import_scene.gltf(filepath=path),
    ".obj": lambda path: bpy.ops.wm.obj_import(filepath=path),
    ".ply": lambda path: bpy.ops.import_mesh.ply(filepath=path),
}


def color_values(mesh):
    """Per-vertex or per-corner colours Blender imported, as a flat list of RGB."""
    layers = list(getattr(mesh, "color_attributes", [])) or list(mesh.vertex_colors)
    if not layers:
        return []
    data = layers[0].data
    values = [0.0] * (len(data) * 4)
    data.foreach_get("color", values)
    return [values[i:i + 3] for i in range(0, len(values), 4)]


def images_of(objects) -> list[dict]:
    """The image textures the objects' materials use: name, size in pixels, colour space and the
    spread of its pixel values (0 for an image Blender could not read: a blank or missing file)."""
    found = {}
    for obj in objects:
        for slot in obj.material_slots:
            if slot.material is None or not slot.material.use_nodes:
                continue
            for node in slot.material.node_tree.nodes:
                if node.type == "TEX_IMAGE" and node.image is not None and node.image.name not in found:
                    image = node.image
                    pixels = numpy.zeros(len(image.pixels), dtype=numpy.float32)
                    if len(pixels):
                        image.pixels.foreach_get(pixels)
                    rgb = pixels.reshape(-1, 4)[:, :3]
                    found[image.name] = {"name": image.name, "size": list(image.size),
                                         "colorspace": image.colorspace_settings.name,
                                         "std": float(rgb.std(axis=0).mean()) if len(rgb) else 0.0}
    return list(found.values())


def report(path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    suffix = path[path.rfind("."):].lower()
    IMPORTERS[suffix](path)
    objects = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    lo, hi = Vector((1e9,) * 3), Vector((-1e9,) * 3)
    vertices, colors = 0, []
    for obj in objects:
        mesh = obj.data
        vertices += len(mesh.vertices)
        for v in mesh.vertices:
            w = obj.matrix_world @ v.co
            lo = Vector(map(min, lo, w))
            hi = Vector(map(max, hi, w))
        colors += color_values(mesh)
    spread = 0.0
    if colors:
        arr = numpy.asarray(colors)
        spread = float(arr.std(axis=0).mean())
    materials = sorted({slot.material.name for o in objects for slot in o.material_slots if slot.material})
    return {"file": path, "objects": len(objects), "vertices": vertices, "min": list(lo), "max": list(hi),
            "colors": len(colors), "color_std": spread, "materials": materials, "images": images_of(objects),
            "uv_layers": sum(len(o.data.uv_layers) for o in objects)}


if __name__ == "__main__":
    for f in sys.argv[sys.argv.index("--") + 1:]:
        print("GEN3D " + json.dumps(report(f)), flush=True)
