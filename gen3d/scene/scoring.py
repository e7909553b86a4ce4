"""Scoring a generated scene against a known one (``scene-teacher``): held-out cameras and the
Chamfer distance over the part of the scene the views saw. Used by the tests and
``benchmarks/bench_text2nerf.py``."""

from __future__ import annotations

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

from gen3d.cameras import Cameras

from .pinhole import depth_at
from .trajectory import forward_poses


def held_out_poses(start: torch.Tensor, translation: float, rotation_deg: float) -> torch.Tensor:
    """[8, 4, 4] cameras inside a ``forward`` trajectory's span and on none of its poses: half its
    move and turn, in the 8 directions half-way between its own."""
    return forward_poses(start, 0.5 * translation, 0.5 * rotation_deg, first_deg=22.5)[1:]


def seen_points(points: np.ndarray, depths: list[torch.Tensor], cameras: list[Cameras],
                tolerance: float = 0.02) -> np.ndarray:
    """[N] bool: the points some camera sees, i.e. that lie within ``tolerance`` (relative) of the
    z-depth its depth map [H, W] gives at their pixel."""
    seen = np.zeros(len(points), dtype=bool)
    p = torch.from_numpy(points).float()
    for depth, camera in zip(depths, cameras):
        z, surface = depth_at(p, depth, camera)
        seen |= (torch.isfinite(surface) & ((z - surface).abs() <= tolerance * surface)).numpy()
    return seen


def seen_chamfer(mesh: trimesh.Trimesh, truth: trimesh.Trimesh, depths: list[torch.Tensor], cameras: list[Cameras],
                 scale: float, samples: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Chamfer distance between ``mesh`` and the part of ``truth`` the cameras see (their true
    depth maps ``depths``), both ways' mean nearest-neighbour distance averaged, in units of
    ``scale`` (the scene's size); also each direction alone."""
    a, _ = trimesh.sample.sample_surface(mesh, samples, seed=seed)
    b, _ = trimesh.sample.sample_surface(truth, samples, seed=seed + 1)
    b = b[seen_points(b, depths, cameras)]
    to_truth = float(cKDTree(b).query(a)[0].mean())
    to_mesh = float(cKDTree(a).query(b)[0].mean())
    return {"chamfer": 0.5 * (to_truth + to_mesh) / scale, "mesh_to_truth": to_truth / scale,
            "truth_to_mesh": to_mesh / scale, "truth_points_seen": int(len(b))}
