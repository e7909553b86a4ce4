"""From a field to files: marching cubes, vertex colours, clean-up, Z-up -> Y-up, atomic writes.

The exporters themselves are plugins (kind ``exporter``); this module prepares the mesh and
moves whatever an exporter wrote into the run folder only once it is complete.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy import ndimage
from skimage import measure

from .errors import ConfigError, Gen3DError
from .plugins import get_component
from .render import packed_steps

# glTF (by its specification), and OBJ as Blender imports it by default, are Y-up; our world is Z-up.
Z_UP_TO_Y_UP = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


@dataclass
class MeshSettings:
    resolution: int = 256  # marching-cubes grid per axis
    level: float | None = None  # density level of the surface; None: the loop chooses (e.g. from depth)
    min_component: float = 0.02  # drop pieces with fewer faces than this fraction of the largest
    # Space not reachable from outside through density below fill_fraction x level is inside:
    # no inner shells, no holes where a thin shell's density stays under the level (0 disables).
    fill_fraction: float = 0.25
    fill_band: int = 4  # voxels next to the outside keep their density, so the surface stays at the level
    decimate: int | None = None  # target face count (needs the fast-simplification package)
    formats: list[str] = field(default_factory=lambda: ["glb", "obj", "ply"])

    def __post_init__(self) -> None:
        if not 16 <= self.resolution <= 1024:
            raise ValueError(f"resolution must be between 16 and 1024, got {self.resolution}")
        if self.level is not None and not self.level > 0:
            raise ValueError(f"level must be positive, got {self.level}")


@torch.no_grad()
def level_from_silhouettes(renderer, field, origins: torch.Tensor, dirs: torch.Tensor, covered: torch.Tensor,
                           min_rays: int = 16) -> float | None:
    """The marching-cubes level whose surface has the given silhouettes: the density level at
    which "the ray meets density >= level" agrees with ``covered`` (the pixel is the object's)
    for the most rays. None when fewer than ``min_rays`` rays are covered or fewer are not.

    Why silhouettes: a learnt surface is a density ramp, and where on the ramp the true surface
    lies depends on the data. A level read off the renderings' depth (the density at the expected
    depth of opaque rays) put meshes most of a voxel inside on every data set we measured (Chamfer
    0.010-0.020 of the bounding radius); silhouettes pin the level where the images put the outline
    (0.0035-0.011; benchmarks/bench_reconstruct.py on assets/ and on Blender renders)."""
    covered = covered.bool()
    if int(covered.sum()) < min_rays or int((~covered).sum()) < min_rays:
        return None
    peak = torch.cat([_max_density_along(renderer, field, o, d)
                      for o, d in zip(origins.split(4096), dirs.split(4096))])
    order = peak.argsort()
    peak, covered = peak[order], covered[order]
    # A level between sorted peaks k-1 and k calls rays k.. "hit": its errors are the covered
    # rays before k plus the uncovered rays from k on. Try every k, exactly.
    covered_before = torch.cat([covered.new_zeros(1, dtype=torch.long), covered.long().cumsum(0)])
    uncovered_from = (~covered).long().flip(0).cumsum(0).flip(0)
    errors = covered_before + torch.cat([uncovered_from, uncovered_from.new_zeros(1)])
    k = int(errors[1:].argmin()) + 1  # k = 0 would call every ray a hit: no level below all peaks
    upper = peak[k] if k < len(peak) else 2 * peak[-1]
    return float(torch.sqrt(peak[k - 1].clamp_min(1e-6) * upper.clamp_min(1e-6)))


def _max_density_along(renderer, field, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """The highest density each ray meets in the box, sampled at half the render step."""
    t, ray = packed_steps(origins, dirs, renderer.aabb, 0.5 * renderer.step_size, origins.new_zeros(len(origins)))
    sigma = field.density(origins[ray] + dirs[ray] * t[:, None])
    return sigma.new_zeros(len(origins)).scatter_reduce(0, ray, sigma, "amax")


def density_volume(field, resolution: int, chunk: int = 1 << 18) -> np.ndarray:
    """Density sampled on a resolution^3 lattice spanning the field's box (corners included)."""
    if hasattr(field, "density_volume"):
        return field.density_volume(resolution).cpu().numpy()
    aabb = field.aabb
    axes = [torch.linspace(float(aabb[i]), float(aabb[i + 3]), resolution, device=aabb.device) for i in range(3)]
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), dim=-1).reshape(-1, 2)
    values = []
    with torch.no_grad():
        for x in axes[0]:  # one slab at a time keeps memory flat at any resolution
            points = torch.cat([x.expand(len(yz), 1), yz], dim=1)
            values.append(torch.cat([field.density(p) for p in points.split(chunk)]).reshape(resolution, resolution))
    return torch.stack(values).cpu().numpy()


