"""Render gen3d's shipped multi-view data sets, with their ground-truth meshes.

    python assets/make_dataset.py --object toy --out assets/toy      # the default data set
    python assets/make_dataset.py --object plain --out assets/plain  # an untextured object
    python assets/make_dataset.py --object toy --out /tmp/t --check  # also check cameras vs. mesh

The objects are analytic signed distance functions (SDFs), rendered by sphere tracing with
Lambertian shading, 3x3 supersampled so alpha is real pixel coverage. Output follows the
NeRF-synthetic convention: ``transforms_{train,val,test}.json`` (``camera_angle_x``,
camera-to-world ``transform_matrix`` in OpenGL axes), RGBA PNGs, world Z up. ``mesh.ply`` is the
SDF's zero level set by marching cubes (world coordinates, Z up, vertex colours) and
``scene.json`` the scene box. We render ourselves (no Blender needed) so that the data set can be
regenerated anywhere, deterministically, in about a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image
from skimage import measure

HALF = 1.1  # scene box half-size
LIGHT = torch.nn.functional.normalize(torch.tensor([0.4, -0.5, 0.8]), dim=0)
FILL = torch.nn.functional.normalize(torch.tensor([-0.5, 0.6, -0.3]), dim=0)


# --- SDF primitives (all Lipschitz <= 1, so sphere tracing never overshoots) -------------------


def sphere(p, c, r):
    return (p - torch.tensor(c)).norm(dim=-1) - r


def ellipsoid(p, c, radii):
    # (|q/r| - 1) * min(r) is a lower bound of the true distance: safe to trace, exact zero set.
    radii = torch.tensor(radii)
    return ((p - torch.tensor(c)) / radii).norm(dim=-1).sub(1) * radii.min()


def cylinder(p, c, r, half_height):
    q = p - torch.tensor(c)
    d = torch.stack([q[:, :2].norm(dim=-1) - r, q[:, 2].abs() - half_height], dim=-1)
    return d.clamp_min(0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0)


def torus(p, c, major, minor):
    q = p - torch.tensor(c)
    return torch.stack([q[:, :2].norm(dim=-1) - major, q[:, 2]], dim=-1).norm(dim=-1) - minor


def capsule(p, a, b, r):
    a, b = torch.tensor(a), torch.tensor(b)
    t = ((p - a) @ (b - a) / (b - a).dot(b - a)).clamp(0, 1)
    return (p - a - t[:, None] * (b - a)).norm(dim=-1) - r


def smooth_union(a, b, k):
    h = (0.5 + 0.5 * (b - a) / k).clamp(0, 1)
    return b * (1 - h) + a * h - k * h * (1 - h)


# --- the objects: sdf(p) -> distance, and albedo(p) -> RGB -------------------------------------


def toy_parts(p):
    """A rubber-duck-like toy on a round pedestal; returns (distance, part index)."""
    body = ellipsoid(p, (0.0, 0.0, -0.12), (0.55, 0.42, 0.36))
    head = sphere(p, (0.33, 0.0, 0.36), 0.25)
    tail = ellipsoid(p, (-0.5, 0.0, 0.06), (0.16, 0.12, 0.2))
    duck = smooth_union(smooth_union(body, head, 0.1), tail, 0.08)
    beak = ellipsoid(p, (0.6, 0.0, 0.31), (0.15, 0.1, 0.05))
    eyes = torch.minimum(sphere(p, (0.5, 0.13, 0.45), 0.05), sphere(p, (0.5, -0.13, 0.45), 0.05))
    base = cylinder(p, (0.0, 0.0, -0.6), 0.62, 0.08)
    rim = torus(p, (0.0, 0.0, -0.52), 0.6, 0.05)
    parts = torch.stack([duck, beak, eyes, base, rim], dim=-1)
    distance, part = parts.min(dim=-1)
    return distance, part


def toy_albedo(p, part):
    x, y, z = p.unbind(-1)
    yellow = torch.tensor([0.98, 0.8, 0.12])
    orange = torch.tensor([0.95, 0.42, 0.08])
    stripes = (torch.sin(z * 28) > 0.55).float()[:, None]  # orange bands round the body
    duck = yellow * (1 - stripes) + torch.tensor([0.9, 0.35, 0.1]) * stripes
    angle = torch.atan2(y, x)
    checker = ((torch.floor(angle / (math.pi / 8)) + torch.floor(p[:, :2].norm(dim=-1) / 0.2)) % 2)[:, None]
    base = torch.tensor([0.15, 0.35, 0.85]) * (1 - checker) + torch.tensor([0.92, 0.92, 0.95]) * checker
    colors = torch.stack([duck, orange.expand_as(duck), torch.tensor([0.05, 0.05, 0.08]).expand_as(duck),
                          base, torch.tensor([0.8, 0.1, 0.15]).expand_as(duck)], dim=1)
    return colors[torch.arange(len(p)), part]


def plain_parts(p):
    """A rabbit-like blob with ears: smooth unions make concave necks; one colour."""
    body = ellipsoid(p, (-0.1, 0.0, -0.25), (0.55, 0.45, 0.45))
    head = sphere(p, (0.35, 0.0, 0.25), 0.3)
    ears = torch.minimum(capsule(p, (0.3, 0.12, 0.45), (0.2, 0.22, 0.85), 0.07),
                         capsule(p, (0.3, -0.12, 0.45), (0.2, -0.22, 0.85), 0.07))
    tail = sphere(p, (-0.68, 0.0, -0.15), 0.13)
    feet = torch.minimum(ellipsoid(p, (0.25, 0.22, -0.66), (0.22, 0.1, 0.07)),
                         ellipsoid(p, (0.25, -0.22, -0.66), (0.22, 0.1, 0.07)))
    d = smooth_union(smooth_union(smooth_union(smooth_union(body, head, 0.12), ears, 0.06), tail, 0.05), feet, 0.08)
    return d, torch.zeros(len(p), dtype=torch.long)


def plain_albedo(p, part):
    return torch.tensor([0.72, 0.8, 0.9]).expand(len(p), 3)


OBJECTS = {"toy": (toy_parts, toy_albedo), "plain": (plain_parts, plain_albedo)}


# --- rendering ------------------------------------------------------------------------------


def look_at(eye: torch.Tensor) -> torch.Tensor:
    """Camera-to-world, OpenGL axes (x right, y up, looking down -z), world Z kept up."""
    forward = -eye / eye.norm()
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0])), dim=0)
    up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, eye
    return c2w


def camera_positions(n: int, seed: int, spiral: bool, distance: float = 4.0) -> list[torch.Tensor]:
    """Directions with elevation in [-20, 75] degrees: a Fibonacci spiral (train) or seeded random."""
    lo, hi = math.sin(math.radians(-20)), math.sin(math.radians(75))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if spiral:
            s = lo + (hi - lo) * (i + 0.5) / n
            azimuth = i * math.pi * (3 - math.sqrt(5)) + seed
        else:
            s, azimuth = rng.uniform(lo, hi), rng.uniform(0, 2 * math.pi)
        c = math.sqrt(1 - s * s)
        out.append(distance * torch.tensor([c * math.cos(azimuth), c * math.sin(azimuth), s]))
    return out


def normals(sdf, p, eps=1e-3):
    offsets = torch.eye(3) * eps
    grad = torch.stack([sdf(p + o)[0] - sdf(p - o)[0] for o in offsets], dim=-1)
    return torch.nn.functional.normalize(grad, dim=-1)


def render_view(parts, albedo, c2w, fov: float, size: int, supersample: int = 3) -> np.ndarray:
    n = size * supersample
    f = 0.5 * n / math.tan(0.5 * fov)
    v, u = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
    dirs = torch.stack([(u - n / 2) / f, -(v - n / 2) / f, -torch.ones_like(u)], dim=-1).reshape(-1, 3)
    dirs = torch.nn.functional.normalize(dirs @ c2w[:3, :3].T, dim=-1)
    origin = c2w[:3, 3]
    # March from where the ray enters the scene box.
    inv = 1 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-HALF - origin) * inv, (HALF - origin) * inv
    t = torch.minimum(t0, t1).amax(-1).clamp_min(0)
    t_far = torch.maximum(t0, t1).amin(-1)
    active = t < t_far
    hit = torch.zeros(len(dirs), dtype=torch.bool)
    for _ in range(160):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        d, _ = parts(origin + t[idx, None] * dirs[idx])
        t[idx] += d
        done = d < 2e-4
        hit[idx[done]] = True
        active[idx[done | (t[idx] > t_far[idx])]] = False
    rgba = torch.zeros(len(dirs), 4)
    idx = hit.nonzero().squeeze(1)
    p = origin + t[idx, None] * dirs[idx]
    nrm = normals(parts, p)
    _, part = parts(p)
    shade = 0.35 + 0.65 * (nrm @ LIGHT).clamp_min(0) + 0.15 * (nrm @ FILL).clamp_min(0)
    rgba[idx, :3] = (albedo(p, part) * shade[:, None]).clamp(0, 1)
    rgba[idx, 3] = 1
    # Box-downsample: alpha is coverage; colour is the mean over covered samples (straight alpha).
    rgba = rgba.reshape(size, supersample, size, supersample, 4)
    alpha = rgba[..., 3].mean(dim=(1, 3))
    rgb = rgba[..., :3].sum(dim=(1, 3)) / (rgba[..., 3].sum(dim=(1, 3))[..., None]).clamp_min(1)
    return (torch.cat([rgb, alpha[..., None]], dim=-1).numpy() * 255 + 0.5).astype(np.uint8)


def ground_truth_mesh(parts, albedo, resolution: int = 160) -> trimesh.Trimesh:
    axis = torch.linspace(-HALF, HALF, resolution)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    sdf = torch.cat([parts(chunk)[0] for chunk in grid.split(1 << 20)]).reshape((resolution,) * 3)
    spacing = 2 * HALF / (resolution - 1)
    verts, faces, _, _ = measure.marching_cubes(sdf.numpy(), 0.0, spacing=(spacing,) * 3)
    verts = verts - HALF
    # marching cubes orients faces towards increasing values (outside): flip to outward normals
    mesh = trimesh.Trimesh(verts, faces[:, ::-1], process=False)
    p = torch.as_tensor(verts, dtype=torch.float32)
    colors = albedo(p, parts(p)[1]).numpy()
    mesh.visual.vertex_colors = np.concatenate([(colors * 255 + 0.5).astype(np.uint8),
                                                np.full((len(verts), 1), 255, np.uint8)], axis=1)
    return mesh


def write_split(out: Path, split: str, eyes, parts, albedo, fov: float, size: int) -> None:
    (out / split).mkdir(parents=True, exist_ok=True)
    frames = []
    for i, eye in enumerate(eyes):
        c2w = look_at(eye)
        Image.fromarray(render_view(parts, albedo, c2w, fov, size), "RGBA").save(out / split / f"r_{i}.png", optimize=True)
        frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
    (out / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": fov, "frames": frames}, indent=1))


def check(out: Path, mesh: trimesh.Trimesh, split: str = "test") -> list[float]:
    """Project the ground-truth mesh with each view's camera; IoU with the image's alpha."""
    meta = json.loads((out / f"transforms_{split}.json").read_text())
    ious = []
    for frame in meta["frames"]:
        alpha = np.asarray(Image.open(out / f"{frame['file_path']}.png"))[..., 3] > 127
        h, w = alpha.shape
        f = 0.5 * w / math.tan(0.5 * meta["camera_angle_x"])
        w2c = np.linalg.inv(np.asarray(frame["transform_matrix"]))
        points, _ = trimesh.sample.sample_surface(mesh, 200_000, seed=0)
        cam = points @ w2c[:3, :3].T + w2c[:3, 3]
        u = (w / 2 + f * cam[:, 0] / -cam[:, 2]).astype(int)
        v = (h / 2 - f * cam[:, 1] / -cam[:, 2]).astype(int)
        ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
        splat = np.zeros_like(alpha)
        splat[v[ok], u[ok]] = True
        ious.append(float((splat & alpha).sum() / (splat | alpha).sum()))
    return ious


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--object", choices=sorted(OBJECTS), default="toy")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--fov", type=float, default=0.69)
    parser.add_argument("--check", action="store_true", help="print the silhouette IoU of mesh vs. images")
    args = parser.parse_args()
    torch.set_num_threads(2)
    began = time.perf_counter()
    parts, albedo = OBJECTS[args.object]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        write_split(out, "train", camera_positions(args.train, 0, spiral=True), parts, albedo, args.fov, args.size)
        write_split(out, "val", camera_positions(args.val, 1, spiral=False), parts, albedo, args.fov, args.size)
        write_split(out, "test", camera_positions(args.test, 2, spiral=False), parts, albedo, args.fov, args.size)
        mesh = ground_truth_mesh(parts, albedo)
    mesh.export(out / "mesh.ply")
    (out / "scene.json").write_text(json.dumps({"aabb": [-HALF] * 3 + [HALF] * 3, "object": args.object,
                                                "generator": "assets/make_dataset.py", "size": args.size}, indent=1))
    print(f"{out}: {args.train}/{args.val}/{args.test} views at {args.size}px, mesh {len(mesh.faces)} faces, "
          f"{time.perf_counter() - began:.1f}s")
    if args.check:
        ious = check(out, mesh)
        print(f"silhouette IoU (mesh vs. alpha): min {min(ious):.3f}, mean {np.mean(ious):.3f}")


if __name__ == "__main__":
    main()
