"""The end of a stage, the same for every loop: held-out evaluation, the surface level, exports in
every requested format, mesh metrics, previews, and the ``gen3d_on_export`` hook.

A loop does not write files. When it has trained, it hands the core a :class:`StageOutputs`:
its field and renderer, how to draw a view, the cameras to preview from, held-out views if it
has any, silhouettes to place a density surface by, a ground-truth mesh if there is one, and
metrics of its own. :func:`finish_stage` turns that into the run folder's files.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import imageio.v3 as iio
import numpy as np
import torch

from .cameras import Cameras, orbit
from .errors import Gen3DError
from .export import MeshSettings, export_mesh, extract_mesh, level_from_silhouettes
from .fields import SurfaceField
from .io import atomic_path, to_uint8, write_gif
from .render import cell_max_density, pixel_means


@dataclass
class PreviewSettings:
    turntable_frames: int = 36  # 0: no turntable.gif
    elevation: float | None = None  # degrees; None: the loop's choice
    size: int | None = None  # turntable side in pixels; None: the loop's choice
    test_images: int = 4  # held-out views in test_views.png (predicted above, real below)

    def __post_init__(self) -> None:
        if self.turntable_frames < 0 or self.test_images < 0:
            raise ValueError("turntable_frames and test_images must be 0 or more")
        if self.size is not None and self.size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")


@dataclass
class HeldOutViews:
    """Views the field never trained on, to score it: cameras and their RGB(A) images in 0..1."""

    cameras: Cameras
    images: torch.Tensor  # [N, H, W, 3 or 4]
    background: list[float]  # what transparent pixels are composited on

    def truth(self, index: int) -> np.ndarray:
        image = self.images[index].cpu().numpy()
        if image.shape[-1] == 3:
            return image
        bg = np.asarray(self.background, dtype=np.float32)
        return image[..., :3] * image[..., 3:] + bg * (1 - image[..., 3:])


@dataclass
class Orbit:
    """Where turntable cameras sit: a circle around ``center`` at ``radius``, with this field of view."""

    radius: float
    fov_x: float  # radians
    size: int  # default turntable side
    elevation: float = 20.0  # default, degrees
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Silhouettes:
    """Rays and whether each one's pixel is the object's: the density level is chosen so the
    exported surface draws these outlines."""

    origins: torch.Tensor
    dirs: torch.Tensor
    covered: torch.Tensor  # [R] bool


ViewRenderer = Callable[[Cameras, int], np.ndarray]  # (cameras, index) -> [H, W, 3] in 0..1


@dataclass
class StageOutputs:
    """What a loop hands the core when it has trained."""

    field: Any
    renderer: Any  # gen3d.render.VolumeRenderer
    render_view: ViewRenderer  # draws one camera's image the way the loop evaluates
    orbit: Orbit
    held_out: HeldOutViews | None = None
    # Silhouettes for the density level (None: the field's own opacity > 0.5 in turntable views).
    silhouettes: Callable[[], Silhouettes | None] | None = None
    ground_truth_mesh: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Draws turntable frames (None: render_view). A preview need not be drawn at the cost of a
    # score: a loop whose render_view averages several renderings per view can pass one cheaper.
    render_preview: ViewRenderer | None = None
    # A loop that makes its own surface mesh (mesh-refine) hands it here: called with the stage's
    # export settings, it returns the finished, coloured mesh, exported instead of marching cubes.
    mesh: Callable[[MeshSettings], Any] | None = None


def finish_stage(run, outputs: StageOutputs, export: MeshSettings, preview: PreviewSettings,
                 write_exports: bool = True) -> dict[str, Any]:
    """Evaluate, export and preview into ``run.out_dir``; fire ``gen3d_on_export``; return the metrics."""
    metrics: dict[str, Any] = dict(outputs.metrics)
    metrics["renderer"] = outputs.renderer.path
    if outputs.held_out is not None and len(outputs.held_out.cameras):
        metrics.update(held_out_metrics(run, outputs, preview))
    files: list[Path] = []
    if write_exports and export.formats:
        settings = export
        own_surface = isinstance(outputs.field, SurfaceField) or outputs.mesh is not None
        if settings.level is None and not own_surface:
            settings = replace(export, level=surface_level(outputs))
            settings.exporters = export.exporters  # resolved at validation; replace() does not copy it
        if settings.level is not None and not own_surface:
            metrics["export_level"] = round(settings.level, 4)
        began = time.perf_counter()
        mesh = outputs.mesh(settings) if outputs.mesh is not None else extract_mesh(outputs.field, settings)
        files = export_mesh(mesh, run.out_dir, settings.exporters)
        metrics.update(export_seconds=round(time.perf_counter() - began, 2), mesh_vertices=len(mesh.vertices),
                       mesh_faces=len(mesh.faces))
        if mesh.metadata.get("export_seconds"):  # where the export's time went: marching cubes, atlas, bake...
            metrics["export_phases"] = mesh.metadata["export_seconds"]
        if outputs.ground_truth_mesh is not None:
            metrics["chamfer"] = round(chamfer(mesh, outputs.ground_truth_mesh), 5)
    if preview.turntable_frames > 0:
        write_turntable(run, outputs, preview)
        files.append(run.path("turntable.gif"))
    run.hooks.gen3d_on_export(run=run, paths=files)
    run.log("wrote " + ", ".join(p.name for p in files))
    return metrics


def held_out_renders(run, outputs: StageOutputs, limit: int | None = None) -> tuple[list, list]:
    """The loop's renderings of the first ``limit`` held-out views (all by default) and the images."""
    held = outputs.held_out
    count = len(held.cameras) if limit is None else min(limit, len(held.cameras))
    cameras = held.cameras.to(run.device)
    return [outputs.render_view(cameras, i) for i in range(count)], [held.truth(i) for i in range(count)]


