"""From a field to files: marching cubes of its signed surface, clean-up, decimation, colours
(vertex colours and a baked texture), atomic writes.

Every field is exported through its signed surface function (gen3d.fields: negative inside, the
surface at 0; a density field's is ``level - density``). :func:`finish_mesh` turns any surface
mesh (marching cubes' here, a refined mesh elsewhere) into an exportable one from a colour
function; the texture baking itself is gen3d.texture. The exporters are plugins (kind
``exporter``); this module prepares the mesh and moves whatever an exporter wrote into the run
folder only once it is complete.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from scipy import ndimage
from skimage import measure

from .errors import ConfigError, Gen3DError, call_plugin
from .fields import surface_of
from .render import packed_steps
from .texture import TEXTURE_KEY, MeshTexture, bake, colors_at, unwrap

# Our world is Z up; writers whose format is Y up (glTF by its specification, OBJ as Blender
# imports it by default) get the mesh turned by this.
Z_UP_TO_Y_UP = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
COLOR_MODES = ("texture", "vertex")  # export.colors: a baked texture (and vertex colours), or vertex colours only
# xatlas' time grows much faster than the face count (docs/benchmarks.md, textured exports),
# so a textured export of more faces stops with an error rather than seem to hang.
MAX_TEXTURED_FACES = 200_000


@dataclass
class MeshSettings:
    resolution: int = 256  # marching-cubes grid per axis
    # Density level of the surface, for fields whose surface is their density (None: chosen so
    # the surface has the views' silhouettes). Fields with a surface of their own ignore it.
    level: float | None = None
    min_component: float = 0.02  # drop pieces with fewer faces than this fraction of the largest
    # Space not reachable from outside through density below fill_fraction x level is inside:
    # no inner shells, no holes where a thin shell's density stays under the level (0 disables).
    fill_fraction: float = 0.25
    fill_band: int = 4  # voxels next to the outside keep their density, so the surface stays at the level
    # Quadric decimation to this many faces before colouring (None: keep marching cubes' count).
    # The default keeps a textured GLB small enough for a web page or a game engine and the atlas
    # quick on a CPU; the texture keeps the colour detail the dropped faces held.
    target_faces: int | None = 20_000
    # "texture": a UV atlas with the colours baked into a texture_size square image (vertex
    # colours are kept too, for formats without textures); "vertex": vertex colours only.
    colors: str = "texture"
    texture_size: int = 1024  # a power of two, so every mipmap level halves evenly
    formats: list[str] = field(default_factory=lambda: ["glb", "obj", "ply"])
    # Settings of each format's exporter plugin, by format: {obj: {...}, xyz: {precision: 3}}.
    options: dict[str, Any] = field(default_factory=dict)
    # Filled in by recipe validation: a resolved Choice (component and config) per format.
    exporters: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 16 <= self.resolution <= 1024:
            raise ValueError(f"resolution must be between 16 and 1024, got {self.resolution}")
        if self.level is not None and not self.level > 0:
            raise ValueError(f"level must be positive, got {self.level}")
        if self.target_faces is not None and self.target_faces < 16:
            raise ValueError(f"target_faces must be at least 16 (or null: no decimation), got {self.target_faces}")
        if self.colors not in COLOR_MODES:
            raise ValueError(f"colors must be one of {', '.join(COLOR_MODES)}, got {self.colors!r}")
        if self.colors == "texture" and self.target_faces is None:  # refused now, not after the training
            raise ValueError("target_faces: null keeps every face of marching cubes (hundreds of thousands), too "
                             "many for a UV atlas; give a face count (e.g. 20000) or set colors: vertex")
        if self.colors == "texture" and self.target_faces is not None and self.target_faces > MAX_TEXTURED_FACES:
            raise ValueError(f"target_faces must be at most {MAX_TEXTURED_FACES} with colors: texture (the atlas "
                             f"would take too long), got {self.target_faces}; or set colors: vertex")
        if not (64 <= self.texture_size <= 8192 and self.texture_size & (self.texture_size - 1) == 0):
            raise ValueError(f"texture_size must be a power of two from 64 to 8192, got {self.texture_size}")


@torch.no_grad()
def level_from_silhouettes(renderer, field, origins: torch.Tensor, dirs: torch.Tensor, covered: torch.Tensor,
                           min_rays: int = 16) -> float | None:
    """The marching-cubes level whose surface has the given silhouettes: the density level at
    which "the ray meets density >= level" agrees with ``covered`` (the pixel is the object's)
    for the most rays. None when fewer than ``min_rays`` rays are covered or fewer are not.

    Why silhouettes: a learnt surface is a density ramp, and where on the ramp the true surface
    lies depends on the data. A level read off the renderings' depth (the density at the expected
    depth of opaque rays) puts meshes most of a voxel inside; silhouettes pin the level where the
    images put the outline (docs/experiments.md)."""
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


def surface_volume(surface, resolution: int, chunk: int = 1 << 18) -> np.ndarray:
    """The signed surface function sampled on a resolution^3 lattice spanning its box (corners included)."""
    field = getattr(surface, "field", None)
    if field is not None and hasattr(field, "density_volume"):  # a density surface of a fast field
        return surface.level - field.density_volume(resolution).cpu().numpy()
    aabb = surface.aabb
    axes = [torch.linspace(float(aabb[i]), float(aabb[i + 3]), resolution, device=aabb.device) for i in range(3)]
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), dim=-1).reshape(-1, 2)
    values = []
    with torch.no_grad():
        for x in axes[0]:  # one slab at a time keeps memory flat at any resolution
            points = torch.cat([x.expand(len(yz), 1), yz], dim=1)
            values.append(torch.cat([surface.surface(p) for p in points.split(chunk)]).reshape(resolution, resolution))
    return torch.stack(values).cpu().numpy()


def extract_mesh(field, settings: MeshSettings) -> trimesh.Trimesh:
    """The field's surface (where its signed surface function crosses 0), in world coordinates
    (Z up), cleaned up and finished by :func:`finish_mesh` with the field's colours.
    ``mesh.metadata["export_seconds"]`` holds the seconds of each phase."""
    began = time.perf_counter()
    mesh = surface_mesh(field, settings)
    surfaced = time.perf_counter() - began
    mesh = finish_mesh(mesh, field_colors(field), settings)
    mesh.metadata["export_seconds"] = {"marching_cubes": round(surfaced, 3), **mesh.metadata.get("export_seconds", {})}
    return mesh


def surface_mesh(field, settings: MeshSettings) -> trimesh.Trimesh:
    """The field's surface as the export finds it, before decimation and colours: marching cubes
    of its signed surface function (``settings.level`` for a density field) on a
    ``settings.resolution``^3 lattice over its box, the interior filled (``fill_fraction``), pieces
    under ``min_component`` of the largest dropped. World coordinates, Z up."""
    surface = surface_of(field, settings.level, settings.fill_fraction)
    volume = surface_volume(surface, settings.resolution)
    if not (volume.min() < 0 < volume.max()):
        what = (f"the field's density ranges {surface.level - volume.max():.3g}..{surface.level - volume.min():.3g} "
                f"and never crosses the export level {settings.level}" if hasattr(surface, "level")
                else f"its surface function ranges {volume.min():.3g}..{volume.max():.3g} and never crosses 0")
        raise Gen3DError(f"no surface: {what}; train longer or set export.level")
    if settings.fill_fraction > 0:
        volume = fill_interior(volume, getattr(surface, "empty_above", 0.0), getattr(surface, "inside_value", None),
                               settings.fill_band)
    aabb = field.aabb.detach().cpu().numpy().astype(np.float64)
    spacing = (aabb[3:] - aabb[:3]) / (settings.resolution - 1)
    # Negative inside: marching cubes' normals then point outwards.
    verts, faces, _, _ = measure.marching_cubes(volume, 0.0, spacing=tuple(spacing))
    mesh = trimesh.Trimesh(verts + aabb[:3], faces, process=False)
    return keep_large_components(mesh, settings.min_component)


def finish_mesh(mesh: trimesh.Trimesh, color_fn, settings: MeshSettings) -> trimesh.Trimesh:
    """A surface mesh made ready to export: decimated to ``settings.target_faces``, then coloured
    by ``color_fn(points [N, 3], normals [N, 3]) -> [N, 3]`` (float tensors on the CPU: points on
    the surface and its outward unit normals there; colours in 0..1, the images' sRGB values,
    like ``field.albedo``). Always vertex colours (uint8 sRGB, ``mesh.visual.vertex_colors``);
    with ``settings.colors == "texture"`` also a baked texture, ``mesh.metadata[TEXTURE_KEY]``
    (a :class:`gen3d.texture.MeshTexture`; the mesh's vertices are then split along the atlas'
    seams, their normals kept from the unsplit mesh). ``mesh.metadata["export_seconds"]`` gets
    the seconds of each phase. Returns a new mesh; ``mesh`` is left as it was."""
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    if settings.target_faces and len(mesh.faces) > settings.target_faces:
        mesh = decimate(mesh, settings.target_faces)
        seconds["decimate"] = round(time.perf_counter() - began, 3)
    # Normals of the whole surface, before seams split it: a split vertex keeps its neighbours'
    # average on both sides, so lit views show no seams.
    vertices, faces = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    normals = np.array(mesh.vertex_normals, dtype=np.float64)
    began = time.perf_counter()
    colors = colors_at(color_fn, vertices, normals)
    seconds["vertex_colors"] = round(time.perf_counter() - began, 3)
    texture = None
    if settings.colors == "texture":
        if len(faces) > MAX_TEXTURED_FACES:
            raise Gen3DError(f"a textured export of {len(faces)} faces: the UV atlas would take too long above "
                             f"{MAX_TEXTURED_FACES}; set export.target_faces (e.g. 20000) or export.colors: vertex")
        began = time.perf_counter()
        vmapping, faces, uv = unwrap(vertices, faces, settings.texture_size)
        vertices, normals, colors = vertices[vmapping], normals[vmapping], colors[vmapping]
        seconds["unwrap"] = round(time.perf_counter() - began, 3)
        began = time.perf_counter()
        texture = MeshTexture(uv=uv, image=bake(vertices, normals, faces, uv, settings.texture_size, color_fn))
        seconds["bake"] = round(time.perf_counter() - began, 3)
    finished = trimesh.Trimesh(vertices, faces, vertex_normals=normals, process=False)
    finished.visual.vertex_colors = np.concatenate([(colors * 255 + 0.5).astype(np.uint8),
                                                    np.full((len(colors), 1), 255, dtype=np.uint8)], axis=1)
    if texture is not None:
        finished.metadata[TEXTURE_KEY] = texture
    finished.metadata["export_seconds"] = seconds
    return finished


def field_colors(field):
    """The colour function of a field for :func:`finish_mesh`: its albedo where it has one, else
    its colour seen from outside along the normal."""
    device = field.aabb.device

    def color(points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
        points = points.to(device)
        if hasattr(field, "albedo"):
            return field.albedo(points)
        return field(points, -normals.to(device))[1]

    return color


def fill_interior(volume: np.ndarray, empty_above: float, inside_value: float | None, band: int) -> np.ndarray:
    """Make inside (negative) everything farther than ``band`` voxels from the outside, where the
    outside is what the box's border reaches through values above ``empty_above``.

    A radiance field only needs density where rays stop, so a reconstructed solid is often a thin
    shell whose peak density varies: marching cubes at one level would give an inner surface too,
    and holes where the peak stays under the level. Taking "outside" as what clearly empty space
    reaches from the border, and the rest as solid, leaves one closed outer surface. The band keeps
    the outer surface's own ramp, from ``empty_above`` down to 0: a ramp wider than ``band`` voxels
    is cut, and the surface moves out to the band's edge (learnt ramps are a few voxels wide;
    tests/test_export.py shows the effect on a wide analytic ramp). Deep voxels get
    ``inside_value`` (default: the volume's most inside value).

    Outside must also be in sight of the outside (:func:`in_line_of_sight`): a pocket that empty
    space reaches only round a corner, such as a hollow the views never looked into opening
    through an underside no view saw, is no surface anyone saw, so it is filled too.
    """
    empty = volume > empty_above
    labels, _ = ndimage.label(empty)
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))
    outside = np.isin(labels, border[border > 0]) & in_line_of_sight(empty)
    deep = ~ndimage.binary_dilation(outside, iterations=band)
    fill = float(volume.min()) if inside_value is None else inside_value
    return np.where(deep, np.minimum(volume, fill), volume)


# The 26 directions to a voxel's neighbours: the straight lines in_line_of_sight looks along.
GRID_DIRECTIONS = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1) if (dx, dy, dz) != (0, 0, 0)]


def in_line_of_sight(empty: np.ndarray) -> np.ndarray:
    """Voxels from which a straight line along one of the 26 grid directions leaves the volume
    through ``empty`` voxels only (the voxel itself included).

    A coarse stand-in for "some camera outside sees this point", with no cameras needed: ray
    stabbing as in Nooruddin and Turk's volumetric model repair (2003). Each direction takes
    log2(size) shifted ANDs: after k rounds a voxel holds whether the next 2^k voxels along the
    line are all empty."""
    seen = np.zeros_like(empty)
    for direction in GRID_DIRECTIONS:
        clear, step = empty.copy(), 1
        while step < max(empty.shape):
            clear &= _shifted(clear, direction, step)
            step *= 2
        seen |= clear
    return seen


def _shifted(a: np.ndarray, direction: tuple[int, int, int], k: int) -> np.ndarray:
    """``a`` at x + k * direction for every voxel x; True beyond the volume's edge (open space)."""
    out = np.ones_like(a)
    source = tuple(slice(k, None) if d > 0 else slice(None, -k) if d < 0 else slice(None) for d in direction)
    target = tuple(slice(None, -k) if d > 0 else slice(k, None) if d < 0 else slice(None) for d in direction)
    out[target] = a[source]
    return out


def keep_large_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    sizes = np.bincount(labels)
    keep = sizes[labels] >= min_fraction * sizes.max()
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    return mesh


def decimate(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    """Quadric decimation to about ``faces`` faces (fast-simplification), degenerate faces dropped."""
    try:
        from fast_simplification import simplify
    except ImportError as exc:
        raise ConfigError("export.target_faces needs the fast-simplification package: "
                          "pip install fast-simplification") from exc
    vertices, triangles = simplify(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces),
                                   target_count=faces)
    simple = trimesh.Trimesh(vertices, triangles, process=False)
    simple.update_faces(simple.nondegenerate_faces())
    simple.remove_unreferenced_vertices()
    return simple


def up_axis(axis: str):
    """Mark an exporter's writer with the up axis of its files: ``"Y"`` (glTF, OBJ as most tools
    read it) or ``"Z"`` (gen3d's world, what a writer without the mark gets)::

        @gen3d.up_axis("Y")
        def write(mesh, path): ...
    """
    def mark(write):
        write.up_axis = axis
        return write
    return mark


def export_mesh(mesh: trimesh.Trimesh, out_dir: Path, exporters: list, stem: str = "mesh") -> list[Path]:
    """Write ``mesh`` (Z up) through each exporter (a resolved Choice: ``MeshSettings.exporters``);
    returns the files written. An exporter that raises is a one-line error naming its plugin.

    Each writer gets the mesh in the up axis its format is read in, which it names as its
    ``up_axis`` attribute: ``"Y"`` (turned by Z_UP_TO_Y_UP) or ``"Z"``, our world's as it is,
    which is also what a writer that names none gets (gen3d.hookspecs.gen3d_exporters)."""
    writers = [(choice.type, choice.build(), choice.component) for choice in exporters]
    written = []
    for fmt, write, component in writers:
        up = getattr(write, "up_axis", "Z")
        if up not in ("Y", "Z"):
            raise Gen3DError(f"exporter {fmt!r}: up_axis must be 'Y' or 'Z', got {up!r}")
        # A copy either way: a writer cannot change the caller's mesh. The cache goes with it: it
        # holds the vertex normals finish_mesh set, which apply_transform turns with the mesh.
        oriented = mesh.copy(include_cache=True)
        if up == "Y":
            oriented.apply_transform(Z_UP_TO_Y_UP)
        # Each exporter writes into a scratch folder; files move into place only when all are done.
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".export-{fmt}-") as scratch:
            call_plugin(component, f"writing {stem}.{fmt}", write, oriented, Path(scratch) / f"{stem}.{fmt}")
            for produced in sorted(Path(scratch).iterdir()):
                target = Path(out_dir) / produced.name
                os.replace(produced, target)
                written.append(target)
    return written


def timed_export(field, settings: MeshSettings, out_dir: Path) -> tuple[trimesh.Trimesh, list[Path], float]:
    began = time.perf_counter()
    mesh = extract_mesh(field, settings)
    files = export_mesh(mesh, out_dir, settings.exporters)
    return mesh, files, time.perf_counter() - began