def extract_mesh(field, settings: MeshSettings) -> trimesh.Trimesh:
    """The surface where density crosses ``settings.level``, in world coordinates (Z up), coloured."""
    if settings.level is None:
        raise Gen3DError("export.level is not set and this recipe does not choose one: set export.level")
    volume = density_volume(field, settings.resolution)
    if not (volume.min() < settings.level < volume.max()):
        raise Gen3DError(f"no surface: the field's density ranges {volume.min():.3g}..{volume.max():.3g} "
                         f"and never crosses the export level {settings.level}; train longer or set export.level")
    if settings.fill_fraction > 0:
        volume = fill_interior(volume, settings.level, settings.fill_fraction * settings.level, settings.fill_band)
    aabb = field.aabb.detach().cpu().numpy().astype(np.float64)
    spacing = (aabb[3:] - aabb[:3]) / (settings.resolution - 1)
    # The field is dense inside: flip so marching cubes' normals point outwards.
    verts, faces, _, _ = measure.marching_cubes(-volume, -settings.level, spacing=tuple(spacing))
    verts = verts + aabb[:3]
    mesh = trimesh.Trimesh(verts, faces, process=False)
    mesh = keep_large_components(mesh, settings.min_component)
    if settings.decimate and len(mesh.faces) > settings.decimate:
        mesh = decimate(mesh, settings.decimate)
    mesh.visual.vertex_colors = vertex_colors(field, mesh)
    return mesh


def fill_interior(volume: np.ndarray, level: float, outside_level: float, band: int) -> np.ndarray:
    """Raise above ``level`` everything farther than ``band`` voxels from the outside, where the
    outside is what the box's border reaches through density below ``outside_level``.

    A radiance field only needs density where rays stop, so a reconstructed solid is often a thin
    shell whose peak density varies: marching cubes at one level would give an inner surface too,
    and holes where the peak stays under the level. Taking "outside" as what a low level can reach
    from the border, and the rest as solid, leaves one closed outer surface. The band keeps the
    outer surface's own density ramp, from ``outside_level`` up to ``level``: a ramp wider than
    ``band`` voxels is cut, and the surface moves out to the band's edge (learnt ramps are a few
    voxels wide; tests/test_export.py shows the effect on a wide analytic ramp).
    """
    empty = volume < outside_level
    labels, _ = ndimage.label(empty)
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))
    outside = np.isin(labels, border[border > 0])
    deep = ~ndimage.binary_dilation(outside, iterations=band)
    return np.where(deep, np.maximum(volume, 2 * level), volume)


def keep_large_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    sizes = np.bincount(labels)
    keep = sizes[labels] >= min_fraction * sizes.max()
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    return mesh


def decimate(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    try:
        return mesh.simplify_quadric_decimation(face_count=faces)
    except ImportError as exc:
        raise ConfigError("export.decimate needs the fast-simplification package: "
                          "pip install fast-simplification") from exc


def vertex_colors(field, mesh: trimesh.Trimesh) -> np.ndarray:
    device = field.aabb.device
    points = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device)
    with torch.no_grad():
        if hasattr(field, "albedo"):
            rgb = torch.cat([field.albedo(p) for p in points.split(1 << 18)])
        else:  # look at each vertex from outside, along its normal
            normals = torch.tensor(np.array(mesh.vertex_normals), dtype=torch.float32, device=device)  # trimesh caches read-only
            rgb = torch.cat([field(p, -n)[1] for p, n in zip(points.split(1 << 18), normals.split(1 << 18))])
    rgba = np.concatenate([rgb.clamp(0, 1).cpu().numpy(), np.ones((len(points), 1))], axis=1)
    return (rgba * 255 + 0.5).astype(np.uint8)


def export_mesh(mesh: trimesh.Trimesh, out_dir: Path, formats: list[str], stem: str = "mesh") -> list[Path]:
    """Write ``mesh`` (Z up) in each format through the exporter plugins; returns the files written."""
    writers = [(fmt, get_component("exporter", fmt, where="export.formats").factory(None)) for fmt in formats]
    y_up = mesh.copy()
    y_up.apply_transform(Z_UP_TO_Y_UP)
    written = []
    for fmt, write in writers:
        # Each exporter writes into a scratch folder; files move into place only when all are done.
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".export-{fmt}-") as scratch:
            write(y_up, Path(scratch) / f"{stem}.{fmt}")
            for produced in sorted(Path(scratch).iterdir()):
                target = Path(out_dir) / produced.name
                os.replace(produced, target)
                written.append(target)
    return written


def timed_export(field, settings: MeshSettings, out_dir: Path) -> tuple[trimesh.Trimesh, list[Path], float]:
    began = time.perf_counter()
    mesh = extract_mesh(field, settings)
    files = export_mesh(mesh, out_dir, settings.formats)
    return mesh, files, time.perf_counter() - began
