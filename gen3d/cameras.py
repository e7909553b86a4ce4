"""Pinhole cameras: camera-to-world 4x4 in OpenGL axes (x right, y up, looking down -z), world Z up."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass
class Cameras:
    c2w: torch.Tensor  # [N, 4, 4]
    fx: torch.Tensor  # [N]
    fy: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    width: int
    height: int

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device: torch.device | str) -> Cameras:
        t = lambda x: x.to(device)
        return Cameras(t(self.c2w), t(self.fx), t(self.fy), t(self.cx), t(self.cy), self.width, self.height)

    def __getitem__(self, index) -> Cameras:
        pick = lambda x: x[index].reshape(-1, *x.shape[1:])
        return Cameras(pick(self.c2w), pick(self.fx), pick(self.fy), pick(self.cx), pick(self.cy),
                       self.width, self.height)

    def finer(self, factor: int) -> Cameras:
        """The same views with ``factor`` times the pixels along each side (focal lengths and
        principal points in the finer pixels)."""
        return Cameras(self.c2w, self.fx * factor, self.fy * factor, self.cx * factor, self.cy * factor,
                       self.width * factor, self.height * factor)

    def pixel_size_at(self, point: torch.Tensor) -> float:
        """The width of one pixel, in world units, at ``point`` [3] (a pixel's angle times the
        distance), averaged over the cameras."""
        distance = (self.c2w[:, :3, 3] - point.to(self.c2w)).norm(dim=-1)
        return float((distance / self.fx).mean())

    def rays(self, cam: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World-space rays through pixel positions (u right, v down, in pixels; +0.5 is a pixel centre)."""
        x = (u - self.cx[cam]) / self.fx[cam]
        y = -(v - self.cy[cam]) / self.fy[cam]  # image v grows downwards, camera y upwards
        dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)
        rot = self.c2w[cam, :3, :3]
        dirs = torch.einsum("nij,nj->ni", rot, dirs_cam)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.c2w[cam, :3, 3]
        return origins, dirs

    def pixel_rays(self, cam: torch.Tensor, pixel: torch.Tensor, supersample: int = 1,
                   generator: torch.Generator | None = None, pixel_filter: PixelFilter | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays through pixels (``pixel``: row-major index in camera ``cam``'s image), s x s a
        pixel at the pixel filter's strata (see ``subpixel_offsets``); pixel-major
        [len(pixel)*s*s], so ``reshape(-1, s*s, ...)`` groups a pixel's rays."""
        offsets = subpixel_offsets(len(pixel), supersample, pixel.device, generator, pixel_filter)
        u = (pixel % self.width)[:, None] + offsets[..., 0]
        v = (pixel // self.width)[:, None] + offsets[..., 1]
        return self.rays(cam.repeat_interleave(supersample * supersample), u.reshape(-1), v.reshape(-1))

    def mixed_pixel_rays(self, cam: torch.Tensor, pixel: torch.Tensor, fine: torch.Tensor, supersample: int,
                         fine_supersample: int, generator: torch.Generator | None = None,
                         pixel_filter: PixelFilter | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pixel_rays`` with s x s rays a pixel, but f x f on the pixels marked ``fine``; also
        each ray's position in ``pixel`` (for ``render.pixel_means``)."""
        position = torch.arange(len(pixel), device=pixel.device)
        origins, dirs, ray_pixel = [], [], []
        for mask, s in ((~fine, supersample), (fine, fine_supersample)):
            o, d = self.pixel_rays(cam[mask], pixel[mask], s, generator, pixel_filter)
            origins.append(o)
            dirs.append(d)
            ray_pixel.append(position[mask].repeat_interleave(s * s))
        return torch.cat(origins), torch.cat(dirs), torch.cat(ray_pixel)

    def image_rays(self, index: int, supersample: int = 1,
                   pixel_filter: PixelFilter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All rays of one camera, row-major pixels, s x s rays a pixel (see ``pixel_rays``)."""
        dev = self.c2w.device
        pixels = torch.arange(self.height * self.width, device=dev)
        return self.pixel_rays(torch.full_like(pixels, index), pixels, supersample, pixel_filter=pixel_filter)


@dataclass(frozen=True)
class PixelFilter:
    """How an image's pixel weighs the scene around its centre (separable: w(x) w(y), x and y
    in pixels). A pixel's value is the filter-weighted mean of the rays through it.

    ``box``, width 1: the pixel's own square, a plain area average (``assets/make_dataset.py``
    before it matched Blender). ``blackman-harris``: Blender Cycles' default film filter, with
    ``width`` as Blender's Filter Size (default 1.5 px); Cycles spreads the window over twice
    that, 3 px: a Cycles render's alpha matches the ground truth's coverage filtered so, and not
    a box-filtered coverage (docs/experiments.md).
    """

    kind: str = "box"
    width: float = 1.0

    KINDS = ("box", "blackman-harris")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"pixel filter must be one of {', '.join(self.KINDS)}; got {self.kind!r}")
        if not 0 < self.width <= 4:
            raise ValueError(f"pixel filter width is in pixels, above 0 and at most 4; got {self.width}")

    def offsets(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse of the filter's cumulative distribution: offsets from the pixel centre (pixels)
        for u in [0, 1]. Evenly spaced u give offsets that each stand for an equal share of the
        filter's weight, so equal-weight rays there approximate the filtered pixel."""
        if self.kind == "box":
            return (u - 0.5) * self.width
        x, cdf = _blackman_harris_cdf(2 * self.width, u.device)
        i = torch.searchsorted(cdf, u.clamp(0, 1).contiguous()).clamp(1, len(cdf) - 1)
        t = (u - cdf[i - 1]) / (cdf[i] - cdf[i - 1]).clamp_min(1e-12)
        return x[i - 1] + t * (x[i] - x[i - 1])

    def std(self) -> float:
        """The standard deviation of the filter's weight along one axis, in pixels: how far it
        blurs an edge (box of width 1: 0.29; Blackman-Harris at Filter Size 1.5: 0.42)."""
        if self.kind == "box":
            return self.width / math.sqrt(12)
        x = torch.linspace(-self.width, self.width, 4001, dtype=torch.float64)
        w = blackman_harris(x, 2 * self.width)
        return float(((w * x * x).sum() / w.sum()).sqrt())

    def matrix(self, size: int, supersample: int, device=None) -> torch.Tensor:
        """[size, size * supersample]: each pixel's normalised weights over the sample centres
        of one image axis rendered ``supersample`` times finer. The filter is separable, so a
        fine image I becomes ``W @ I @ W.T`` (samples beyond the border are not there: the
        weights of the border pixels are renormalised over those that are)."""
        samples = (torch.arange(size * supersample, dtype=torch.float64, device=device) + 0.5) / supersample
        x = samples[None, :] - (torch.arange(size, dtype=torch.float64, device=device)[:, None] + 0.5)
        if self.kind == "box":
            w = (x.abs() <= self.width / 2).double()
        else:
            w = blackman_harris(x, 2 * self.width)
        return (w / w.sum(1, keepdim=True).clamp_min(1e-12)).float()


def blackman_harris(x: torch.Tensor, support: float) -> torch.Tensor:
    """The (unnormalised) Blackman-Harris window spanning [-support/2, support/2], zero outside."""
    phase = 2 * math.pi * (x / support + 0.5)
    w = 0.35875 - 0.48829 * torch.cos(phase) + 0.14128 * torch.cos(2 * phase) - 0.01168 * torch.cos(3 * phase)
    return torch.where(x.abs() <= support / 2, w, torch.zeros_like(w))


@functools.lru_cache(maxsize=8)  # one table per (support, device): every training step asks
def _blackman_harris_cdf(support: float, device, n: int = 2049) -> tuple[torch.Tensor, torch.Tensor]:
    """The Blackman-Harris window over [-support/2, support/2], as a tabulated cumulative distribution."""
    x = torch.linspace(-support / 2, support / 2, n, dtype=torch.float64)
    w = blackman_harris(x, support)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((w[1:] + w[:-1]) / 2, 0)])
    return x.float().to(device), (cdf / cdf[-1]).float().to(device)


def subpixel_offsets(pixels: int, s: int, device=None, generator: torch.Generator | None = None,
                     pixel_filter: PixelFilter | None = None) -> torch.Tensor:
    """[pixels, s*s, 2] ray positions in pixel units (0.5, 0.5 is the pixel's centre): per axis,
    the filter split into s strata of equal weight, a ray at each stratum's middle, or, given a
    generator, at a random point of it (so the rays stay spread over the filter). The default,
    a box of width 1, puts them at the centres of the pixel's s x s sub-cells."""
    pixel_filter = pixel_filter or PixelFilter()
    strata = (torch.arange(s, device=device, dtype=torch.float32) + 0.5) / s
    grid = torch.stack(torch.meshgrid(strata, strata, indexing="xy"), dim=-1).reshape(1, s * s, 2)
    if generator is None:
        u = grid.expand(pixels, s * s, 2)
    else:
        u = grid + (torch.rand(pixels, s * s, 2, generator=generator, device=device) - 0.5) / s
    return 0.5 + pixel_filter.offsets(u)


def focal_from_fov(fov_x: float, width: int) -> float:
    return 0.5 * width / math.tan(0.5 * fov_x)


def look_at(eye: torch.Tensor, target: torch.Tensor, up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """Camera-to-world matrix of a camera at ``eye`` looking at ``target``, world ``up`` kept up."""
    forward = target - eye
    forward = forward / forward.norm()
    up_vec = torch.tensor(up, dtype=eye.dtype)
    right = torch.linalg.cross(forward, up_vec)
    if right.norm() < 1e-6:  # looking straight up or down: any right vector will do
        right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype))
    right = right / right.norm()
    cam_up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4, dtype=eye.dtype)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, -forward, eye
    return c2w


