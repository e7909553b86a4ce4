"""Aligning an estimated relative inverse depth to the scene's depth on the pixels it knows.

A monocular estimator (``depth-anything``, DPT; :class:`gen3d.DepthMap`'s convention) gives
disparity up to an unknown scale and shift: ``1 / z = s * d + t``. ``align_depth`` finds s, t
from the pixels whose depth the scene already knows (the field's rendering where the views so
far see), then corrects what an affine map cannot, and converts the whole image to z-depth.

1. **Global scale and shift: iteratively reweighted least squares with Tukey's biweight.** The
   residual is the relative depth error to first order, ``z_ref * (s d + t) - 1``, so near and
   far pixels count alike (a plain disparity residual would let the nearest pixels decide). The
   known pixels hold gross outliers (disocclusions the field renders wrongly, mixed pixels at
   depth edges, the estimator's own mistakes): Tukey's weight is zero beyond 4.685 robust sigmas,
   so they end with no say at all, where Huber's weight would still give each a share that grows
   with its residual; and on exact data every weight is 1 and the fit is the exact least squares.
   A redescending weight needs a good start: a Theil-Sen-style median of pairwise slopes (random
   pixel pairs, seeded) and the median intercept, robust to nearly 30 % outliers. RANSAC would
   do too, but for two parameters the median start is deterministic and cheaper.
2. **Smooth local correction.** The log ratio of the reference depth to the aligned depth on the
   inlier pixels is averaged with a wide Gaussian on a coarse grid (normalised convolution:
   blur(w r) / max(blur(w), prior)), upsampled bilinearly and applied multiplicatively. The prior
   fades the correction toward zero where few known pixels are near (inside a large hole it fades
   to the global fit instead of extrapolating an edge's error). Exact affine data have zero
   residual, so the correction leaves them exact.

The alignment error reported is the median over the known pixels of ``|z - z_ref| / z_ref``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TUKEY_C = 4.685  # 95 % efficiency at Gaussian noise (the usual choice)
MAD_TO_SIGMA = 1.4826


@dataclass
class AlignConfig:
    iterations: int = 20
    pairs: int = 4096  # random pixel pairs for the robust start
    seed: int = 0
    local: bool = True  # apply the smooth local correction
    grid: int = 32  # the correction's coarse grid, cells along the longer side
    sigma_cells: float = 2.0  # its Gaussian's sigma, in cells
    prior: float = 0.05  # blurred known-pixel share below which the correction fades out
    min_pixels: int = 16
    max_depth_ratio: float = 20.0  # aligned depth is capped at this times the farthest known depth

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1; got {self.iterations}")
        if self.pairs < 16:
            raise ValueError(f"pairs must be >= 16; got {self.pairs}")
        if not 2 <= self.grid <= 512:
            raise ValueError(f"grid is cells along the longer side, 2 to 512; got {self.grid}")
        if self.sigma_cells <= 0 or self.prior <= 0:
            raise ValueError(f"sigma_cells and prior must be > 0; got {self.sigma_cells}, {self.prior}")
        if self.min_pixels < 3:
            raise ValueError(f"min_pixels must be >= 3; got {self.min_pixels}")
        if self.max_depth_ratio <= 1:
            raise ValueError(f"max_depth_ratio must be > 1; got {self.max_depth_ratio}")


@dataclass
class Alignment:
    depth: torch.Tensor  # [H, W] aligned z-depth, every pixel
    scale: float  # s of 1/z = s d + t
    shift: float  # t
    error: float  # median relative depth error on the known pixels, after the local correction
    global_error: float  # the same after the global fit alone
    inliers: float  # share of the known pixels with a non-zero Tukey weight


def robust_start(x: torch.Tensor, y: torch.Tensor, pairs: int, seed: int) -> tuple[float, float]:
    """(slope, intercept) of y ~ slope x + intercept: median of pairwise slopes, median intercept."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(len(x), (pairs,), generator=g)
    j = torch.randint(len(x), (pairs,), generator=g)
    dx = x[j] - x[i]
    ok = dx.abs() > 1e-12 * (x.abs().max() + 1e-30)
    if not ok.any():
        raise ValueError("align_depth: the estimated disparity is constant on the known pixels: nothing to fit")
    slope = ((y[j] - y[i])[ok] / dx[ok]).median()
    return float(slope), float((y - slope * x).median())


