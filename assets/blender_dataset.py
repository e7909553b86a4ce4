"""Render a NeRF-synthetic style data set with Blender (Cycles), as a new user's data would be.

    blender -b --python assets/blender_dataset.py -- --object suzanne --texture checker --out /tmp/monkey
    blender -b --python assets/blender_dataset.py -- --object path/to/mesh.ply --out /tmp/mine
    blender -b --python assets/blender_dataset.py -- --object torus-knot --texture none --size 64 --train 8 --test 2 --out /tmp/k

``make_dataset.py`` renders the shipped data sets with our own sphere tracer (reproducible
anywhere, bit for bit); this script is the check that the recipe holds on what people actually
bring: Blender renders with Blender's own pixel filter, shading and camera conventions. It writes
``transforms_{train,val,test}.json`` (``camera_angle_x``, camera-to-world ``transform_matrix``
taken straight from Blender's camera, whose axes are OpenGL's), RGBA PNGs with a transparent
film, and ``mesh.ply``: the rendered mesh in world coordinates (Z up) for Chamfer distances.
No ``scene.json``: the loader estimates the box from the cameras, as for anyone's data.

Objects: ``suzanne`` (Blender's monkey, subdivided), ``torus-knot``, ``spot`` (a sphere on a
rounded box), or a mesh file Blender imports (.ply, .obj, .glb/.gltf, .stl), scaled into the unit
sphere. Textures: ``checker`` (a procedural checkerboard on the object's own coordinates),
``noise`` (procedural colour noise), ``vertex`` (the mesh's vertex colours), ``none`` (one colour).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import bpy  # only inside Blender
from mathutils import Vector


def parse_args() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--object", default="suzanne")
    parser.add_argument("--texture", default="checker", choices=["checker", "noise", "vertex", "none"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--samples", type=int, default=128, help="Cycles samples per pixel")
    parser.add_argument("--distance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the camera positions")
    parser.add_argument("--noise-seed", type=int, default=0, help="Cycles' sampling seed")
    return parser.parse_args(argv)


def make_object(name: str) -> bpy.types.Object:
    if name == "suzanne":
        bpy.ops.mesh.primitive_monkey_add()
        obj = bpy.context.active_object
        obj.modifiers.new("subdivision", "SUBSURF").levels = 2
    elif name == "torus-knot":
        obj = torus_knot()
    elif name == "spot":
        bpy.ops.mesh.primitive_cube_add(size=1.2, location=(0, 0, -0.3))
        box = bpy.context.active_object
        bevel = box.modifiers.new("bevel", "BEVEL")
        bevel.width, bevel.segments = 0.15, 4
        bpy.ops.mesh.primitive_uv_sphere_add(radius=0.45, location=(0.1, 0.1, 0.55), segments=64, ring_count=32)
        ball = bpy.context.active_object
        union = box.modifiers.new("union", "BOOLEAN")  # one closed surface: no faces hidden inside
        union.operation, union.solver, union.object = "UNION", "EXACT", ball
        bpy.ops.object.select_all(action="DESELECT")
        box.select_set(True)
        bpy.context.view_layer.objects.active = box
        bpy.ops.object.convert(target="MESH")
        bpy.data.objects.remove(ball)
        obj = box
    else:
        obj = import_mesh(Path(name))
    bpy.ops.object.shade_smooth()
    bpy.ops.object.convert(target="MESH")  # apply modifiers: the ground truth is what is rendered
    normalise(obj)
    return obj


def torus_knot(p: int = 2, q: int = 3, points: int = 240) -> bpy.types.Object:
    """A (p, q) torus knot: a tube along a closed curve, as a mesh."""
    curve = bpy.data.curves.new("knot", "CURVE")
    curve.dimensions, curve.bevel_depth, curve.bevel_resolution = "3D", 0.3, 4
    spline = curve.splines.new("POLY")
    spline.points.add(points - 1)
    for i, point in enumerate(spline.points):
        t = 2 * math.pi * i / points
        r = 2 + math.cos(q * t)
        point.co = (r * math.cos(p * t), r * math.sin(p * t), -math.sin(q * t), 1)
    spline.use_cyclic_u = True
    obj = bpy.data.objects.new("knot", curve)
    bpy.context.scene.collection.objects.link(obj)
    bpy.context.view_layer.objects.active = obj
    obj.select_set(True)
    bpy.ops.object.convert(target="MESH")
    return bpy.context.active_object


def import_mesh(path: Path) -> bpy.types.Object:
    if not path.is_file():
        raise SystemExit(f"{path}: no such mesh file (or use suzanne, torus-knot, spot)")
    importers = {".ply": bpy.ops.import_mesh.ply, ".obj": bpy.ops.import_scene.obj,
                 ".glb": bpy.ops.import_scene.gltf, ".gltf": bpy.ops.import_scene.gltf, ".stl": bpy.ops.import_mesh.stl}
    if path.suffix.lower() not in importers:
        raise SystemExit(f"{path}: Blender imports {sorted(importers)}, not {path.suffix}")
    if path.suffix.lower() in (".glb", ".gltf"):
        import numpy
        numpy.bool = numpy.bool_  # Blender 3.4's glTF importer still calls np.bool
    importers[path.suffix.lower()](filepath=str(path))
    meshes = [o for o in bpy.context.selected_objects if o.type == "MESH"]
    bpy.context.view_layer.objects.active = meshes[0]
    if len(meshes) > 1:
        bpy.ops.object.join()
    return bpy.context.active_object


def normalise(obj: bpy.types.Object) -> None:
    """Centre the object on the origin and scale it into the unit sphere (as NeRF-synthetic's are)."""
    bpy.context.view_layer.objects.active = obj
    bpy.ops.object.transform_apply(location=True, rotation=True, scale=True)
    corners = [Vector(v.co) for v in obj.data.vertices]
    centre = sum(corners, Vector()) / len(corners)
    radius = max((v - centre).length for v in corners)
    for v in obj.data.vertices:
        v.co = (v.co - centre) / radius


def make_material(obj: bpy.types.Object, texture: str) -> None:
    mat = bpy.data.materials.new("surface")
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    bsdf = nodes["Principled BSDF"]
    bsdf.inputs["Roughness"].default_value = 0.6
    if texture == "checker":
        tex = nodes.new("ShaderNodeTexChecker")
        tex.inputs["Scale"].default_value = 4.0
        tex.inputs["Color1"].default_value = (0.85, 0.25, 0.1, 1)
        tex.inputs["Color2"].default_value = (0.95, 0.85, 0.6, 1)
        links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    elif texture == "noise":
        tex = nodes.new("ShaderNodeTexNoise")
        tex.inputs["Scale"].default_value = 3.0
        links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    elif texture == "vertex":
        tex = nodes.new("ShaderNodeVertexColor")
        links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    else:
        bsdf.inputs["Base Color"].default_value = (0.6, 0.62, 0.7, 1)
    obj.data.materials.clear()
    obj.data.materials.append(mat)


def setup_scene(size: int, samples: int, seed: int) -> None:
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False  # not every Blender build ships OpenImageDenoise
    scene.cycles.seed = seed
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True  # alpha is coverage, background composited by the loader
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.view_settings.view_transform = "Standard"
    world = bpy.data.worlds.new("world") if scene.world is None else scene.world
    scene.world = world
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.6
    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
    sun.data.energy = 3.0
    sun.rotation_euler = (math.radians(40), math.radians(10), math.radians(30))
    scene.collection.objects.link(sun)
    cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    cam.data.sensor_width, cam.data.lens = 36.0, 50.0  # camera_angle_x 0.69, NeRF-synthetic's
    scene.collection.objects.link(cam)
    scene.camera = cam


def place_camera(cam: bpy.types.Object, rng: random.Random, distance: float) -> None:
    """A random camera on the upper part of a sphere, looking at the origin."""
    azimuth = rng.uniform(0, 2 * math.pi)
    elevation = math.asin(rng.uniform(math.sin(math.radians(-15)), math.sin(math.radians(80))))
    cam.location = (distance * math.cos(elevation) * math.cos(azimuth),
                    distance * math.cos(elevation) * math.sin(azimuth), distance * math.sin(elevation))
    cam.rotation_euler = (-Vector(cam.location)).to_track_quat("-Z", "Y").to_euler()
    bpy.context.view_layer.update()


def render_split(split: str, count: int, out: Path, rng: random.Random, distance: float) -> None:
    scene = bpy.context.scene
    frames = []
    for i in range(count):
        place_camera(scene.camera, rng, distance)
        scene.render.filepath = str(out / split / f"r_{i}.png")
        bpy.ops.render.render(write_still=True)
        frames.append({"file_path": f"./{split}/r_{i}",
                       "transform_matrix": [list(row) for row in scene.camera.matrix_world]})
    camera_angle_x = scene.camera.data.angle_x
    (out / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": camera_angle_x, "frames": frames},
                                                             indent=1))


def write_ply(obj: bpy.types.Object, path: Path) -> None:
    """The rendered mesh in world coordinates (Z up), as an ASCII PLY."""
    mesh = obj.data
    mesh.calc_loop_triangles()
    verts = [obj.matrix_world @ v.co for v in mesh.vertices]
    tris = [t.vertices for t in mesh.loop_triangles]
    lines = ["ply", "format ascii 1.0", f"element vertex {len(verts)}", "property float x", "property float y",
             "property float z", f"element face {len(tris)}", "property list uchar int vertex_indices", "end_header"]
    lines += [f"{v.x:.6f} {v.y:.6f} {v.z:.6f}" for v in verts]
    lines += [f"3 {a} {b} {c}" for a, b, c in tris]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    obj = make_object(args.object)
    make_material(obj, args.texture)
    setup_scene(args.size, args.samples, args.noise_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_ply(obj, args.out / "mesh.ply")
    rng = random.Random(args.seed)
    for split, count in (("train", args.train), ("val", args.val), ("test", args.test)):
        render_split(split, count, args.out, rng, args.distance)
    print(f"wrote {args.train}/{args.val}/{args.test} views of {args.object} to {args.out}")


if __name__ == "__main__":
    main()
