"""A scene's surface from depth maps: truncated signed distance fusion, then marching cubes.

A scene seen from inside has no outside to flood-fill from and no silhouettes to place a
density level by (what an object's export uses, gen3d.export), and behind every wall the
field's density is whatever training left there. What the views *saw* is the surface: each
view's depth map says "empty up to here, surface here, unknown behind". Fusing them (Curless and
Levoy's volumetric method, as in KinectFusion and Text2Room) gives a signed distance on a voxel
grid: positive in front of the surfaces, negative just behind them, unknown elsewhere; marching
cubes of its zero level, only where some view observed the voxel, is the seen surface and
nothing else.

Per view, each voxel centre is projected into the depth map (nearest pixel): its signed distance
is the map's z-depth minus the voxel's, truncated to ``truncation`` and divided by it; voxels more
than ``truncation`` behind the surface are left alone (they are occluded, not known to be solid).
The fused value is the mean over the views that observed the voxel. We wrote it ourselves: it is
a few tensor operations, and Open3D's version would add a large dependency for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import trimesh
from skimage import measure

from gen3d.cameras import Cameras

from .pinhole import depth_at


@dataclass
class FusionConfig:
    voxels: int = 256  # voxels along the box's longest side
    truncation_voxels: float = 3.0  # how far behind a surface a view still counts (in voxels)

    def __post_init__(self) -> None:
        if not 16 <= self.voxels <= 1024:
            raise ValueError(f"voxels is voxels along the longest side, 16 to 1024; got {self.voxels}")
        if not 1 <= self.truncation_voxels <= 32:
            raise ValueError(f"truncation_voxels must be 1 to 32; got {self.truncation_voxels}")


@dataclass
class FusedVolume:
    tsdf: torch.Tensor  # [X, Y, Z] truncated signed distance / truncation, in [-1, 1]; 1 where unobserved
    weight: torch.Tensor  # [X, Y, Z] number of views that observed each voxel
    origin: torch.Tensor  # [3] the first voxel centre
    voxel: float  # voxel side, world units

    def mesh(self) -> trimesh.Trimesh:
        """The zero level of the observed voxels (normals point into the free space, toward the views)."""
        observed = (self.weight > 0).numpy()
        volume = self.tsdf.numpy()
        if not (observed.any() and (volume[observed] < 0).any() and (volume[observed] > 0).any()):
            raise ValueError("scene fusion: the depth maps never cross a surface inside the box")
        # Only cells whose 8 corners some view observed: where the band behind a surface ends,
        # observed -1 meets unobserved voxels, and a cell across that edge would draw a second,
        # backward sheet behind every surface.
        corners = observed[:-1, :-1, :-1].copy()
        for dx, dy, dz in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)][1:]:
            corners &= observed[dx:dx + corners.shape[0], dy:dy + corners.shape[1], dz:dz + corners.shape[2]]
        # Negative behind the surface: marching cubes' normals then point to the free side.
        verts, faces, _, _ = measure.marching_cubes(volume, 0.0, spacing=(self.voxel,) * 3, mask=observed)
        cell = np.floor(verts[faces].mean(axis=1) / self.voxel).astype(np.int64)  # each face's cell
        cell = np.minimum(cell, np.array(corners.shape) - 1)
        mesh = trimesh.Trimesh(verts + self.origin.numpy().astype(np.float64), faces, process=False)
        mesh.update_faces(corners[cell[:, 0], cell[:, 1], cell[:, 2]])
        mesh.remove_unreferenced_vertices()
        return mesh


def fuse_depths(depths: list[torch.Tensor], cameras: list[Cameras], aabb: torch.Tensor,
                config: FusionConfig | None = None) -> FusedVolume:
    """Fuse z-depth maps [H, W] (inf or <= 0 where unknown) seen by ``cameras`` over the box ``aabb`` [6]."""
    config = config or FusionConfig()
    low, high = aabb[:3].double().cpu(), aabb[3:].double().cpu()
    voxel = float((high - low).max()) / config.voxels
    counts = [max(2, math.ceil(float(e) / voxel)) for e in (high - low)]
    origin = low + 0.5 * voxel
    axes = [origin[i] + voxel * torch.arange(counts[i], dtype=torch.float64) for i in range(3)]
    truncation = config.truncation_voxels * voxel
    total = torch.zeros(counts, dtype=torch.float32)
    weight = torch.zeros(counts, dtype=torch.float32)
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 2)
    views = [(depth.float().cpu(), camera.to("cpu")) for depth, camera in zip(depths, cameras)]
    for i, x in enumerate(axes[0]):  # one slab at a time keeps memory flat at any size
        points = torch.cat([x.expand(len(yz), 1), yz], 1).float()
        for depth, camera in views:
            z, surface = depth_at(points, depth, camera)
            seen = torch.isfinite(surface) & (surface > 0)
            sdf = surface - z
            seen &= sdf > -truncation
            value = (sdf / truncation).clamp(-1, 1)
            total[i].view(-1)[seen] += value[seen]
            weight[i].view(-1)[seen] += 1
    tsdf = torch.where(weight > 0, total / weight.clamp_min(1), torch.ones_like(total))
    return FusedVolume(tsdf, weight, origin.float(), voxel)
