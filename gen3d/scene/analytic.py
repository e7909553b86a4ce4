"""An analytic scene: a room (the inside of a box) with boxes, spheres and cylinders in it.

What ``scene.json`` describes (``assets/scene/`` is one, written by ``assets/make_scene.py``),
rendered exactly: every pixel's ray is intersected with every primitive in closed form
(vectorised over the rays), so depth is exact, not a sphere tracer's approximation, and any
camera inside the room can be rendered in well under a second at 512 px on a CPU. It is the
``scene-teacher``'s world, and its ground truth: :meth:`AnalyticScene.mesh` builds the same
primitives as a triangle mesh (``mesh.ply``, world Z up).

Shading is Lambertian under fixed directional lights plus an ambient term, with no shadows and
no view-dependent term: every view of a point has the same colour, as the radiance fields the
scene recipes fit assume of a view-independent scene. Textures are procedural in each
primitive's own frame (a box's checks turn with it): ``checker`` (cubes of ``size``),
``stripes`` (slabs of ``size`` across ``axis``) or ``solid``; colours are sRGB in 0..1.

scene.json::

    {"room": {"min": [x, y, z], "max": [x, y, z], "floor": TEXTURE, "walls": TEXTURE, "ceiling": TEXTURE},
     "objects": [{"type": "box", "center": [x, y, z], "half": [hx, hy, hz], "yaw_deg": a, "texture": TEXTURE},
                 {"type": "sphere", "center": [x, y, z], "radius": r, "texture": TEXTURE},
                 {"type": "cylinder", "base": [x, y, z], "radius": r, "height": h, "texture": TEXTURE}],
     "lighting": {"ambient": a, "lights": [{"direction": [x, y, z], "intensity": i}]},
     "camera": {"c2w": 4x4, "fov_deg": 60, "width": 512, "height": 512}}

``camera`` is the start camera (OpenGL axes, camera-to-world). ``aabb`` is the room's box.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen3d.cameras import Cameras
from gen3d.errors import DataError

from .pinhole import PinholeConfig, pinhole, single
from .trajectory import check_pose

Tensor = torch.Tensor
EPS = 1e-5  # hits nearer than this along a ray are the ray's own start
TEXTURE_INSET = 1e-4  # textures are read this far inside the surface: a face on a check boundary gets one colour


# --- textures ------------------------------------------------------------------------------------


def texture(spec: dict, q: Tensor) -> Tensor:
    """Albedo [N, 3] of ``spec`` at local points ``q`` [N, 3]."""
    colors = torch.tensor(spec["colors"], dtype=torch.float32)
    if spec["kind"] == "solid":
        return colors[0].expand(len(q), 3)
    if spec["kind"] == "checker":
        cell = torch.floor(q / spec["size"]).sum(-1)
    else:  # stripes
        cell = torch.floor(q[:, spec["axis"]] / spec["size"])
    return colors[(cell.long() % 2)]


def check_texture(spec: Any, where: str) -> dict:
    if not isinstance(spec, dict) or spec.get("kind") not in ("solid", "checker", "stripes"):
        raise DataError(f"{where}: a texture is {{'kind': 'solid' | 'checker' | 'stripes', 'colors': [...], ...}}")
    colors = np.asarray(spec.get("colors", []), dtype=float)
    need = 1 if spec["kind"] == "solid" else 2
    if colors.ndim != 2 or colors.shape[1] != 3 or len(colors) < need or not ((colors >= 0) & (colors <= 1)).all():
        raise DataError(f"{where}.colors: {need} RGB colours in 0..1 needed")
    if spec["kind"] != "solid" and not float(spec.get("size", 0)) > 0:
        raise DataError(f"{where}.size: must be > 0")
    if spec["kind"] == "stripes" and spec.get("axis") not in (0, 1, 2):
        raise DataError(f"{where}.axis: 0, 1 or 2 (x, y or z of the primitive's frame)")
    return spec


# --- intersections: each returns ray distance t (inf: miss), unit normal [N, 3], local point [N, 3]


def _safe(d: Tensor) -> Tensor:
    return torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)


def _slabs(o: Tensor, d: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    inv = 1 / _safe(d)
    t0, t1 = (lo - o) * inv, (hi - o) * inv
    near, far = torch.minimum(t0, t1), torch.maximum(t0, t1)
    return near.amax(-1), near.argmax(-1), far.amin(-1), far.argmin(-1)


def _axis_normal(d: Tensor, axis: Tensor) -> Tensor:
    """The face normal on ``axis`` that faces the ray (entering a box, or leaving it seen from inside)."""
    n = torch.zeros_like(d)
    n.scatter_(1, axis[:, None], -torch.sign(d.gather(1, axis[:, None])))
    return n


def _rot_z(yaw_deg: float) -> Tensor:
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def hit_room(room: dict, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lo, hi = torch.tensor(room["min"]), torch.tensor(room["max"])
    near, _, far, axis = _slabs(o, d, lo, hi)
    t = torch.where((far > EPS) & (near <= far), far, torch.full_like(far, math.inf))
    return t, _axis_normal(d, axis), o + t.clamp_max(1e9)[:, None] * d


def hit_box(box: dict, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rot, half = _rot_z(box.get("yaw_deg", 0.0)), torch.tensor(box["half"])
    lo_, d_ = (o - torch.tensor(box["center"])) @ rot, d @ rot  # world -> box frame (rotation transposed)
    near, axis, far, _ = _slabs(lo_, d_, -half, half)
    t = torch.where((near > EPS) & (near <= far), near, torch.full_like(near, math.inf))
    return t, _axis_normal(d_, axis) @ rot.T, lo_ + t.clamp_max(1e9)[:, None] * d_


def hit_sphere(sphere: dict, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    c, r = torch.tensor(sphere["center"]), float(sphere["radius"])
    oc = o - c
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - r * r)
    t = -b - disc.clamp_min(0).sqrt()
    t = torch.where((disc >= 0) & (t > EPS), t, torch.full_like(t, math.inf))
    local = oc + t.clamp_max(1e9)[:, None] * d
    return t, local / r, local


def hit_cylinder(cyl: dict, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A vertical cylinder standing on ``base`` (its bottom centre), with flat caps; seen from outside."""
    base, r, h = torch.tensor(cyl["base"]), float(cyl["radius"]), float(cyl["height"])
    q = o - base
    a = (d[:, :2] ** 2).sum(-1)
    b = (q[:, :2] * d[:, :2]).sum(-1)
    disc = b * b - a * ((q[:, :2] ** 2).sum(-1) - r * r)
    t_side = (-b - disc.clamp_min(0).sqrt()) / a.clamp_min(1e-12)
    z_side = q[:, 2] + t_side * d[:, 2]
    inf = torch.full_like(t_side, math.inf)
    t_side = torch.where((disc >= 0) & (a > 1e-12) & (t_side > EPS) & (z_side >= 0) & (z_side <= h), t_side, inf)
    dz = _safe(d[:, 2])
    caps = []
    for height, sign in ((h, 1.0), (0.0, -1.0)):
        t_cap = (height - q[:, 2]) / dz
        xy = q[:, :2] + t_cap[:, None] * d[:, :2]
        facing = d[:, 2] * sign < 0  # the cap's outside faces the ray
        caps.append(torch.where(facing & (t_cap > EPS) & ((xy ** 2).sum(-1) <= r * r), t_cap, inf))
    t = torch.minimum(t_side, torch.minimum(*caps))
    local = q + t.clamp_max(1e9)[:, None] * d
    side_normal = torch.cat([local[:, :2] / r, torch.zeros_like(local[:, :1])], -1)
    cap_normal = torch.zeros_like(local)
    cap_normal[:, 2] = torch.where(caps[0] <= caps[1], 1.0, -1.0)
    normal = torch.where((t == t_side)[:, None], side_normal, cap_normal)
    return t, normal, local