def orbit(n: int, radius: float, elevation_deg: float, fov_x: float, size: int,
          center=(0.0, 0.0, 0.0)) -> Cameras:
    """``n`` cameras on a turntable circle around ``center`` (Z up), for previews."""
    target = torch.tensor(center, dtype=torch.float32)
    elev = math.radians(elevation_deg)
    poses = []
    for i in range(n):
        azim = 2 * math.pi * i / n
        offset = torch.tensor([math.cos(azim) * math.cos(elev), math.sin(azim) * math.cos(elev), math.sin(elev)])
        poses.append(look_at(target + radius * offset, target))
    f = torch.full((n,), focal_from_fov(fov_x, size))
    c = torch.full((n,), size / 2)
    return Cameras(torch.stack(poses), f, f.clone(), c, c.clone(), size, size)


@dataclass
class ViewSample:
    """Random cameras around an object, with the angles prompts are conditioned on."""

    cameras: Cameras
    azimuth: torch.Tensor  # [N] degrees, 0 = looking along -x from +x (the object's front), ccw from above
    elevation: torch.Tensor  # [N] degrees above the horizon
    distance: torch.Tensor  # [N]


def random_views(n: int, size: int, elevation: tuple[float, float], azimuth: tuple[float, float],
                 distance: tuple[float, float], fov: tuple[float, float], generator: torch.Generator,
                 center=(0.0, 0.0, 0.0)) -> ViewSample:
    """``n`` cameras looking at ``center`` with angles, distances and fields of view uniform in the ranges."""

    def uniform(bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(n, generator=generator)

    elev, azim, dist, fov_deg = uniform(elevation), uniform(azimuth), uniform(distance), uniform(fov)
    target = torch.tensor(center, dtype=torch.float32)
    poses = []
    for e, a, d in zip(torch.deg2rad(elev), torch.deg2rad(azim), dist):
        offset = torch.stack([torch.cos(a) * torch.cos(e), torch.sin(a) * torch.cos(e), torch.sin(e)])
        poses.append(look_at(target + d * offset, target))
    focal = 0.5 * size / torch.tan(0.5 * torch.deg2rad(fov_deg))
    c = torch.full((n,), size / 2)
    cameras = Cameras(torch.stack(poses), focal, focal.clone(), c, c.clone(), size, size)
    return ViewSample(cameras, (azim + 180) % 360 - 180, elev, dist)
