"""Write gen3d's shipped analytic scene, ``assets/scene/``: a room with a few textured objects.

    python assets/make_scene.py --out assets/scene           # scene.json, mesh.ply, start.png
    python assets/make_scene.py --out assets/scene --check   # also compare rendered depth with the mesh

The scene is the inside of a box (floor, four walls, ceiling: closed, so a camera turning on the
spot always sees a wall) holding two boxes on the floor, a sphere on one of them, a sphere on the
floor and two cylinders, with checked and striped textures. ``scene.json`` describes it
completely (see :mod:`gen3d.scene.analytic`): the ``scene-teacher`` renders any camera from it
exactly, by ray-primitive intersection, with the same code as here. ``mesh.ply`` is its
ground truth for Chamfer distances (world coordinates, Z up, albedo vertex colours), built from
the same primitives as triangles; ``start.png`` is the start camera's view at 256 px, to look at.

Sizes are metres, roughly a small room: 4 x 4 x 2.6 m. The start camera stands at y = -1.3,
1.4 m up, looks along +y and 22 deg down, at 60 deg horizontal field of view: it sees the
objects 1.8 to 3.2 m away in front of the far wall (3.3 to 4.7 m away).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen3d.cameras import look_at
from gen3d.scene import AnalyticScene, PinholeConfig

CREAM, RED, BLUE, WHITE = [0.93, 0.89, 0.78], [0.78, 0.16, 0.14], [0.15, 0.3, 0.75], [0.95, 0.95, 0.95]
GREEN, YELLOW, PURPLE, ORANGE = [0.2, 0.6, 0.3], [0.95, 0.8, 0.2], [0.45, 0.25, 0.6], [0.95, 0.55, 0.15]


def checker(size: float, a, b) -> dict:
    return {"kind": "checker", "size": size, "colors": [a, b]}


def stripes(axis: int, size: float, a, b) -> dict:
    return {"kind": "stripes", "axis": axis, "size": size, "colors": [a, b]}


def layout() -> dict:
    eye = torch.tensor([0.0, -1.3, 1.4])
    pitch = math.radians(22.0)
    start = look_at(eye, eye + torch.tensor([0.0, math.cos(pitch), -math.sin(pitch)]))
    return {
        "room": {"min": [-2.0, -2.0, 0.0], "max": [2.0, 2.0, 2.6],
                 "floor": checker(0.4, [0.62, 0.45, 0.3], [0.8, 0.64, 0.46]),  # wooden-looking tiles
                 "walls": checker(0.5, [0.86, 0.82, 0.72], [0.7, 0.76, 0.82]),
                 "ceiling": {"kind": "solid", "colors": [[0.92, 0.92, 0.9]]}},
        "objects": [
            {"type": "box", "center": [-0.6, 0.9, 0.3], "half": [0.4, 0.3, 0.3], "yaw_deg": 20.0,
             "texture": checker(0.15, RED, CREAM)},
            {"type": "sphere", "center": [-0.6, 0.9, 0.8], "radius": 0.2, "texture": stripes(2, 0.08, BLUE, WHITE)},
            {"type": "cylinder", "base": [0.75, 0.9, 0.0], "radius": 0.22, "height": 0.9,
             "texture": stripes(0, 0.08, GREEN, YELLOW)},
            {"type": "box", "center": [0.15, 1.5, 0.18], "half": [0.18, 0.18, 0.18], "yaw_deg": -35.0,
             "texture": checker(0.12, PURPLE, ORANGE)},
            {"type": "sphere", "center": [0.1, 0.45, 0.15], "radius": 0.15, "texture": checker(0.1, ORANGE, WHITE)},
            # Behind the start camera, for trajectories that turn round (circle).
            {"type": "box", "center": [-1.2, -1.5, 0.4], "half": [0.5, 0.3, 0.4], "yaw_deg": 0.0,
             "texture": stripes(2, 0.1, BLUE, CREAM)},
            {"type": "cylinder", "base": [1.3, -1.3, 0.0], "radius": 0.3, "height": 1.6,
             "texture": checker(0.2, GREEN, WHITE)},
        ],
        "lighting": {"ambient": 0.45, "lights": [{"direction": [0.3, -0.5, 0.8], "intensity": 0.45},
                                                 {"direction": [-0.5, 0.4, -0.3], "intensity": 0.15}]},
        "camera": {"c2w": start.tolist(), "fov_deg": 60.0, "width": 512, "height": 512},
    }


def mesh_depth(mesh, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the nearest triangle along each ray (inf: none) and that triangle's index
    (-1: none), by Moller-Trumbore over all triangles. Written here because trimesh's ray casting
    needs rtree or embree, which gen3d does not depend on; a few hundred rays against the small
    mesh take well under a second."""
    tri = mesh.triangles  # [F, 3, 3]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    out, face = np.full(len(dirs), np.inf), np.full(len(dirs), -1)
    for i, (o, d) in enumerate(zip(origins, dirs)):
        p = np.cross(d, e2)
        det = (e1 * p).sum(-1)
        ok = np.abs(det) > 1e-12
        inv = np.where(ok, 1 / np.where(ok, det, 1), 0)
        s = o - tri[:, 0]
        u = (s * p).sum(-1) * inv
        q = np.cross(s, e1)
        v = (q * d).sum(-1) * inv
        t = (q * e2).sum(-1) * inv
        hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6)
        if hit.any():
            face[i] = np.flatnonzero(hit)[np.argmin(t[hit])]
            out[i] = t[face[i]]
    return out, face


def check(out: Path, pixels: int = 400, seed: int = 0) -> float:
    """Largest |rendered depth - mesh depth| (along the ray) at random pixels of the start view."""
    import trimesh

    scene, mesh = AnalyticScene.load(out), trimesh.load(out / "mesh.ply", process=False)
    camera = scene.start_camera(PinholeConfig(60.0, 128, 128))
    _, depth = scene.render(camera)
    idx = torch.randperm(128 * 128, generator=torch.Generator().manual_seed(seed))[:pixels]
    origins, dirs = camera.rays(torch.zeros_like(idx), (idx % 128).float() + 0.5, (idx // 128).float() + 0.5)
    rendered = depth.reshape(-1)[idx] / (dirs @ -camera.c2w[0, :3, 2])
    cast, _ = mesh_depth(mesh, origins.numpy().astype(float), dirs.numpy().astype(float))
    diff = np.abs(cast - rendered.numpy())
    error = float(diff.max())
    print(f"{out}: depth at {pixels} pixels, analytic vs. mesh: median {np.median(diff):.1e}, "
          f"99th percentile {np.quantile(diff, 0.99):.1e}, max {error:.1e} (scene size {scene.size:.2f})")
    return error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--check", action="store_true", help="compare rendered depth with a ray cast of mesh.ply")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    scene = AnalyticScene.from_dict(layout())
    (args.out / "scene.json").write_text(json.dumps({**scene.to_dict(), "generator": "assets/make_scene.py"}, indent=1))
    scene.mesh().export(args.out / "mesh.ply")
    rgb, _ = scene.render(scene.start_camera(PinholeConfig(60.0, 256, 256)), supersample=4)
    Image.fromarray((rgb.numpy() * 255 + 0.5).astype(np.uint8)).save(args.out / "start.png")
    print(f"{args.out}: scene.json, mesh.ply, start.png")
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
