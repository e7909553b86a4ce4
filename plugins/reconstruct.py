"""``nerf-reconstruct``: fit a radiance field to posed images, evaluate held-out views, export a mesh."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.profiler import record_function

from gen3d import (Choice, Component, FieldLoop, FieldTrainer, HeldOutViews, Orbit, RenderSettings, Silhouettes,
                   StageOutputs, binary_entropy, choice, filtered_means, fov_of, hookimpl, pixel_means, quick_psnr)

@dataclass
class TrainSettings:
    rays_per_step: int = 4096
    # A random background colour per ray (when images have alpha) makes "empty" explicit:
    # the field cannot paint background colour into space, so surfaces come out crisp.
    random_background: bool = True
    # Rays through random points of their pixel, not its centre: images are area-averaged
    # (anti-aliased), so centre rays alone leave an error floor at every sharp edge.
    pixel_jitter: bool = False
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # for evaluation and RGB data
    # At this step the scene box shrinks to the occupied region plus a margin (a fraction of the
    # box's extent per side): the same grid over a tighter box is finer at the same cost per
    # sample. None keeps the data's box; representations without refit() keep it too.
    tighten_box_at: int | None = 350
    tighten_margin: float = 0.03
    # Share of each step's rays drawn in proportion to their pixel's last seen error (the rest
    # uniformly): training time goes where the renderings are still wrong, mostly edges.
    error_sampling: float = 0.0
    # Learning rates fall exponentially to this fraction of the field's own at the recipe's last
    # step (by step count, so resumed runs match straight ones): Adam at a fixed rate keeps every
    # voxel jittering around its optimum, which shows as grain in held-out views.
    lr_decay: float = 1.0
    # Weight of the binary entropy of each training ray's opacity (images with alpha only): a
    # ray meets an opaque object or misses it, so haze that lets each view draw the silhouette
    # its own way costs, while a silhouette pixel keeps its partial coverage from several rays
    # that each hit or miss. Thin objects, whose pixels are mostly silhouette, need it most.
    opacity_entropy: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay is the final fraction of the learning rate, in (0, 1]; got {self.lr_decay}")
        if self.opacity_entropy < 0:
            raise ValueError(f"opacity_entropy is a loss weight, 0 or more; got {self.opacity_entropy}")
        if not 0 <= self.error_sampling <= 1:
            raise ValueError(f"error_sampling is a share of the rays, between 0 and 1; got {self.error_sampling}")
        if self.rays_per_step < 1:
            raise ValueError(f"rays_per_step must be at least 1, got {self.rays_per_step}")
        if len(self.background) != 3:
            raise ValueError(f"background must be 3 numbers (RGB in 0..1), got {self.background}")


@dataclass
class ReconstructConfig:
    data: Choice = choice("dataset", "nerf-synthetic")
    representation: Choice = choice("representation", "grid-nerf")
    render: RenderSettings = field(default_factory=RenderSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    turntable_elevation: float = 25.0  # degrees; preview.elevation overrides it
    eval_views: int = 8  # held-out views used for the quick evaluations during training


NEEDS = ("radiance",)  # what the loop asks of its representation


class Reconstruct(FieldLoop):
    def __init__(self, config: ReconstructConfig, run):
        self.config, self.run = config, run
        device = run.device
        self.data = config.data.build()
        self.train_views = self.data.train.cameras.to(device)
        images = self.data.train.images.to(device)
        self.pixels = images.reshape(-1, 4)
        self.image_size = images.shape[1:3]
        aabb = self.data.aabb.to(device)
        self.trainer = FieldTrainer(run, config.representation, aabb, config.render, needs=NEEDS,
                                    lr_decay=config.train.lr_decay, loop_name="nerf-reconstruct")
        self.background = torch.tensor(config.train.background, device=device)
        self.filter_space = config.render.filter_space
        self.random_background = config.train.random_background and self.data.has_alpha
        self.opacity_entropy = config.train.opacity_entropy if self.data.has_alpha else 0.0
        self.pixel_error = torch.ones(len(self.pixels), device=device)  # last seen squared error per pixel
        # Pixels on or beside the silhouette (from the alpha) get render.edge_supersample rays a side.
        self.edge_supersample = config.render.edge_supersample if self.data.has_alpha else 1
        self.edge_pixels = near_silhouette(images[..., 3]).reshape(-1)
        self.edge_share = float(self.edge_pixels.float().mean())
        if self.data.has_alpha and not run.stage.init_from and hasattr(self.field, "carve"):
            self.field.carve(VisualHull(self.train_views, images[..., 3]))  # a field that can start from a solid
        if hasattr(self.field, "set_image_blur"):  # a field with a sharpness of its own (sdf-grid)
            centre = (aabb[:3] + aabb[3:]) / 2
            self.field.set_image_blur(config.render.filter.std() * self.train_views.pixel_size_at(centre))
        run.log(f"data: {len(self.data.train.names)} train / {len(self.data.test.names)} test views "
                f"{self.image_size[1]}x{self.image_size[0]}, box {aabb.tolist()}; renderer: {self.renderer.path}")

    # --- training ----------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        # record_function labels cost nothing unless a profiler runs (benchmarks/profile_step.py).
        with record_function("gen3d.occupancy"):
            if step == self.config.train.tighten_box_at:
                self.tighten_box(step)
            occupied = self.trainer.prepare(step)
        with record_function("gen3d.rays"):
            origins, dirs, target, background, index, ray_pixel = self.sample_rays(self.config.train.rays_per_step)
        with record_function("gen3d.render"):
            out = self.renderer.render(self.field, origins, dirs, background, stratified=True)
            rendered = filtered_means(out.rgb, out.opacity, background, len(target), ray_pixel, self.filter_space)
            squared = (rendered - target) ** 2
            mse = squared.mean()
            if self.config.train.error_sampling > 0:
                self.pixel_error[index] = squared.detach().mean(dim=1) + 1e-5  # a floor keeps every pixel in play
            loss = mse
            if self.opacity_entropy > 0:
                loss = loss + self.opacity_entropy * binary_entropy(out.opacity).mean()
            extra = self.trainer.regularizer(step)
            if extra is not None:
                loss = loss + extra
        with record_function("gen3d.backward"):
            self.trainer.backward(loss)
        with record_function("gen3d.optimizer"):
            self.trainer.optimizer_step(step)
        n = len(origins)
        metrics = {"loss": loss.item(), "psnr": -10 * math.log10(max(mse.item(), 1e-10)),
                   "samples_per_ray": out.samples / n}
        if occupied is not None:
            metrics["occupied"] = occupied
        return metrics

    @torch.no_grad()
    def tighten_box(self, step: int) -> None:
        occupied = object_cells(self.renderer.occupied_cells())
        if not occupied.any():
            return
        old = self.renderer.aabb
        cell = (old[3:] - old[:3]) / torch.tensor(occupied.shape, device=old.device)
        ijk = occupied.nonzero().to(old.device)
        margin = self.config.train.tighten_margin * (old[3:] - old[:3])
        low = torch.maximum(old[:3] + ijk.min(dim=0).values * cell - margin, old[:3])
        high = torch.minimum(old[:3] + (ijk.max(dim=0).values + 1) * cell + margin, old[3:])
        aabb = torch.cat([low, high])
        if float((high - low).prod() / (old[3:] - old[:3]).prod()) > 0.9:
            return  # hardly smaller: not worth a resample
        if self.trainer.refit(aabb, step):
            self.run.log(f"step {step}: scene box tightened to {[round(v, 3) for v in aabb.tolist()]}")

    def sample_rays(self, rays: int):
        """Random training pixels, s x s rays each (``render.supersample``; silhouette pixels
        ``render.edge_supersample``): rays, each ray's pixel, and per pixel the target colour
        composited on its random background [n]."""
        device = self.pixels.device
        s = self.config.render.supersample
        # ``rays`` counts rays, not pixels: as many pixels as give that many rays on average.
        per_pixel = s * s
        if self.edge_supersample > s:
            per_pixel += (self.edge_supersample ** 2 - s * s) * self.edge_share
        n = max(1, round(rays / per_pixel))
        index = torch.randint(len(self.pixels), (n,), generator=self.generator, device=device)
        share = self.config.train.error_sampling
        if share > 0:
            k = int(n * share)
            cdf = torch.cumsum(self.pixel_error, 0)
            u = torch.rand(k, generator=self.generator, device=device) * cdf[-1]
            index[:k] = torch.searchsorted(cdf, u).clamp_max(len(self.pixels) - 1)
        h, w = self.image_size
        cam, pixel = index // (h * w), index % (h * w)
        jitter = self.generator if self.config.train.pixel_jitter else None
        fine = self.edge_pixels[index] if self.edge_supersample > s else torch.zeros_like(index, dtype=torch.bool)
        origins, dirs, ray_pixel = self.train_views.mixed_pixel_rays(cam, pixel, fine, s, self.edge_supersample, jitter,
                                                                     self.config.render.filter)
        rgba = self.pixels[index]
        if self.random_background:
            background = torch.rand(n, 3, generator=self.generator, device=device)
        else:
            background = self.background.expand(n, 3)
        target = rgba[:, :3] * rgba[:, 3:] + background * (1 - rgba[:, 3:])
        return origins, dirs, target, background[ray_pixel], index, ray_pixel

    def state_dict(self) -> dict:
        return {**self.trainer.state_dict(), "pixel_error": self.pixel_error}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)
        self.pixel_error = state["pixel_error"].to(self.pixel_error.device)

    # --- evaluation and outputs --------------------------------------------------------------

    def render_view(self, cameras, index: int, offsets: int | None = None) -> np.ndarray:
        """One view as held-out views are scored: ``offsets`` renderings (default
        render.eval_offsets) averaged, silhouette pixels supersampled."""
        h, w, s = cameras.height, cameras.width, self.config.render.supersample
        origins, dirs = cameras.image_rays(index, s, self.config.render.filter)
        offsets = offsets or self.config.render.eval_offsets
        out = self.renderer.render_chunked(self.field, origins, dirs, self.background, offsets=offsets)
        rgb = filtered_means(out.rgb, out.opacity, self.background, h * w, None, self.filter_space)
        if self.edge_supersample > s:
            # Second pass: the pixels near the field's own silhouette, with edge_supersample rays.
            opacity = pixel_means(out.opacity[:, None], h * w).reshape(h, w)
            pixels = near_silhouette(opacity).reshape(-1).nonzero().squeeze(1)
            origins, dirs = cameras.pixel_rays(torch.full_like(pixels, index), pixels, self.edge_supersample,
                                               pixel_filter=self.config.render.filter)
            fine = self.renderer.render_chunked(self.field, origins, dirs, self.background, offsets=offsets)
            rgb[pixels] = filtered_means(fine.rgb, fine.opacity, self.background, len(pixels), None, self.filter_space)
        return rgb.reshape(h, w, 3).clamp(0, 1).cpu().numpy()

    def evaluate(self) -> dict[str, float]:
        return quick_psnr(self.run, self.outputs(None), self.config.eval_views)

    def outputs(self, train) -> StageOutputs:
        views = self.data.train.cameras
        radius = float(views.c2w[:, :3, 3].norm(dim=-1).mean())
        center = tuple(((self.data.aabb[:3] + self.data.aabb[3:]) / 2).tolist())
        metrics = {}
        if train is not None:
            metrics["samples_per_ray"] = round(train.last_metrics.get("samples_per_ray", float("nan")), 2)
        test = self.data.test
        return StageOutputs(
            field=self.field, renderer=self.renderer, render_view=self.render_view,
            orbit=Orbit(radius, fov_of(views), max(views.width, 64), self.config.turntable_elevation, center),
            held_out=HeldOutViews(test.cameras, test.images, self.config.train.background) if len(test.names) else None,
            silhouettes=self.silhouettes, ground_truth_mesh=self.data.ground_truth_mesh, metrics=metrics,
            # Turntable frames from one rendering each: a quarter of the cost at the default 4
            # eval_offsets, and a GIF preview shows no difference a score would.
            render_preview=lambda cameras, index: self.render_view(cameras, index, offsets=1))

    @torch.no_grad()
    def silhouettes(self, rays: int = 32768) -> Silhouettes:
        """Random training pixels drawn with a fixed seed (so a resumed run exports the same mesh),
        covered where their alpha is over 0.5 at the pixel centre; for images without alpha, where
        the field's own rendered opacity is."""
        device = self.pixels.device
        pick = torch.randint(len(self.pixels), (min(rays, len(self.pixels)),), device=device,
                             generator=torch.Generator(device=device).manual_seed(0))
        h, w = self.image_size
        origins, dirs = self.train_views.pixel_rays(pick // (h * w), pick % (h * w))
        if self.data.has_alpha:
            covered = self.pixels[pick, 3] > 0.5
        else:
            covered = self.renderer.render_chunked(self.field, origins, dirs, self.background).opacity > 0.5
        return Silhouettes(origins, dirs, covered)


class VisualHull:
    """``hull(points) -> [N] bool``: inside every training view's silhouette (alpha over 0.5 at the
    point's pixel, grown by one pixel so the hull holds the whole object) in each view that sees
    the point. The solid the images allow: fields with ``carve(inside)`` (sdf-grid) start from it."""

    def __init__(self, cameras, alpha: torch.Tensor):
        self.cameras = cameras
        self.mask = F.max_pool2d((alpha > 0.5).float()[:, None], 3, 1, 1)[:, 0] > 0  # [V, H, W]

    @torch.no_grad()
    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        c, inside = self.cameras, torch.ones(len(points), dtype=torch.bool, device=points.device)
        for v in range(len(c)):
            local = (points - c.c2w[v, :3, 3]) @ c.c2w[v, :3, :3]  # camera axes: x right, y up, looking down -z
            depth = -local[:, 2]
            u = c.cx[v] + c.fx[v] * local[:, 0] / depth
            w = c.cy[v] - c.fy[v] * local[:, 1] / depth
            seen = (depth > 0) & (u >= 0) & (u < c.width) & (w >= 0) & (w < c.height)
            covered = self.mask[v][w.clamp(0, c.height - 1).long(), u.clamp(0, c.width - 1).long()]
            inside &= ~seen | covered
        return inside


def near_silhouette(opacity: torch.Tensor, change: float = 0.1) -> torch.Tensor:
    """[..., H, W] pixels on or beside the object's silhouette: opacity (an image's alpha, or a
    one-ray rendering's opacity) changes by more than ``change`` within their 3x3 neighbourhood.
    Training marks them from the images' alpha and evaluation from the field's own opacity, so
    both must use this same rule: pixels trained with one centre ray but rendered with many lose
    what training fitted (docs/experiments.md)."""
    o = opacity.reshape(-1, 1, *opacity.shape[-2:])
    spread = F.max_pool2d(o, 3, 1, 1) + F.max_pool2d(-o, 3, 1, 1)
    return (spread > change).reshape(opacity.shape)


def object_cells(occupied: torch.Tensor) -> torch.Tensor:
    """Occupied cells without floaters: connected pieces smaller than 2% of the largest (and
    than 8 cells) are dropped, so a few stray cells near the box's corners cannot hold the box
    open. Separate parts of a real object are far larger than that and are kept."""
    labels, count = ndimage.label(occupied.cpu().numpy(), structure=np.ones((3, 3, 3)))
    if count == 0:
        return occupied.cpu()
    sizes = np.bincount(labels.ravel())[1:]
    keep = 1 + np.nonzero(sizes >= max(8, 0.02 * sizes.max()))[0]
    return torch.from_numpy(np.isin(labels, keep))


def build(config: ReconstructConfig, *, run) -> Reconstruct:
    return Reconstruct(config, run)


@hookimpl
def gen3d_loops():
    return [Component("nerf-reconstruct", build, ReconstructConfig,
                      "fit a radiance field to posed images; PSNR on held-out views; mesh export", needs=NEEDS)]