def held_out_metrics(run, outputs: StageOutputs, preview: PreviewSettings) -> dict[str, Any]:
    """PSNR and SSIM of the loop's renderings against every held-out image; test_views.png."""
    from skimage.metrics import structural_similarity

    preds, truths = held_out_renders(run, outputs)
    write_comparison(run.path("test_views.png"), preds, truths, preview.test_images)
    return {"psnr_test": round(float(np.mean([psnr(p, t) for p, t in zip(preds, truths)])), 3),
            "ssim_test": round(float(np.mean([structural_similarity(p, t, channel_axis=2, data_range=1.0)
                                              for p, t in zip(preds, truths)])), 4),
            "test_views": len(preds)}


def quick_psnr(run, outputs: StageOutputs, limit: int) -> dict[str, float]:
    """Held-out PSNR on the first ``limit`` views, for evaluations during training."""
    if outputs.held_out is None or not len(outputs.held_out.cameras):
        return {}
    preds, truths = held_out_renders(run, outputs, limit)
    return {"psnr_test": float(np.mean([psnr(p, t) for p, t in zip(preds, truths)]))}


@torch.no_grad()
def surface_level(outputs: StageOutputs) -> float:
    """The density level whose surface draws the loop's silhouettes; without any, the field's own
    opacity in turntable views; with no opaque view at all, half the highest density."""
    found = outputs.silhouettes() if outputs.silhouettes is not None else None
    if found is None:
        found = own_silhouettes(outputs)
    level = level_from_silhouettes(outputs.renderer, outputs.field, found.origins, found.dirs, found.covered)
    if level is not None:
        return level
    if outputs.silhouettes is not None:
        raise Gen3DError("cannot choose export.level: the views show too little of the object, or too little "
                         "empty background around it, to match silhouettes; set export.level")
    peak = float(cell_max_density(outputs.field, outputs.renderer.settings.occupancy_resolution).max())
    if peak <= 0:
        raise Gen3DError("the field is empty: nothing to export (train longer, or set export.level)")
    return peak / 2


