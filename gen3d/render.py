"""Volume rendering with empty-space skipping.

C = sum_i T_i a_i c_i,  a_i = 1 - exp(-sigma_i delta_i),  T_i = prod_{j<i} (1 - a_j),
and the background is composited with the remaining transmittance: C += (1 - sum_i w_i) * bg.

Two code paths, chosen by device:
- CPU (and CUDA without nerfacc's compiled extension): rays are marched at a fixed step inside
  the scene box, packed (each ray gets only the samples its chord through the box needs), samples
  in cells our own occupancy grid marks empty are dropped *before* the field is evaluated, and
  weights come from a packed exclusive sum in plain torch (``packed_weights``; nerfacc's packed
  scans need its CUDA extension, and its batched ones pad every ray to the longest, which
  wastes most of a step's rendering on padding). Optionally a cheap density-only pass first finds
  samples behind opaque surfaces (transmittance < early_stop) and skips them too.
- CUDA with nerfacc's extension: nerfacc's ``OccGridEstimator`` marches the occupancy grid in its
  kernel and renders packed samples (``nerfacc.rendering``).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Literal, Protocol

import nerfacc
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from gen3d.cameras import PixelFilter
from gen3d.colors import linear_to_srgb, srgb_to_linear


class RadianceField(Protocol):
    """What a representation must offer to be volume-rendered."""

    aabb: torch.Tensor  # [6]: xmin, ymin, zmin, xmax, ymax, zmax

    def density(self, x: torch.Tensor) -> torch.Tensor: ...  # [N,3] -> [N]
    def __call__(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...  # sigma, rgb


@dataclass
class RenderSettings:
    samples_per_diagonal: int = 160  # marching step = box diagonal / this
    occupancy_resolution: int = 64
    occupancy_every: int = 10  # steps between occupancy refreshes
    # Skip samples behind this transmittance. On the CPU path that costs a density-only pass,
    # which with few samples per ray costs more than it saves, so it is off by default.
    early_stop: float = 0.0
    occupancy_relative: float = 0.05  # a cell is occupied if alpha > this x the grid's 99th-percentile alpha
    occupancy_min_alpha: float = 1e-3
    # Rays per pixel side where a loop renders pixels: a pixel is the mean of s x s rays through
    # its sub-cells. Photos and renders are area averages; one ray per pixel cannot match them at
    # sharp edges however well it learns (assets' edge ceiling).
    supersample: int = 1
    # Rays per pixel side on silhouette pixels only (where the object's edge crosses the pixel):
    # there one ray per pixel errs most, and they are a few percent of an image, so s x s rays
    # on them cost little. Training finds them from the images' alpha, evaluation from the
    # field's own one-ray opacity (see plugins/reconstruct.py). 1: off.
    edge_supersample: int = 1
    # Where those rays go: the data's pixel filter (``cameras.PixelFilter``). "box" (width 1) is a
    # plain area average; Blender's Cycles renders with "blackman-harris", width 1.5 (its Filter
    # Size), which is wider and softer: silhouette rays placed for the wrong filter teach the
    # field edges in the wrong place.
    pixel_filter: Literal["box", "blackman-harris"] = "box"
    pixel_filter_width: float = 1.0
    # What a pixel's rays are averaged as: "linear" light, as Cycles and a camera's sensor add it
    # up (and the shipped data sets), or "srgb" numbers, for images filtered after encoding. An
    # edge pixel's colour differs between the two where the object's colour changes within it.
    filter_space: Literal["linear", "srgb"] = "linear"
    # Whole-image renderings (held-out views, previews) average this many renderings whose samples
    # sit at shifts of (i + 0.5) / n of a step. Training shifts each ray's samples at random, so
    # the field fits the average over shifts; one fixed shift shows the march's aliasing where a
    # ray grazes a thin part. Costs n x the
    # evaluation's samples, nothing in training.
    eval_offsets: int = 1

    def __post_init__(self) -> None:
        PixelFilter(self.pixel_filter, self.pixel_filter_width)  # raises on a bad kind or width
        if self.samples_per_diagonal < 8:
            raise ValueError("samples_per_diagonal must be at least 8")
        if self.occupancy_resolution < 4:
            raise ValueError("occupancy_resolution must be at least 4")
        if not 1 <= self.supersample <= 8:
            raise ValueError(f"supersample is rays per pixel side, 1 to 8; got {self.supersample}")
        if not 1 <= self.edge_supersample <= 8:
            raise ValueError(f"edge_supersample is rays per pixel side, 1 to 8; got {self.edge_supersample}")
        if not 1 <= self.eval_offsets <= 16:
            raise ValueError(f"eval_offsets is renderings averaged, 1 to 16; got {self.eval_offsets}")

    @property
    def filter(self) -> PixelFilter:
        return PixelFilter(self.pixel_filter, self.pixel_filter_width)


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [R,3], background composited
    opacity: torch.Tensor  # [R]
    depth: torch.Tensor  # [R], expected distance along the ray
    samples: int  # field evaluations made
    # Per evaluated sample, in the order the field (or shader) saw them: compositing weight and
    # ray index. Loops use them for per-sample regularisers (e.g. DreamFusion's orientation loss).
    weights: torch.Tensor | None = None
    ray_index: torch.Tensor | None = None
    distances: torch.Tensor | None = None  # each sample's distance along its ray (free-space losses)


def pixel_means(values: torch.Tensor, pixels: int, ray_pixel: torch.Tensor | None = None) -> torch.Tensor:
    """Average per pixel of values rendered per ray ([rays, C] -> [pixels, C]): by default
    pixel-major with s*s rays a pixel; given ``ray_pixel`` (each ray's pixel), any number a pixel."""
    if ray_pixel is None:
        return values.view(pixels, -1, values.shape[-1]).mean(dim=1)
    sums = values.new_zeros(pixels, values.shape[-1]).index_add(0, ray_pixel, values)
    counts = torch.bincount(ray_pixel, minlength=pixels).clamp_min(1)
    return sums / counts[:, None].to(values.dtype)


def filtered_means(rgb: torch.Tensor, opacity: torch.Tensor, background: torch.Tensor, pixels: int,
                   ray_pixel: torch.Tensor | None = None, space: str = "linear") -> torch.Tensor:
    """Per pixel, its rays' colours averaged as the images were filtered (``space``, see
    ``RenderSettings.filter_space``), arranged as :func:`pixel_means`. ``rgb`` [R, 3] is
    composited on ``background`` ([R, 3] or [3]; the same for all rays of a pixel), ``opacity``
    [R]. "linear": each ray's colour (un-composited) is decoded to linear light, weighed by its
    opacity and averaged; the mean is encoded back and composited on the pixel's background, as
    a straight-alpha image made by Blender is. A pixel of one ray, or of one colour, comes out as
    in "srgb"."""
    if space == "srgb":
        return pixel_means(rgb, pixels, ray_pixel)
    alpha = opacity[:, None]
    background = background.expand_as(rgb)
    color = ((rgb - background * (1 - alpha)) / alpha.clamp_min(1e-6)).clamp(0, 1)
    means = pixel_means(torch.cat([srgb_to_linear(color) * alpha, alpha, background], dim=1), pixels, ray_pixel)
    light, coverage, behind = means[:, :3], means[:, 3:4].clamp(0, 1), means[:, 4:]
    return linear_to_srgb((light / coverage.clamp_min(1e-6)).clamp(0, 1)) * coverage + behind * (1 - coverage)


def binary_entropy(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """-p log p - (1 - p) log(1 - p), elementwise (0 at 0 and 1, log 2 at 0.5): the loops'
    penalty on ray opacities that are neither a hit nor a miss."""
    p = p.clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def packed_exclusive_sum(values: torch.Tensor, ray: torch.Tensor, n_rays: int) -> torch.Tensor:
    """For samples grouped by ray (``ray`` sorted), the sum of the earlier samples' values on the
    same ray: one global cumulative sum minus its value where the ray's run starts. In float64,
    because the global sum over thousands of opaque rays is large and the difference is small."""
    if len(values) == 0:
        return values
    before = torch.cumsum(values.double(), 0) - values.double()
    count = torch.bincount(ray, minlength=n_rays)
    start = (torch.cumsum(count, 0) - count).clamp_max(len(values) - 1)
    return (before - before[start][ray]).to(values.dtype)


def packed_weights(optical_depth: torch.Tensor, ray: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Compositing weights w_i = T_i a_i of packed samples: a_i = 1 - exp(-sigma_i delta_i) and
    T_i = exp(-sum_{j<i} sigma_j delta_j) = prod_{j<i} (1 - a_j). nerfacc's packed version of this
    needs its CUDA extension; this is the same in plain torch, for the CPU."""
    transmittance = torch.exp(-packed_exclusive_sum(optical_depth, ray, n_rays))
    return transmittance * (1.0 - torch.exp(-optical_depth))


def packed_steps(origins: torch.Tensor, dirs: torch.Tensor, aabb: torch.Tensor, step: float,
                 offset: torch.Tensor, within: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances t = near + (k + offset) * step inside the box along each ray, packed: only as
    many per ray as its chord needs (not the longest ray's), sorted by ray; and each one's ray.
    ``within`` (a [6] box inside ``aabb``, e.g. around the occupied cells): only the steps that
    fall in it, at the very same distances (k counts from the entry into ``aabb`` still)."""
    near, far = ray_aabb(origins, dirs, aabb)
    first = torch.zeros_like(near)
    if within is not None:
        inner_near, inner_far = ray_aabb(origins, dirs, within)
        first = torch.ceil((inner_near - near) / step - offset).clamp_min(0)
        far = torch.where(inner_far > inner_near, torch.minimum(far, inner_far), near)
    count = torch.where(far > near, (torch.ceil((far - near) / step) - first).clamp_min(0), 0).long()
    ray = torch.repeat_interleave(torch.arange(len(origins), device=origins.device), count)
    k = torch.arange(len(ray), device=origins.device) - (torch.cumsum(count, 0) - count)[ray] + first.long()[ray]
    t = near[ray] + (k + offset[ray]) * step
    inside = t < far[ray]
    return t[inside], ray[inside]


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor, aabb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the box (exit <= entry: the ray misses)."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (aabb[:3] - origins) * inv
    t1 = (aabb[3:] - origins) * inv
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    return near, far


class OccupancyGrid:
    """A boolean grid over the scene box: cells whose density can matter."""

    def __init__(self, aabb: torch.Tensor, resolution: int):
        self.aabb = aabb
        self.resolution = resolution
        self.occupied = torch.ones((resolution,) * 3, dtype=torch.bool, device=aabb.device)

    @property
    def occupied(self) -> torch.Tensor:
        return self._occupied

    @occupied.setter
    def occupied(self, value: torch.Tensor) -> None:
        # The box around the occupied cells: rays march only through it (the same samples, none of
        # the empty margin's to generate and then drop).
        self._occupied = value
        cells = value.nonzero()
        if len(cells) == 0:
            self.bounds = self.aabb.clone()  # nothing occupied: empty either way
            return
        cell = (self.aabb[3:] - self.aabb[:3]) / self.resolution
        self.bounds = torch.cat([self.aabb[:3] + cells.min(0).values * cell,
                                 self.aabb[:3] + (cells.max(0).values + 1) * cell])

    def cell_index(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat cell index of each point, and whether the point is inside the box."""
        r = self.resolution
        g = (points - self.aabb[:3]) / (self.aabb[3:] - self.aabb[:3]) * r
        inside = ((g >= 0) & (g < r)).all(dim=-1)
        i = g.long().clamp(0, r - 1)
        return (i[..., 0] * r + i[..., 1]) * r + i[..., 2], inside

    def query(self, points: torch.Tensor) -> torch.Tensor:
        index, inside = self.cell_index(points)
        return self.occupied.view(-1)[index] & inside

    @torch.no_grad()
    def update(self, field: RadianceField, step_size: float, settings: RenderSettings) -> float:
        """Re-mark cells from the field's current density; returns the occupied fraction."""
        sigma = cell_max_density(field, self.resolution)
        alpha = 1.0 - torch.exp(-sigma * step_size)
        top = torch.quantile(alpha.reshape(-1)[:: max(1, alpha.numel() // 2_000_000)].float(), 0.99)
        threshold = max(settings.occupancy_min_alpha, settings.occupancy_relative * float(top))
        occupied = (alpha > threshold).float()[None, None]
        # Dilate by one cell: the max of a trilinear field can sit on a neighbour's face.
        self.occupied = F.max_pool3d(occupied, 3, stride=1, padding=1)[0, 0] > 0
        return float(self.occupied.float().mean())


def cell_max_density(field: RadianceField, resolution: int) -> torch.Tensor:
    """Max density inside each cell of a resolution^3 grid over the field's box.

    Fields may provide an exact ``cell_max_density``; otherwise we take the max over each
    cell's corners and midpoints (a (2r+1)^3 lattice), evaluated in chunks.
    """
    if hasattr(field, "cell_max_density"):
        return field.cell_max_density(resolution)
    aabb = field.aabb
    n = 2 * resolution + 1
    axes = [torch.linspace(float(aabb[i]), float(aabb[i + 3]), n, device=aabb.device) for i in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    sigma = torch.cat([field.density(chunk) for chunk in grid.split(1 << 18)]).reshape(1, 1, n, n, n)
    return F.max_pool3d(sigma, kernel_size=3, stride=2)[0, 0]


@functools.cache
def nerfacc_cuda_available() -> bool:
    """True when nerfacc's CUDA extension can be loaded (it compiles on first use, which needs
    nvcc and ninja and takes a few minutes once). ``GEN3D_NERFACC_CUDA=0`` turns it off, so a GPU
    run uses the torch-packed path (for comparison, or where the extension will not build)."""
    if not torch.cuda.is_available() or os.environ.get("GEN3D_NERFACC_CUDA", "1") == "0":
        return False
    try:
        from nerfacc.cuda import _backend  # builds or loads the extension
    except Exception as error:  # noqa: BLE001  (any build failure: fall back, but say so)
        reason = f"{type(error).__name__}: {error}"
    else:
        if _backend._C is not None:
            return True
        reason = "no CUDA toolkit (nvcc) to build it"  # nerfacc then leaves _C unset
    warnings.warn(f"nerfacc's CUDA extension is unavailable ({reason}); rendering on the GPU "
                  "with the slower torch-packed path", stacklevel=2)
    return False


class VolumeRenderer:
    """Renders rays through a field; owns the occupancy structure used for skipping."""

    def __init__(self, aabb: torch.Tensor, settings: RenderSettings, use_nerfacc_cuda: bool | None = None,
                 step_size: float | None = None):
        self.aabb = aabb
        self.settings = settings
        diagonal = float((aabb[3:] - aabb[:3]).norm())
        # A loop that shrinks the box keeps its marching step (and so the meaning of alpha per step).
        self.step_size = step_size or diagonal / settings.samples_per_diagonal
        if use_nerfacc_cuda is None:
            use_nerfacc_cuda = aabb.device.type == "cuda" and nerfacc_cuda_available()
        self.packed = use_nerfacc_cuda
        if self.packed:
            self.estimator = nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=settings.occupancy_resolution)
            self.estimator.to(aabb.device)
        else:
            self.occupancy = OccupancyGrid(aabb, settings.occupancy_resolution)

    @property
    def path(self) -> str:
        return "nerfacc-cuda-packed" if self.packed else "torch-packed"

    def update_occupancy(self, field: RadianceField, step: int) -> float | None:
        """Refresh the occupancy grid every ``occupancy_every`` steps; returns the occupied fraction."""
        if step % self.settings.occupancy_every:
            return None
        if self.packed:
            self.estimator.train()
            self.estimator.update_every_n_steps(
                step, occ_eval_fn=lambda x: field.density(x) * self.step_size, occ_thre=1e-2,
                n=self.settings.occupancy_every)
            return float(self.estimator.binaries.float().mean())
        return self.occupancy.update(field, self.step_size, self.settings)

    def occupied_cells(self) -> torch.Tensor:
        """The occupancy grid as a boolean [r, r, r] volume indexed x, y, z."""
        if self.packed:
            r = self.settings.occupancy_resolution
            return self.estimator.binaries[0].reshape(r, r, r)
        return self.occupancy.occupied

    def state_dict(self) -> dict:
        # The marching step goes with the occupancy: a field fitted at one step renders (and its
        # occupancy thresholds mean) what they did only at that step, and a loop that shrank its
        # box kept the old step (gen3d.runs rebuilds a trained field's renderer from this).
        if self.packed:
            return {"estimator": self.estimator.state_dict(), "step_size": self.step_size}
        return {"occupied": self.occupancy.occupied, "step_size": self.step_size}

    def load_state_dict(self, state: dict) -> None:
        if self.packed:
            self.estimator.load_state_dict(state["estimator"])
        else:
            self.occupancy.occupied = state["occupied"].to(self.aabb.device)

    def render(self, field: RadianceField, origins: torch.Tensor, dirs: torch.Tensor,
               background: torch.Tensor, stratified: bool = False, shader=None, offset: float = 0.5) -> RenderOutput:
        """Render rays; ``background`` is [3] or per ray [R,3]. Samples sit at ``offset`` of a
        step past each multiple of the step from the ray's entry into the box, or, ``stratified``,
        at a random offset per ray.

        ``shader(points, dirs, ray_index) -> (sigma, rgb)`` replaces ``field(points, dirs)`` for
        the samples that are evaluated: loops use it for shading modes (Lambertian, textureless).
        The occupancy structure still comes from ``field.density``.
        """
        if shader is None:
            shader = lambda points, d, ray_index: field(points, d)
        if self.packed:
            return self._render_packed(field, origins, dirs, background, stratified, shader, offset)
        return self._render_torch(field, origins, dirs, background, stratified, shader, offset)

    def render_chunked(self, field: RadianceField, origins: torch.Tensor, dirs: torch.Tensor,
                       background: torch.Tensor, chunk: int = 1 << 14, offsets: int = 1) -> RenderOutput:
        """Render many rays without gradients (whole images); ``background`` is [3] or per ray [R,3].
        ``offsets`` > 1: the mean of that many renderings at evenly spread sample offsets
        (``RenderSettings.eval_offsets``)."""
        outs = []
        backgrounds = background.split(chunk) if background.dim() == 2 else [background] * len(origins.split(chunk))
        with torch.no_grad():
            for o, d, bg in zip(origins.split(chunk), dirs.split(chunk), backgrounds):
                shifted = [self.render(field, o, d, bg, offset=(i + 0.5) / offsets) for i in range(offsets)]
                outs.append(RenderOutput(*(sum(getattr(r, k) for r in shifted) / offsets for k in ("rgb", "opacity", "depth")),
                                         sum(r.samples for r in shifted)))
        return RenderOutput(torch.cat([o.rgb for o in outs]), torch.cat([o.opacity for o in outs]),
                            torch.cat([o.depth for o in outs]), sum(o.samples for o in outs))

    def _render_torch(self, field, origins, dirs, background, stratified, shader, offset) -> RenderOutput:
        n_rays = origins.shape[0]
        with record_function("gen3d.render.march"):
            points, t_mid, ray = self._march(origins, dirs, stratified, offset)
        if self.settings.early_stop > 0 and len(ray):
            with record_function("gen3d.render.early_stop"):
                visible = self._visible(field, points, ray, n_rays)
                points, t_mid, ray = points[visible], t_mid[visible], ray[visible]
        with record_function("gen3d.render.field"):
            sigma, rgb_samples = shader(points, dirs[ray], ray)
        with record_function("gen3d.render.composite"):
            w = packed_weights(sigma * self.step_size, ray, n_rays)
            rgb = rgb_samples.new_zeros(n_rays, 3).index_add(0, ray, w[:, None] * rgb_samples)
            opacity = w.new_zeros(n_rays).index_add(0, ray, w)
            depth = w.new_zeros(n_rays).index_add(0, ray, w * t_mid)
            rgb = rgb + (1.0 - opacity)[:, None] * background
        return RenderOutput(rgb, opacity, depth, len(ray), w, ray, t_mid)

    def _march(self, origins, dirs, stratified, offset=0.5):
        """Fixed-step samples inside the box, packed (only as many per ray as its chord needs),
        kept where our occupancy grid marks the cell occupied: points, distances, ray indices."""
        n_rays = origins.shape[0]
        # Stratified: one random offset per ray, so a ray's samples stay evenly spaced.
        shift = torch.rand(n_rays, device=origins.device) if stratified else origins.new_full((n_rays,), offset)
        t_mid, ray = packed_steps(origins, dirs, self.aabb, self.step_size, shift, self.occupancy.bounds)
        points = origins[ray] + t_mid[:, None] * dirs[ray]
        keep = self.occupancy.query(points)
        return points[keep], t_mid[keep], ray[keep]

    @torch.no_grad()
    def _visible(self, field, points, ray, n_rays) -> torch.Tensor:
        """Density-only pass: which samples' transmittance is still above ``early_stop``."""
        optical = field.density(points).float() * self.step_size
        return torch.exp(-packed_exclusive_sum(optical, ray, n_rays)) > self.settings.early_stop

    def _render_packed(self, field, origins, dirs, background, stratified, shader, offset) -> RenderOutput:
        near, far = ray_aabb(origins, dirs, self.aabb)
        if not stratified:  # nerfacc puts its midpoints at t_min + (k + 0.5) step
            near = near + (offset - 0.5) * self.step_size

        def sigma_fn(t_starts, t_ends, ray_indices):
            x = origins[ray_indices] + dirs[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
            return field.density(x)

        def rgb_sigma_fn(t_starts, t_ends, ray_indices):
            x = origins[ray_indices] + dirs[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
            sigma, rgb = shader(x, dirs[ray_indices], ray_indices)
            return rgb, sigma

        self.estimator.train(stratified)  # nerfacc only jitters samples in training mode
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins, dirs, sigma_fn=sigma_fn, t_min=near, t_max=far.clamp_min(near),
            render_step_size=self.step_size, stratified=stratified,
            early_stop_eps=self.settings.early_stop)
        rgb, opacity, depth, extras = nerfacc.rendering(
            t_starts, t_ends, ray_indices, n_rays=origins.shape[0], rgb_sigma_fn=rgb_sigma_fn,
            render_bkgd=background)
        return RenderOutput(rgb, opacity[:, 0], depth[:, 0], int(ray_indices.numel()),
                            extras["weights"], ray_indices, (t_starts + t_ends) / 2)
