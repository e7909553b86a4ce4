"""Depth-image-based warping: forward splatting with a z-buffer, hole masks, pinhole closing.

Each source pixel's centre is lifted to its 3-D point (z-depth) and projected into the
destination camera; it lands in the destination pixel that contains its projection (and those
its footprint covers, below), and where several land in one pixel the nearest wins (a z-buffer:
one vectorised ``scatter_reduce`` 'amin', then the lowest source index among exact ties, so the
result is deterministic). Pixels nothing landed on are holes.

Forward splatting with one point a pixel leaves sampling gaps where the destination sees a
surface magnified (nearer, or turned toward it): a regular grid of empty pixels, some filled by
a point of the surface behind, seen through the gap. Two steps close them, and only them:

1. **Footprints** (``footprints``): each source pixel covers every destination pixel centre in
   the box its neighbours' projections span, half the distance to them each way (at most
   ``max_footprint`` px), so a magnified surface stays closed and its points win the z-buffer
   over whatever lies behind. Neighbours across a depth edge (relative change above
   ``edge_tolerance``) are left out, so a footprint never stretches across a disocclusion.
   Warping a view to its own pose, every footprint is its own pixel: the identity.
2. **Pinholes** (``close_pinholes``): one 3x3 step for what is left (magnified beyond the
   footprints' reach, grazing surfaces): an empty pixel whose ``min_neighbours`` nearest
   neighbours (of 8) lie on one surface (depths within ``depth_tolerance`` of each other) takes
   their mean colour and depth. The rim of a real hole touches at most 5 covered neighbours, or
   two surfaces at different depths, so it stays a hole for the inpainter.

We wrote both ourselves: morphological closing (OpenCV, scikit-image) works on binary masks and
would also shrink real holes and bridge depth edges; the depth tests are what tell a sampling
gap from a disocclusion. Rasterising the depth map as a triangle mesh would close gaps too, at
the cost of a rasteriser and of stretched triangles to cut at every depth edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gen3d.cameras import Cameras

from .pinhole import project, single, unproject


@dataclass
class SplatConfig:
    footprints: bool = True  # see the module docstring for both steps
    max_footprint: float = 1.0  # px; magnification up to 2x is closed, beyond it gaps stay holes
    # Neighbours 10 % apart in depth are one surface for the footprint: a floor seen at a slant
    # changes that much between pixels only near its horizon, an object's edge far more.
    edge_tolerance: float = 0.1
    close_pinholes: bool = True
    # 6 of 8: a one-pixel crack (3 neighbours either side) or an isolated pinhole closes; the
    # straight rim of a real hole (3 covered neighbours) or its corner (5) does not.
    min_neighbours: int = 6
    depth_tolerance: float = 0.03  # neighbours within 3 % of each other are one surface
    near: float = 1e-4  # points closer to the destination camera than this (z-depth) are dropped

    def __post_init__(self) -> None:
        if not 0.5 <= self.max_footprint <= 4:
            raise ValueError(f"max_footprint is pixels, 0.5 to 4; got {self.max_footprint}")
        if not 0 < self.edge_tolerance < 1:
            raise ValueError(f"edge_tolerance is relative, between 0 and 1; got {self.edge_tolerance}")
        if not 1 <= self.min_neighbours <= 8:
            raise ValueError(f"min_neighbours counts of the 8 neighbours, 1 to 8; got {self.min_neighbours}")
        if not 0 < self.depth_tolerance < 1:
            raise ValueError(f"depth_tolerance is relative, between 0 and 1; got {self.depth_tolerance}")
        if self.near <= 0:
            raise ValueError(f"near must be > 0 (z-depth); got {self.near}")


@dataclass
class Warped:
    image: torch.Tensor  # [H, W, C] colours in the destination; 0 where not valid
    depth: torch.Tensor  # [H, W] z-depth in the destination camera; inf where not valid
    valid: torch.Tensor  # [H, W] bool: a point landed (or a pinhole was closed) there

    def __iter__(self):  # (image, depth, valid) = warp(...)
        return iter((self.image, self.depth, self.valid))

    @property
    def holes(self) -> torch.Tensor:
        return ~self.valid


def _half_extent(u: torch.Tensor, v: torch.Tensor, depth: torch.Tensor, usable: torch.Tensor,
                 config: SplatConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per source pixel [H, W]: half the destination box (u, v) its same-surface neighbours span."""
    extents = []
    for coord in (u, v):
        along = []
        for axis in (0, 1):  # neighbours down/up, then right/left
            steps = []
            for shift in (1, -1):
                other = torch.roll(coord, shift, axis)
                same = torch.roll(usable, shift, axis) & usable
                same &= (torch.roll(depth, shift, axis) - depth).abs() <= config.edge_tolerance * depth
                border = torch.zeros_like(usable)
                border.select(axis, 0 if shift == 1 else -1).fill_(True)  # roll wraps round: not a neighbour
                steps.append(torch.where(same & ~border, (other - coord).abs(), torch.zeros_like(coord)))
            along.append(torch.maximum(*steps))
        extents.append((0.5 * (along[0] + along[1])).clamp(0.5, config.max_footprint))
    return extents[0], extents[1]