def own_silhouettes(outputs: StageOutputs, views: int = 8, size: int = 64) -> Silhouettes:
    o = outputs.orbit
    cameras = orbit(views, o.radius, o.elevation, o.fov_x, size, o.center).to(outputs.renderer.aabb.device)
    rays = [cameras.image_rays(i) for i in range(views)]
    origins, dirs = torch.cat([r[0] for r in rays]), torch.cat([r[1] for r in rays])
    black = torch.zeros(3, device=origins.device)
    opacity = outputs.renderer.render_chunked(outputs.field, origins, dirs, black).opacity
    return Silhouettes(origins, dirs, opacity > 0.5)


def turntable_cameras(outputs: StageOutputs, preview: PreviewSettings) -> Cameras:
    o = outputs.orbit
    elevation = o.elevation if preview.elevation is None else preview.elevation
    return orbit(preview.turntable_frames, o.radius, elevation, o.fov_x, preview.size or o.size, o.center)


@torch.no_grad()
def write_turntable(run, outputs: StageOutputs, preview: PreviewSettings) -> None:
    cameras = turntable_cameras(outputs, preview).to(run.device)
    render = outputs.render_preview or outputs.render_view
    write_gif(run.path("turntable.gif"), [render(cameras, i) for i in range(len(cameras))])


def write_comparison(path: Path, preds: list[np.ndarray], truths: list[np.ndarray], count: int) -> None:
    k = min(count, len(preds))
    if k == 0:
        return
    grid = np.concatenate([np.concatenate(preds[:k], axis=1), np.concatenate(truths[:k], axis=1)], axis=0)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, to_uint8(grid), extension=".png")


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(-10 * np.log10(max(float(np.mean((pred - truth) ** 2)), 1e-10)))


def chamfer(mesh, truth_path: Path, samples: int = 100_000, seed: int = 0) -> float:
    """Symmetric Chamfer distance in units of the ground truth's bounding radius (half its
    bounding-box diagonal): the mean of both directions' mean distance from points sampled on one
    surface to the other *surface* (exact point-to-triangle distances, libigl's AABB tree).

    Why to the surface and not to the other side's samples: nearest-sample distances carry the
    sampling's own spacing, a floor of 0.0035 radii for 100 k samples on the toy (its mesh
    against itself), larger than the differences being measured. Surface distances have no
    floor: a mesh scores 0 against itself. Figures dated before 7 December (stop 28) in
    docs/benchmarks.md used samples on both sides."""
    import trimesh

    truth = trimesh.load(truth_path, force="mesh", process=False)
    radius = 0.5 * float(np.linalg.norm(truth.bounds[1] - truth.bounds[0]))
    a, _ = trimesh.sample.sample_surface(mesh, samples, seed=seed)
    b, _ = trimesh.sample.sample_surface(truth, samples, seed=seed + 1)
    return float(0.5 * (surface_distances(a, truth).mean() + surface_distances(b, mesh).mean()) / radius)


def surface_distances(points: np.ndarray, mesh) -> np.ndarray:
    """[N] distance from each point to the nearest point of ``mesh``'s triangles."""
    import igl

    squared, _, _ = igl.point_mesh_squared_distance(np.ascontiguousarray(points, dtype=np.float64),
                                                    np.ascontiguousarray(mesh.vertices, dtype=np.float64),
                                                    np.ascontiguousarray(mesh.faces, dtype=np.int64))
    return np.sqrt(squared)


def plain_view_renderer(renderer, field, background: torch.Tensor, offsets: int = 1,
                        supersample: int = 1, pixel_filter=None) -> ViewRenderer:
    """Draw a camera's image with ``renderer`` on a fixed background (what most loops want)."""

    def render(cameras: Cameras, index: int) -> np.ndarray:
        h, w = cameras.height, cameras.width
        origins, dirs = cameras.image_rays(index, supersample, pixel_filter)
        out = renderer.render_chunked(field, origins, dirs, background.to(origins.device), offsets=offsets)
        return pixel_means(out.rgb, h * w).reshape(h, w, 3).clamp(0, 1).cpu().numpy()

    return render


def fov_of(cameras: Cameras) -> float:
    return 2 * math.atan(0.5 * cameras.width / float(cameras.fx[0]))
