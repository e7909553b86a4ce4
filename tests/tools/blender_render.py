"""Run inside Blender: render meshes unlit from a data set's cameras, as PNGs with alpha.

blender -b --factory-startup --python tests/tools/blender_render.py -- \
    --transforms DATA/transforms_test.json --views 0 4 8 --size 128 --out DIR FILE...

Each FILE is opened with Blender's default importer (what a user gets) and made to emit the
colour its imported material shows, through the material's own nodes: whatever feeds the
Principled BSDF's Base Color (an image texture with its UVs, or a colour attribute), else the
mesh's colour attribute (Blender's OBJ and PLY importers leave vertex colours unconnected). A
radiance field bakes its lighting into the colours, so unlit is how the export should look. The
view transform is "Standard", so an emitted linear value leaves as its sRGB encoding, and the
film is transparent, so alpha is the mesh's coverage. Writes DIR/<index>_<FILE's name>/r_<view>.png
and prints one GEN3D JSON line a file, with what fed its colour ("colors").
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bpy  # noqa: E402
from blender_import import IMPORTERS  # noqa: E402  (also sets numpy.bool for the glTF importer)
from mathutils import Matrix  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="blender_render.py")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--transforms", type=Path, required=True, help="NeRF-synthetic transforms_*.json")
    parser.add_argument("--views", type=int, nargs="+", required=True, help="frame indices to render")
    parser.add_argument("--size", type=int, required=True, help="image width and height in pixels")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel (anti-aliasing only)")
    return parser.parse_args(sys.argv[sys.argv.index("--") + 1:])


def base_color_source(material) -> "bpy.types.NodeSocket | None":
    """The output socket feeding the Base Color of the material's Principled BSDF, as the
    importer built it (an image texture, a colour attribute, a mix of them), or None."""
    if material is None or not material.use_nodes:
        return None
    for node in material.node_tree.nodes:
        if node.type == "BSDF_PRINCIPLED" and node.inputs["Base Color"].links:
            return node.inputs["Base Color"].links[0].from_socket
    return None


def emit(material, source) -> None:
    """Make ``material`` emit what ``source`` (a socket of its own node tree) gives, and nothing else."""
    nodes, links = material.node_tree.nodes, material.node_tree.links
    emission = nodes.new("ShaderNodeEmission")
    output = nodes.new("ShaderNodeOutputMaterial")
    links.new(source, emission.inputs["Color"])
    links.new(emission.outputs["Emission"], output.inputs["Surface"])
    for node in nodes:  # the new output is the one Cycles renders
        if node.type == "OUTPUT_MATERIAL":
            node.is_active_output = node == output


def color_source_name(source) -> str:
    """What feeds the colour, for the report: the image's name and size, or the node's type."""
    node = source.node
    while node.type != "TEX_IMAGE" and any(i.links for i in node.inputs):  # look through mix nodes
        node = next(i.links[0].from_node for i in node.inputs if i.links)
    if node.type == "TEX_IMAGE" and node.image is not None:
        return f"image {node.image.name} {node.image.size[0]}x{node.image.size[1]}"
    return node.type.lower()


def unlit(obj: bpy.types.Object) -> list[str]:
    """Make the object emit the colour its imported materials show: what feeds each one's Base
    Color (an image texture or the colour attribute, whichever the importer connected), else the
    mesh's colour attribute (Blender's OBJ and PLY importers leave vertex colours unconnected).
    Returns what feeds each material, for the report."""
    mesh = obj.data
    sources = [base_color_source(slot.material) for slot in obj.material_slots]
    if sources and all(sources):
        for slot, source in zip(obj.material_slots, sources):
            emit(slot.material, source)
        return [color_source_name(s) for s in sources]
    if not len(mesh.color_attributes):
        raise SystemExit(f"{obj.name}: the import has neither a material colour input nor a colour attribute")
    layer = (mesh.color_attributes.active_color or mesh.color_attributes[0]).name
    material = bpy.data.materials.new("unlit")
    material.use_nodes = True
    material.node_tree.nodes.clear()
    color = material.node_tree.nodes.new("ShaderNodeVertexColor")
    color.layer_name = layer
    emit(material, color.outputs["Color"])
    mesh.materials.clear()
    mesh.materials.append(material)
    return [f"attribute {layer}"]


def setup_scene(size: int, samples: int, camera_angle_x: float) -> bpy.types.Object:
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_adaptive_sampling = False
    scene.cycles.use_denoising = False
    scene.cycles.max_bounces = 0  # emission only: nothing to bounce
    scene.render.use_persistent_data = True  # one BVH for all the views
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True
    scene.render.dither_intensity = 0.0  # Blender dithers 8-bit output by default: noise we don't want
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.image_settings.color_depth = "8"
    scene.display_settings.display_device = "sRGB"
    # Filmic (the default) would tone-map: Standard is the plain sRGB encoding of linear values.
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.sensor_fit = "HORIZONTAL"
    camera.data.angle_x = camera_angle_x
    camera.data.clip_start, camera.data.clip_end = 0.01, 1000.0
    scene.collection.objects.link(camera)
    scene.camera = camera
    return camera


def render_file(index: int, path: Path, transforms: dict, args: argparse.Namespace) -> dict:
    """Import ``path`` into an empty scene, make it unlit and render it from each of ``args.views``."""
    began = time.perf_counter()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    IMPORTERS[path.suffix.lower()](str(path))
    objects = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    colors = [source for obj in objects for source in unlit(obj)]
    imported = time.perf_counter() - began
    camera = setup_scene(args.size, args.samples, float(transforms["camera_angle_x"]))
    frames = transforms["frames"]
    out = args.out / f"{index}_{path.name}"  # files of one name from several folders stay apart
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for view in args.views:
        # The data set's cameras are OpenGL's axes, as Blender's: the matrix goes in as it is.
        camera.matrix_world = Matrix(frames[view]["transform_matrix"])
        bpy.context.scene.render.filepath = str(out / f"r_{view}.png")
        bpy.ops.render.render(write_still=True)
        written.append(str(out / f"r_{view}.png"))
    return {"file": str(path), "objects": len(objects), "renders": written, "colors": colors,
            "import_seconds": round(imported, 2), "seconds": round(time.perf_counter() - began, 2)}


def main() -> None:
    args = parse_args()
    transforms = json.loads(args.transforms.read_text())
    if not 0 < float(transforms["camera_angle_x"]) < math.pi:
        raise SystemExit(f"{args.transforms}: camera_angle_x {transforms['camera_angle_x']} is not an angle in radians")
    for index, path in enumerate(args.files):
        print("GEN3D " + json.dumps(render_file(index, path, transforms, args)), flush=True)


main()