def fragments(points: torch.Tensor, usable: torch.Tensor, camera: Cameras, config: SplatConfig
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The destination pixels a grid of world points [H, W, 3] (``usable`` [H, W]) covers in
    ``camera``: (pixel index, z-depth, source index into the flattened grid), one row each."""
    u, v, z = project(points, camera)
    src_depth = torch.where(usable, z, torch.ones_like(z))
    ok = usable & (z > config.near)
    if config.footprints:
        ru, rv = _half_extent(u, v, src_depth, ok, config)
        reach = math.ceil(config.max_footprint)
    else:
        ru = rv = torch.full_like(u, 0.5)
        reach = 0
    source = ok.reshape(-1).nonzero().squeeze(1)
    u, v, z, ru, rv = (t.reshape(-1)[source] for t in (u, v, z, ru, rv))
    col0, row0 = torch.floor(u), torch.floor(v)
    width, height = camera.width, camera.height
    pixels, depths, sources = [], [], []
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            col, row = col0 + dx, row0 + dy
            # Centres inside [u - r, u + r): with r = 0.5 exactly the pixel u falls in.
            inside = (col + 0.5 >= u - ru) & (col + 0.5 < u + ru) & (row + 0.5 >= v - rv) & (row + 0.5 < v + rv)
            inside |= (dx == 0) & (dy == 0)  # a point always covers the pixel it falls in
            inside &= (col >= 0) & (col < width) & (row >= 0) & (row < height)
            pixels.append((row[inside] * width + col[inside]).long())
            depths.append(z[inside])
            sources.append(source[inside])
    return torch.cat(pixels), torch.cat(depths), torch.cat(sources)


def zbuffer(pixels: torch.Tensor, depths: torch.Tensor, sources: torch.Tensor, colours: torch.Tensor | None,
            camera: Cameras, config: SplatConfig) -> Warped:
    """Resolve fragments: the nearest wins each pixel (then the lowest source index among exact ties)."""
    height, width = camera.height, camera.width
    zbuf = torch.full((height * width,), torch.inf, dtype=depths.dtype)
    zbuf.scatter_reduce_(0, pixels, depths, reduce="amin")
    wins = depths == zbuf[pixels]
    none = torch.iinfo(torch.long).max
    winner = torch.full((height * width,), none, dtype=torch.long)
    winner.scatter_reduce_(0, pixels[wins], sources[wins], reduce="amin")
    valid = winner != none
    channels = 0 if colours is None else colours.shape[-1]
    image = torch.zeros(height * width, channels, dtype=torch.float32 if colours is None else colours.dtype)
    if colours is not None:
        image[valid] = colours[winner[valid]]
    warped = Warped(image.reshape(height, width, channels), zbuf.reshape(height, width), valid.reshape(height, width))
    return close_pinholes(warped, config) if config.close_pinholes else warped


def _points(depth: torch.Tensor, camera: Cameras, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    usable = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        usable &= valid.bool()
    return unproject(torch.where(usable, depth, torch.ones_like(depth)), camera), usable


def warp(image: torch.Tensor, depth: torch.Tensor, src_camera: Cameras, dst_camera: Cameras,
         valid: torch.Tensor | None = None, config: SplatConfig | None = None) -> Warped:
    """``image`` [H, W, C] with z-depth ``depth`` [H, W] seen by ``src_camera``, as
    ``dst_camera`` sees it: (image, depth, valid). ``valid`` [H, W]: source pixels to use
    (default: those with finite, positive depth)."""
    config = config or SplatConfig()
    points, usable = _points(depth, single(src_camera, "src_camera"), valid)
    dst = single(dst_camera, "dst_camera")
    return zbuffer(*fragments(points, usable, dst, config), image.reshape(-1, image.shape[-1]), dst, config)


def coverage(depths: list[torch.Tensor], cameras: list[Cameras], camera: Cameras,
             config: SplatConfig | None = None) -> Warped:
    """Every view so far (z-depth maps and their cameras) splatted together into ``camera``:
    one z-buffer, so ``.depth`` is the nearest known surface and ``.holes`` what none of them sees."""
    if len(depths) != len(cameras):
        raise ValueError(f"coverage: {len(depths)} depth maps but {len(cameras)} cameras")
    config, dst = config or SplatConfig(), single(camera)
    parts, offset = [], 0
    for depth, cam in zip(depths, cameras):
        pixels, z, sources = fragments(*_points(depth, single(cam), None), dst, config)
        parts.append((pixels, z, sources + offset))
        offset += depth.numel()
    if not parts:
        return zbuffer(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long), None,
                       dst, config)
    return zbuffer(*(torch.cat(p) for p in zip(*parts)), None, dst, config)


def holes(depths: list[torch.Tensor], cameras: list[Cameras], camera: Cameras,
          config: SplatConfig | None = None) -> torch.Tensor:
    """[H, W] bool: the pixels of ``camera`` that no view so far sees (``~covered``)."""
    return coverage(depths, cameras, camera, config).holes


def close_pinholes(warped: Warped, config: SplatConfig) -> Warped:
    """One 3x3 step that closes the empty pinholes and cracks left inside a surface (module docstring)."""
    height, width, channels = warped.image.shape
    depth = warped.depth
    neighbours = _neighbours(depth[None], torch.inf)[0]  # [8, H, W]
    ordered, _ = neighbours.sort(dim=0)
    nearest, kth = ordered[0], ordered[config.min_neighbours - 1]
    surface = torch.isfinite(kth) & (kth <= nearest * (1 + config.depth_tolerance))
    fill = surface & ~warped.valid
    if not fill.any():
        return warped
    member = (neighbours <= kth * (1 + 1e-6)) & torch.isfinite(neighbours)  # the surface's neighbours
    count = member.sum(0).clamp_min(1)
    new_depth = torch.where(member, neighbours, torch.zeros_like(neighbours)).sum(0) / count
    image, valid = warped.image, warped.valid | fill
    if channels:
        colours = _neighbours(image.permute(2, 0, 1), 0.0)  # [C, 8, H, W]
        mean = (colours * member[None]).sum(1) / count[None]
        image = torch.where(fill[..., None], mean.permute(1, 2, 0).to(image.dtype), image)
    return Warped(image, torch.where(fill, new_depth, depth), valid)


OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _neighbours(values: torch.Tensor, pad: float) -> torch.Tensor:
    """[C, H, W] -> the 8 neighbours of each pixel, [C, 8, H, W]; ``pad`` beyond the border."""
    channels, height, width = values.shape
    padded = F.pad(values[None], (1, 1, 1, 1), value=pad)[0]
    return torch.stack([padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width] for dy, dx in OFFSETS], 1)