def fit_scale_shift(d: torch.Tensor, z: torch.Tensor, config: AlignConfig) -> tuple[float, float, torch.Tensor]:
    """IRLS with Tukey's biweight on ``z (s d + t) - 1`` (float64). Returns s, t and the final weights."""
    d, z = d.double(), z.double()
    s, t = robust_start(d, 1 / z, config.pairs, config.seed)
    design = torch.stack([z * d, z], -1)
    weights = torch.ones_like(z)
    for _ in range(config.iterations):
        residual = z * (s * d + t) - 1
        sigma = MAD_TO_SIGMA * (residual - residual.median()).abs().median()
        sigma = max(float(sigma), 1e-9)  # exact data: all inliers at weight 1
        u = (residual / (TUKEY_C * sigma)).clamp(-1, 1)
        weights = (1 - u * u) ** 2
        root = weights.sqrt()[:, None]
        solution = torch.linalg.lstsq(design * root, root[:, 0]).solution
        s_new, t_new = float(solution[0]), float(solution[1])
        converged = abs(s_new - s) <= 1e-12 * abs(s) + 1e-15 and abs(t_new - t) <= 1e-12 * abs(s) + 1e-15
        s, t = s_new, t_new
        if converged:
            break
    return s, t, weights


def local_correction(log_ratio: torch.Tensor, weights: torch.Tensor, config: AlignConfig) -> torch.Tensor:
    """[H, W] smooth log-depth correction from the residual ``log_ratio`` known where ``weights`` > 0."""
    height, width = log_ratio.shape
    cell = max(height, width) / config.grid
    size = (max(1, round(height / cell)), max(1, round(width / cell)))
    w = F.adaptive_avg_pool2d(weights[None, None], size)
    wr = F.adaptive_avg_pool2d((weights * log_ratio)[None, None], size)
    radius = math.ceil(3 * config.sigma_cells)
    x = torch.arange(-radius, radius + 1, dtype=w.dtype)
    kernel = torch.exp(-0.5 * (x / config.sigma_cells) ** 2)
    kernel = kernel / kernel.sum()

    def blur(a: torch.Tensor) -> torch.Tensor:  # separable Gaussian, zero beyond the image
        a = F.conv2d(F.pad(a, (radius, radius, 0, 0)), kernel.view(1, 1, 1, -1))
        return F.conv2d(F.pad(a, (0, 0, radius, radius)), kernel.view(1, 1, -1, 1))

    coarse = blur(wr) / blur(w).clamp_min(config.prior)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def relative_error(depth: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((depth - reference).abs() / reference).median())


def align_depth(estimated_disparity: torch.Tensor, reference_depth: torch.Tensor, mask: torch.Tensor,
                config: AlignConfig | None = None) -> Alignment:
    """Aligned z-depth [H, W] for the whole image from relative inverse depth [H, W], fitted on
    the ``mask`` [H, W] pixels where ``reference_depth`` (z-depth) is known. See the module docstring."""
    config = config or AlignConfig()
    if estimated_disparity.shape != reference_depth.shape or mask.shape != reference_depth.shape:
        raise ValueError(f"align_depth: shapes differ: estimate {list(estimated_disparity.shape)}, reference "
                         f"{list(reference_depth.shape)}, mask {list(mask.shape)}")
    known = mask.bool() & torch.isfinite(reference_depth) & (reference_depth > 0) & torch.isfinite(estimated_disparity)
    if int(known.sum()) < config.min_pixels:
        raise ValueError(f"align_depth: only {int(known.sum())} known pixels with a valid depth; "
                         f"at least {config.min_pixels} are needed")
    d, z = estimated_disparity.double(), reference_depth.double()
    s, t, weights = fit_scale_shift(d[known], z[known], config)
    if s <= 0:
        raise ValueError(f"align_depth: the best fit has scale {s:.3g} <= 0, so the estimate grows with depth: "
                         "it is not inverse depth (larger = nearer); a metric depth model?")
    floor = 1 / (config.max_depth_ratio * float(z[known].max()))  # disparity of the farthest allowed depth
    aligned = 1 / (s * d + t).clamp_min(floor)
    global_error = relative_error(aligned[known], z[known])
    if config.local:
        w = torch.zeros_like(z)
        w[known] = weights
        log_ratio = torch.zeros_like(z)
        log_ratio[known] = torch.log(z[known] / aligned[known])
        aligned = aligned * torch.exp(local_correction(log_ratio, w, config))
    error = relative_error(aligned[known], z[known])
    return Alignment(aligned.to(reference_depth.dtype), s, t, error, global_error, float((weights > 0).double().mean()))
