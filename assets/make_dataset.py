"""Render gen3d's shipped multi-view data sets, with their ground-truth meshes.

    python assets/make_dataset.py --object toy --out assets/toy      # the default data set
    python assets/make_dataset.py --object plain --out assets/plain  # an untextured object
    python assets/make_dataset.py --object toy --out /tmp/t --check  # also check cameras vs. mesh
    python assets/make_dataset.py --out assets/toy --check-only      # only check an existing folder

The objects are analytic signed distance functions (SDFs) rendered by sphere tracing with
view-independent Lambertian shading, 8x8 samples a pixel weighed by Blender Cycles' default pixel
filter (Blackman-Harris, Filter Size 1.5 px, a window spanning 3 px) in linear light, so the
images are filtered the way NeRF-synthetic data made by Blender are, and alpha is filtered coverage. ``--filter box``
gives plain area averages instead. Why 8x8: with 3x3 samples (box), coverage and the stripes'
edges came in ninths and the images sat only 42 dB from their own area average
(``benchmarks/edge_ceiling.py``), unpredictable noise eating more than half the error a 40 dB
target allows; 8x8 is 51 dB from 16x16.
Output follows the NeRF-synthetic convention: ``transforms_{train,val,test}.json`` holding
``camera_angle_x`` and camera-to-world ``transform_matrix`` in OpenGL camera axes (x right, y up,
looking down -z), straight-alpha RGBA PNGs, world Z up. ``mesh.ply`` is the SDF's zero level set
by marching cubes (world coordinates, Z up, vertex colours), ``scene.json`` the scene box.
Rendering ourselves (no Blender) keeps the data reproducible anywhere, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import trimesh
from PIL import Image
from skimage import measure

from gen3d.cameras import blackman_harris
from gen3d.colors import linear_to_srgb, srgb_to_linear

HALF = 1.1  # half-size of the scene box; the objects fit in [-1, 1]^3
DISTANCE = 4.0  # camera distance from the origin
ELEVATION = (-20.0, 75.0)  # camera elevation range, degrees
SUPERSAMPLE = 8  # samples per pixel side
FILTER_SIZE = 1.5  # pixel filter: Blackman-Harris as Blender's Cycles, at its default Filter Size
LIGHTS = [(torch.tensor([0.4, -0.5, 0.8]), 0.65), (torch.tensor([-0.5, 0.6, -0.4]), 0.15)]  # key, fill
AMBIENT = 0.35

Tensor = torch.Tensor
SDF = Callable[[Tensor], tuple[Tensor, Tensor]]  # points (N, 3) -> distance (N,), part index (N,)
Albedo = Callable[[Tensor, Tensor], Tensor]  # points, part index -> RGB in [0, 1], (N, 3)


# --- SDF primitives. Each is 1-Lipschitz and so are min, max and the polynomial smooth min (its
# gradient is a convex combination of its inputs' gradients), hence sphere tracing with full
# steps never passes through the surface.


def sphere(p: Tensor, c: tuple, r: float) -> Tensor:
    return (p - torch.tensor(c)).norm(dim=-1) - r


def ellipsoid(p: Tensor, c: tuple, radii: tuple) -> Tensor:
    # |q/r| has gradient norm <= 1/min(r), so (|q/r| - 1) * min(r) is 1-Lipschitz with the exact
    # zero set: a safe distance bound, unlike the common non-Lipschitz estimates. It is very
    # conservative far from flat ellipsoids, where the bounding sphere's distance is the better
    # bound; the max of the two is still 1-Lipschitz, <= the true distance, with the same zero set.
    q, r = p - torch.tensor(c), torch.tensor(radii)
    return torch.maximum(((q / r).norm(dim=-1) - 1) * r.min(), q.norm(dim=-1) - r.max())


def capsule(p: Tensor, a: tuple, b: tuple, r: float) -> Tensor:
    a_, ab = torch.tensor(a), torch.tensor(b) - torch.tensor(a)
    t = ((p - a_) @ ab / ab.dot(ab)).clamp(0, 1)
    return (p - a_ - t[:, None] * ab).norm(dim=-1) - r


def rounded_cylinder(p: Tensor, c: tuple, r: float, half_h: float, round_r: float) -> Tensor:
    """Vertical (Z axis) cylinder with edges rounded by round_r."""
    q = p - torch.tensor(c)
    d = torch.stack([q[:, :2].norm(dim=-1) - (r - round_r), q[:, 2].abs() - (half_h - round_r)], -1)
    return d.clamp_min(0).norm(dim=-1) + d.amax(-1).clamp_max(0) - round_r


def torus(p: Tensor, c: tuple, major: float, minor: float, axis: int = 2) -> Tensor:
    """Torus around the given world axis (2: lying flat, 1: standing in the xz plane)."""
    q = p - torch.tensor(c)
    plane = [i for i in range(3) if i != axis]
    return torch.stack([q[:, plane].norm(dim=-1) - major, q[:, axis]], -1).norm(dim=-1) - minor


def smooth_union(a: Tensor, b: Tensor, k: float) -> Tensor:
    h = (0.5 + 0.5 * (b - a) / k).clamp(0, 1)
    return b * (1 - h) + a * h - k * h * (1 - h)


def first_min(*parts: Tensor) -> tuple[Tensor, Tensor]:
    """Union of parts, keeping which part is nearest (for colouring)."""
    return torch.stack(parts, -1).min(-1)


# --- the objects ------------------------------------------------------------------------------
# toy: a striped rubber duck on a checkered pedestal. Parts: 0 body, 1 beak, 2 eyes, 3 pedestal,
# 4 rim. Feature sizes: 128 px span about 2.9 world units, so one pixel is ~0.023 units at the
# origin; stripes, eyes and checks are all >= ~0.08 (3-4 px) wide.


def toy_sdf(p: Tensor) -> tuple[Tensor, Tensor]:
    body = ellipsoid(p, (0.0, 0.0, -0.18), (0.6, 0.45, 0.38))
    head = sphere(p, (0.36, 0.0, 0.36), 0.27)
    tail = capsule(p, (-0.45, 0.0, -0.08), (-0.68, 0.0, 0.16), 0.1)
    wings = torch.minimum(ellipsoid(p, (-0.05, 0.4, -0.1), (0.3, 0.09, 0.16)),
                          ellipsoid(p, (-0.05, -0.4, -0.1), (0.3, 0.09, 0.16)))
    duck = smooth_union(smooth_union(smooth_union(body, head, 0.12), tail, 0.1), wings, 0.05)
    beak = ellipsoid(p, (0.66, 0.0, 0.32), (0.17, 0.11, 0.05))
    eyes = torch.minimum(sphere(p, (0.56, 0.13, 0.46), 0.05), sphere(p, (0.56, -0.13, 0.46), 0.05))
    pedestal = rounded_cylinder(p, (0.0, 0.0, -0.62), 0.7, 0.08, 0.02)
    rim = torus(p, (0.0, 0.0, -0.54), 0.68, 0.05)
    return first_min(duck, beak, eyes, pedestal, rim)


def toy_albedo(p: Tensor, part: Tensor) -> Tensor:
    x, y, z = p.unbind(-1)
    stripe = (torch.sin(z * 28.0) > 0.55).float()[:, None]  # orange bands, ~1/3 of each period
    body = torch.lerp(torch.tensor([0.98, 0.82, 0.15]), torch.tensor([0.92, 0.38, 0.1]), stripe)
    # pedestal checker: 16 angular sectors x rings on the top, x two rows on the side
    sector = torch.floor(torch.atan2(y, x) / (math.pi / 8))
    ring = torch.floor(p[:, :2].norm(dim=-1) / 0.2) + torch.floor((z + 0.7) / 0.08)
    check = ((sector + ring) % 2)[:, None]
    pedestal = torch.lerp(torch.tensor([0.15, 0.32, 0.85]), torch.tensor([0.93, 0.93, 0.95]), check)
    solid = torch.tensor([[0.0, 0, 0], [0.97, 0.45, 0.05], [0.06, 0.05, 0.08], [0, 0, 0], [0.82, 0.1, 0.15]])
    colour = solid[part]
    colour = torch.where((part == 0)[:, None], body, colour)
    return torch.where((part == 3)[:, None], pedestal, colour)


def plain_sdf(p: Tensor) -> tuple[Tensor, Tensor]:
    """A teapot-ish blob: flat-bottomed pot, lid and knob, a spout and a ring handle (a hole)."""
    pot = torch.maximum(ellipsoid(p, (0.0, 0.0, -0.2), (0.58, 0.58, 0.48)), -(p[:, 2] + 0.62))
    lid = smooth_union(ellipsoid(p, (0.0, 0.0, 0.24), (0.34, 0.34, 0.12)), sphere(p, (0.0, 0.0, 0.4), 0.08), 0.06)
    spout = capsule(p, (0.4, 0.0, -0.25), (0.82, 0.0, 0.18), 0.08)
    handle = torus(p, (-0.6, 0.0, -0.12), 0.25, 0.055, axis=1)
    d = smooth_union(smooth_union(smooth_union(pot, lid, 0.06), spout, 0.12), handle, 0.06)
    return d, torch.zeros(len(p), dtype=torch.long)


def plain_albedo(p: Tensor, part: Tensor) -> Tensor:
    return torch.tensor([0.74, 0.8, 0.9]).expand(len(p), 3)


OBJECTS: dict[str, tuple[SDF, Albedo]] = {"toy": (toy_sdf, toy_albedo), "plain": (plain_sdf, plain_albedo)}


# --- cameras ------------------------------------------------------------------------------------


def look_at(eye: np.ndarray) -> np.ndarray:
    """Camera-to-world matrix, OpenGL axes (x right, y up, looking down -z), world +Z as up."""
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, np.cross(right, forward), -forward, eye
    return c2w


def direction(sin_elev: float, azimuth: float) -> np.ndarray:
    c = math.sqrt(1 - sin_elev**2)
    return np.array([c * math.cos(azimuth), c * math.sin(azimuth), sin_elev])


def camera_directions(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """Train: a Fibonacci spiral over the elevation band (uniform sin(elevation) = uniform area),
    rotated by a seeded angle. Val/test: seeded uniform samples, rejected if within 3 degrees of
    any earlier camera so that no held-out view duplicates a training one."""
    lo, hi = (math.sin(math.radians(e)) for e in ELEVATION)
    spin = np.random.default_rng([seed, 0]).uniform(0, 2 * math.pi)
    golden = math.pi * (3 - math.sqrt(5))
    train = [direction(lo + (hi - lo) * (i + 0.5) / n_train, spin + i * golden) for i in range(n_train)]
    out, taken = {"train": np.array(train).reshape(-1, 3)}, list(train)
    for split_id, (split, n) in enumerate([("val", n_val), ("test", n_test)], start=1):
        rng, views = np.random.default_rng([seed, split_id]), []
        while len(views) < n:
            d = direction(rng.uniform(lo, hi), rng.uniform(0, 2 * math.pi))
            if not taken or max(float(d @ t) for t in taken) < math.cos(math.radians(3)):
                views.append(d)
                taken.append(d)
        out[split] = np.array(views).reshape(-1, 3)
    return out


# --- rendering ----------------------------------------------------------------------------------


def sample_rays(c2w: np.ndarray, fov: float, size: int, s: int, pad: int) -> tuple[Tensor, Tensor]:
    """Rays through an s x s grid of sample points in each pixel of a size x size image grown by
    pad pixels on every side (filters wider than a pixel reach into the neighbours); pinhole,
    principal point at the image centre."""
    f = 0.5 * size / math.tan(0.5 * fov)
    pos = -pad + (torch.arange((size + 2 * pad) * s) + 0.5) / s  # sample positions, pixels
    v, u = torch.meshgrid(pos, pos, indexing="ij")
    dirs = torch.stack([(u - size / 2) / f, -(v - size / 2) / f, -torch.ones_like(u)], -1).reshape(-1, 3)
    rot = torch.tensor(c2w[:3, :3], dtype=torch.float32)
    return torch.tensor(c2w[:3, 3], dtype=torch.float32), torch.nn.functional.normalize(dirs @ rot.T, dim=-1)


def filter_matrix(size: int, s: int, pad: int, kind: str) -> Tensor:
    """[size, (size + 2 pad) s]: each pixel's normalised weights over the sample positions of one
    image axis (the filters are separable, so an image is W @ samples @ W.T)."""
    pos = -pad + (torch.arange((size + 2 * pad) * s, dtype=torch.float64) + 0.5) / s
    x = pos[None, :] - (torch.arange(size, dtype=torch.float64)[:, None] + 0.5)  # offset from the pixel centre
    if kind == "box":
        w = (x.abs() < 0.5).double()
    else:  # Cycles' Blackman-Harris at Filter Size 1.5: the window spans 2 x 1.5 px
        w = blackman_harris(x, 2 * FILTER_SIZE)
    return (w / w.sum(1, keepdim=True)).float()


def sphere_trace(sdf: SDF, origin: Tensor, dirs: Tensor, steps: int = 128, eps: float = 3e-4) -> tuple[Tensor, Tensor]:
    """Distance along each ray to the surface, and whether it hit. Marching starts where the ray
    enters the scene box and stops where it leaves, so misses end quickly."""
    inv = 1 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-HALF - origin) * inv, (HALF - origin) * inv
    t, t_far = torch.minimum(t0, t1).amax(-1).clamp_min(0), torch.maximum(t0, t1).amin(-1)
    hit, last = torch.zeros(len(dirs), dtype=torch.bool), torch.full((len(dirs),), math.inf)
    active = (t < t_far).nonzero().squeeze(1)  # only rays still marching are evaluated
    for _ in range(steps):
        if len(active) == 0:
            break
        d = sdf(origin + t[active, None] * dirs[active])[0]
        t[active] += d
        last[active] = d
        done = d < eps
        hit[active[done]] = True
        active = active[~done & (t[active] < t_far[active])]
    hit[active[last[active] < 10 * eps]] = True  # grazing rays that ran out of steps
    return t, hit


def normals(sdf: SDF, p: Tensor, h: float = 1e-3) -> Tensor:
    grad = torch.stack([sdf(p + o)[0] - sdf(p - o)[0] for o in torch.eye(3) * h], -1)
    return torch.nn.functional.normalize(grad, dim=-1)


def render_view(sdf: SDF, albedo: Albedo, c2w: np.ndarray, fov: float, size: int, s: int = SUPERSAMPLE,
                pixel_filter: str = "blackman-harris") -> np.ndarray:
    """One straight-alpha RGBA uint8 image (size x size): s x s samples a pixel, weighed by the
    pixel filter ("box": the pixel's own samples, an area average)."""
    pad = 0 if pixel_filter == "box" else math.ceil(FILTER_SIZE)
    origin, dirs = sample_rays(c2w, fov, size, s, pad)
    t, hit = sphere_trace(sdf, origin, dirs)
    idx = hit.nonzero().squeeze(1)
    p = origin + t[idx, None] * dirs[idx]
    n = normals(sdf, p)
    shade = AMBIENT + sum(w * (n @ torch.nn.functional.normalize(l, dim=0)).clamp_min(0) for l, w in LIGHTS)
    samples = torch.zeros(len(dirs), 4)
    # The colours are sRGB values, as an image stores them; light adds up linearly, so a pixel
    # averages its samples' linear values (as Cycles does, and a camera's sensor) and is encoded
    # back to sRGB. Averaged as sRGB numbers instead, a colour edge comes out darker than in any
    # Blender render: 39.9 dB between the two on the toy's held-out views.
    samples[idx, :3] = srgb_to_linear((albedo(p, sdf(p)[1]) * shade[:, None]).clamp(0, 1))
    samples[idx, 3] = 1
    # Filter premultiplied colour and coverage, then un-premultiply (straight alpha), so that
    # edge pixels keep the object's colour instead of fading to the black background.
    side = (size + 2 * pad) * s
    weights = filter_matrix(size, s, pad, pixel_filter)
    filtered = torch.einsum("ik,klc,jl->ijc", weights, samples.reshape(side, side, 4), weights)
    alpha = filtered[..., 3:].clamp(0, 1)
    rgb = linear_to_srgb((filtered[..., :3] / alpha.clamp_min(1e-6)).clamp(0, 1))
    rgba = torch.cat([rgb.clamp(0, 1), alpha], -1)
    return (rgba.numpy() * 255 + 0.5).astype(np.uint8)


def ground_truth_mesh(sdf: SDF, albedo: Albedo, res: int) -> trimesh.Trimesh:
    axis = torch.linspace(-HALF, HALF, res)
    values = torch.empty(res**3)
    for i, x in enumerate(axis.split(16)):  # 16 x-slices at a time bounds the memory
        grid = torch.stack(torch.meshgrid(x, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        values[i * 16 * res * res : i * 16 * res * res + len(grid)] = sdf(grid)[0]
    spacing = 2 * HALF / (res - 1)
    verts, faces, _, _ = measure.marching_cubes(values.reshape(res, res, res).numpy(), 0.0, spacing=(spacing,) * 3)
    verts = (verts - HALF).astype(np.float32)  # index order is x, y, z: world coordinates as they are
    mesh = trimesh.Trimesh(verts, faces, process=False)
    if mesh.volume < 0:  # orient faces outwards whatever the marching-cubes winding convention
        mesh.invert()
    p = torch.from_numpy(verts)
    rgb = (albedo(p, sdf(p)[1]).numpy() * 255 + 0.5).astype(np.uint8)
    mesh.visual.vertex_colors = np.concatenate([rgb, np.full((len(verts), 1), 255, np.uint8)], 1)
    return mesh


def write_split(out: Path, split: str, dirs: np.ndarray, sdf: SDF, albedo: Albedo, fov: float, size: int,
                pixel_filter: str) -> None:
    (out / split).mkdir(parents=True, exist_ok=True)
    frames = []
    for i, d in enumerate(dirs):
        c2w = look_at(DISTANCE * d)
        Image.fromarray(render_view(sdf, albedo, c2w, fov, size, pixel_filter=pixel_filter), "RGBA").save(out / split / f"r_{i}.png")
        frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
    (out / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": fov, "frames": frames}, indent=1))


# --- checking -----------------------------------------------------------------------------------


def silhouette(mesh: trimesh.Trimesh, c2w: np.ndarray, fov: float, size: int, s: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage (size x size, in [0, 1]) of the projected mesh, from the transforms file's camera
    alone: u = cx + f x/(-z), v = cy - f y/(-z). Triangles are rasterised at the same s x s sample
    positions as the renderer by testing each sample centre in a triangle's bounding box."""
    n = size * s
    f = 0.5 * n / math.tan(0.5 * fov)
    cam = (mesh.vertices - c2w[:3, 3]) @ c2w[:3, :3]  # world -> camera (rotation transposed)
    uv = np.stack([n / 2 + f * cam[:, 0] / -cam[:, 2], n / 2 - f * cam[:, 1] / -cam[:, 2]], -1)[mesh.faces]
    lo = np.ceil(uv.min(1) - 0.5).astype(int)  # first sample index inside each bounding box
    span = np.floor(uv.max(1) - 0.5).astype(int) - lo + 1
    mask = np.zeros((n, n), bool)
    for dx in range(span[:, 0].max()):
        for dy in range(span[:, 1].max()):
            px, py = lo[:, 0] + dx, lo[:, 1] + dy
            c = np.stack([px, py], -1) + 0.5
            e, w = uv[:, [1, 2, 0]] - uv, c[:, None] - uv  # edge k runs from vertex k to k + 1
            edges = [e[:, k, 0] * w[:, k, 1] - e[:, k, 1] * w[:, k, 0] for k in range(3)]  # 2D cross
            inside = (np.all([e >= 0 for e in edges], 0) | np.all([e <= 0 for e in edges], 0))
            ok = inside & (dx < span[:, 0]) & (dy < span[:, 1]) & (px >= 0) & (px < n) & (py >= 0) & (py < n)
            mask[py[ok], px[ok]] = True
    return mask.reshape(size, s, size, s).mean(axis=(1, 3))


def check(out: Path) -> dict[str, list[float]]:
    """Silhouette IoU between the saved mesh projected by each saved camera and the image alpha."""
    mesh = trimesh.load(out / "mesh.ply", process=False)
    ious: dict[str, list[float]] = {}
    for split in ("train", "val", "test"):
        meta = json.loads((out / f"transforms_{split}.json").read_text())
        for frame in meta["frames"]:
            alpha = np.asarray(Image.open(out / f"{frame['file_path']}.png"))[..., 3] >= 128
            cover = silhouette(mesh, np.array(frame["transform_matrix"]), meta["camera_angle_x"], alpha.shape[0]) >= 0.5
            iou = float((cover & alpha).sum() / max((cover | alpha).sum(), 1))
            ious.setdefault(split, []).append(iou)
            print(f"{frame['file_path']}: IoU {iou:.4f}")
    for split, vals in ious.items():
        print(f"{split}: IoU min {min(vals):.4f} mean {np.mean(vals):.4f} over {len(vals)} views")
    return ious


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--object", choices=sorted(OBJECTS), default="toy")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128, help="image width and height in pixels")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="camera placement seed")
    parser.add_argument("--fov", type=float, default=0.69, help="camera_angle_x, radians")
    parser.add_argument("--filter", choices=["blackman-harris", "box"], default="blackman-harris",
                        help="pixel filter: Blender Cycles' default (Filter Size 1.5 px) or the pixel's area")
    parser.add_argument("--mesh-res", type=int, default=160, help="marching-cubes grid size (160: a ~2 MB mesh)")
    parser.add_argument("--check", action="store_true", help="print the silhouette IoU of mesh vs. alpha per view")
    parser.add_argument("--check-only", action="store_true", help="only check an existing folder")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not args.check_only:
        began = time.perf_counter()
        sdf, albedo = OBJECTS[args.object]
        args.out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            for split, dirs in camera_directions(args.train, args.val, args.test, args.seed).items():
                write_split(args.out, split, dirs, sdf, albedo, args.fov, args.size, args.filter)
            rendered = time.perf_counter()
            mesh = ground_truth_mesh(sdf, albedo, args.mesh_res)
        mesh.export(args.out / "mesh.ply")
        scene = {"aabb": [-HALF] * 3 + [HALF] * 3, "object": args.object,
                 "generator": "assets/make_dataset.py", "size": args.size,
                 "pixel_filter": args.filter}
        (args.out / "scene.json").write_text(json.dumps(scene, indent=1))
        print(f"{args.out}: {args.train}/{args.val}/{args.test} views at {args.size}px in {rendered - began:.1f}s, "
              f"mesh {len(mesh.vertices)} vertices in {time.perf_counter() - rendered:.1f}s")
    if args.check or args.check_only:
        check(args.out)


if __name__ == "__main__":
    main()