HITS = {"box": hit_box, "sphere": hit_sphere, "cylinder": hit_cylinder}
# Each primitive's settings: a point or size (3 numbers) or a positive number (0); yaw_deg is optional.
SHAPE_KEYS = {"box": {"center": 3, "half": 3}, "sphere": {"center": 3, "radius": 0},
              "cylinder": {"base": 3, "radius": 0, "height": 0}}


# --- the scene -----------------------------------------------------------------------------------


@dataclass
class AnalyticScene:
    room: dict
    objects: list[dict]
    lighting: dict
    camera: dict  # the start camera: c2w, fov_deg, width, height

    @classmethod
    def load(cls, path: str | Path) -> AnalyticScene:
        """From a ``scene.json`` (or the folder holding one); one line naming the file and key if malformed."""
        path = Path(path)
        path = path / "scene.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise DataError(f"{path}: cannot read the scene ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "scene") -> AnalyticScene:
        for key in ("room", "objects", "lighting", "camera"):
            if key not in data:
                raise DataError(f"{where}: {key}: missing (an analytic scene needs room, objects, lighting, camera)")
        room = data["room"]
        lo, hi = np.asarray(room.get("min", []), float), np.asarray(room.get("max", []), float)
        if lo.shape != (3,) or hi.shape != (3,) or not (hi > lo).all():
            raise DataError(f"{where}: room: min and max are [x, y, z] corners with max > min")
        for face in ("floor", "walls", "ceiling"):
            check_texture(room.get(face), f"{where}: room.{face}")
        for i, obj in enumerate(data["objects"]):
            if not isinstance(obj, dict) or obj.get("type") not in HITS:
                kind = obj.get("type") if isinstance(obj, dict) else obj
                raise DataError(f"{where}: objects[{i}].type: one of {', '.join(HITS)}; got {kind!r}")
            for key, length in SHAPE_KEYS[obj["type"]].items():
                value = np.asarray(obj.get(key, np.nan), dtype=float)
                if value.shape != ((length,) if length else ()) or not np.isfinite(value).all() or (
                        not length and value <= 0) or (key == "half" and (value <= 0).any()):
                    what = "[x, y, z]" if length else "a positive number"
                    raise DataError(f"{where}: objects[{i}].{key}: {what} needed, got {obj.get(key)!r}")
            check_texture(obj.get("texture"), f"{where}: objects[{i}].texture")
        lights = data["lighting"].get("lights", []) if isinstance(data["lighting"], dict) else None
        if lights is None or not all(isinstance(l, dict) and np.shape(l.get("direction")) == (3,)
                                     and isinstance(l.get("intensity"), (int, float)) for l in lights):
            raise DataError(f"{where}: lighting: {{'ambient': a, 'lights': [{{'direction': [x, y, z], "
                            "'intensity': i}}, ...]}} needed")
        camera = data["camera"]
        check_pose(camera.get("c2w"), f"{where}: camera.c2w")
        PinholeConfig(camera.get("fov_deg", 60.0), camera.get("width", 512), camera.get("height", 512))
        return cls(room, list(data["objects"]), data["lighting"], camera)

    def to_dict(self) -> dict:
        return {"room": self.room, "objects": self.objects, "lighting": self.lighting, "camera": self.camera,
                "aabb": self.aabb}

    @property
    def aabb(self) -> list[float]:
        return [float(v) for v in (*self.room["min"], *self.room["max"])]

    @property
    def size(self) -> float:
        """The room's diagonal: the scene size relative errors (Chamfer) are given against."""
        return float(np.linalg.norm(np.subtract(self.room["max"], self.room["min"])))

    def start_camera(self, config: PinholeConfig | None = None) -> Cameras:
        """The start camera, with the scene's intrinsics or ``config``'s."""
        cam = self.camera
        config = config or PinholeConfig(cam.get("fov_deg", 60.0), cam.get("width", 512), cam.get("height", 512))
        return pinhole(torch.tensor(cam["c2w"], dtype=torch.float32), config)

    def intersect(self, o: Tensor, d: Tensor, chunk: int = 1 << 15) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest hit of rays (origins [N, 3] or [3], unit dirs [N, 3]): distance t, unit normal,
        and albedo, [N], [N, 3], [N, 3]. Every ray inside the room hits something. Rays go in
        chunks: the many elementwise passes then stay in the CPU's cache (a quarter faster)."""
        o = o.expand_as(d)
        if len(d) > chunk:
            parts = [self._intersect(o[i:i + chunk], d[i:i + chunk]) for i in range(0, len(d), chunk)]
            return tuple(torch.cat(p) for p in zip(*parts))
        return self._intersect(o, d)

    def _intersect(self, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t, normal, local = hit_room(self.room, o, d)
        part = torch.zeros(len(d), dtype=torch.long)
        for i, obj in enumerate(self.objects, start=1):
            t_i, n_i, l_i = HITS[obj["type"]](obj, o, d)
            nearer = t_i < t
            t, part = torch.where(nearer, t_i, t), torch.where(nearer, i, part)
            normal, local = torch.where(nearer[:, None], n_i, normal), torch.where(nearer[:, None], l_i, local)
        albedo = torch.zeros_like(d)
        inset = local - TEXTURE_INSET * self._local_normal(normal, part)
        for i in range(len(self.objects) + 1):
            sel = (part == i) & torch.isfinite(t)
            if sel.any():
                albedo[sel] = self._albedo(i, inset[sel], normal[sel])
        return t, normal, albedo

    def _local_normal(self, normal: Tensor, part: Tensor) -> Tensor:
        """Normals in each part's texture frame (a box's is turned by its yaw)."""
        out = normal.clone()
        for i, obj in enumerate(self.objects, start=1):
            if obj["type"] == "box" and obj.get("yaw_deg", 0.0):
                sel = part == i
                out[sel] = normal[sel] @ _rot_z(obj["yaw_deg"])
        return out

    def _albedo(self, part: int, q: Tensor, normal: Tensor) -> Tensor:
        if part > 0:
            return texture(self.objects[part - 1]["texture"], q)
        out = texture(self.room["walls"], q)
        for face, sign in (("floor", 1.0), ("ceiling", -1.0)):
            sel = normal[:, 2] * sign > 0.5
            out[sel] = texture(self.room[face], q[sel])
        return out

    def shade(self, normal: Tensor, albedo: Tensor) -> Tensor:
        light = torch.full((len(normal),), float(self.lighting.get("ambient", 0.4)))
        for source in self.lighting.get("lights", []):
            direction = torch.nn.functional.normalize(torch.tensor(source["direction"], dtype=torch.float32), dim=0)
            light = light + float(source["intensity"]) * (normal @ direction).clamp_min(0)
        return (albedo * light[:, None]).clamp(0, 1)

    @torch.no_grad()
    def render(self, camera: Cameras, supersample: int = 1) -> tuple[Tensor, Tensor]:
        """(rgb [H, W, 3] in 0..1, z-depth [H, W]) of one camera. Depth is exact at each pixel's
        centre; colour is the mean of s x s rays over the pixel's square (s = ``supersample``;
        1: the centre ray only)."""
        cam = single(camera)
        h, w = cam.height, cam.width
        pixels = torch.arange(h * w)
        index = torch.zeros_like(pixels)
        origins, dirs = cam.rays(index, (pixels % w).float() + 0.5, (pixels // w).float() + 0.5)
        t, normal, albedo = self.intersect(origins, dirs)
        forward = -cam.c2w[0, :3, 2]
        depth = (t * (dirs @ forward)).reshape(h, w)
        if supersample == 1:
            return self.shade(normal, albedo).reshape(h, w, 3), depth
        origins, dirs = cam.pixel_rays(index, pixels, supersample)
        _, normal, albedo = self.intersect(origins, dirs)
        rgb = self.shade(normal, albedo).reshape(h * w, supersample * supersample, 3).mean(1)
        return rgb.reshape(h, w, 3), depth

    def mesh(self, room_cell: float = 0.2, sphere_subdivisions: int = 3, cylinder_sections: int = 96):
        """The scene as one ``trimesh.Trimesh`` (world Z up): the room's faces facing inward,
        the objects' outward, vertex colours (sRGB uint8) sampled from the albedo at the vertices
        (the geometry is exact but for the sphere's and cylinder's facets; the checks between
        vertices are not in the colours)."""
        import trimesh

        parts = [_room_mesh(self.room, room_cell)]
        for obj in self.objects:
            if obj["type"] == "box":
                transform = np.eye(4)
                transform[:3, :3], transform[:3, 3] = _rot_z(obj.get("yaw_deg", 0.0)).numpy(), obj["center"]
                parts.append(trimesh.creation.box(extents=2 * np.asarray(obj["half"]), transform=transform))
            elif obj["type"] == "sphere":
                part = trimesh.creation.icosphere(subdivisions=sphere_subdivisions, radius=obj["radius"])
                parts.append(part.apply_translation(obj["center"]))
            else:
                part = trimesh.creation.cylinder(radius=obj["radius"], height=obj["height"], sections=cylinder_sections)
                parts.append(part.apply_translation(np.add(obj["base"], [0.0, 0.0, obj["height"] / 2])))
        mesh = trimesh.util.concatenate(parts)
        verts = torch.tensor(mesh.vertices, dtype=torch.float32)
        normals = torch.tensor(np.array(mesh.vertex_normals), dtype=torch.float32)
        # Colour each vertex by the ray that meets it: from just off the surface, along -normal.
        albedo = self.intersect(verts + 1e-3 * normals, -normals)[2].clamp(0, 1)
        mesh.visual.vertex_colors = np.concatenate(
            [(albedo.numpy() * 255 + 0.5).astype(np.uint8), np.full((len(verts), 1), 255, np.uint8)], 1)
        return mesh


def _room_mesh(room: dict, cell: float):
    """The room's six faces as grids of about ``cell`` squares, wound to face the inside."""
    import trimesh

    lo, hi = np.asarray(room["min"], float), np.asarray(room["max"], float)
    verts, faces = [], []
    for axis in range(3):
        a, b = [i for i in range(3) if i != axis]
        na, nb = (max(1, round((hi[k] - lo[k]) / cell)) for k in (a, b))
        ua, ub = np.linspace(lo[a], hi[a], na + 1), np.linspace(lo[b], hi[b], nb + 1)
        ga, gb = np.meshgrid(ua, ub, indexing="ij")
        for value, inward in ((lo[axis], 1.0), (hi[axis], -1.0)):
            grid = np.zeros((na + 1, nb + 1, 3))
            grid[..., axis], grid[..., a], grid[..., b] = value, ga, gb
            base = sum(len(v) for v in verts)
            idx = base + np.arange((na + 1) * (nb + 1)).reshape(na + 1, nb + 1)
            quads = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], -1).reshape(-1, 4)
            tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
            flat = grid.reshape(-1, 3)
            corner = flat[tris[0] - base]
            normal = np.cross(corner[1] - corner[0], corner[2] - corner[0])  # counter-clockwise: the front
            verts.append(flat)
            faces.append(tris if normal[axis] * inward > 0 else tris[:, ::-1])
    return trimesh.Trimesh(np.concatenate(verts), np.concatenate(faces), process=False)
