"""``sdf-grid``: a signed distance field on the grid-nerf voxel grid, rendered as in NeuS.

Column 0 of grid-nerf's channels-last table holds the signed distance f (world units, negative
inside), the other columns SH colour; lookups, row-sparse gradients, RowAdam, coarse-to-fine
growth and box refits are grid-nerf's (:class:`GridNeRF`).

Rendering (NeuS, Wang et al. 2021). The renderer is fixed: it takes a density sigma per sample
and composites alpha = 1 - exp(-sigma * step) at the step the field was built with. NeuS's
continuous density rho = max(-(d/dt) Phi_s(f) / Phi_s(f), 0), with Phi_s(f) = sigmoid(s f),
integrated over one marching section gives the discrete alpha of its eq. 13,

    alpha_i = max((Phi_s(f_prev) - Phi_s(f_next)) / Phi_s(f_prev), 0),

and NeuS's reference code (Totoro97/NeuS, models/renderer.py) estimates the section's end values
from the sample's own value and slope: f_prev/next = f -/+ cos * step / 2, cos = grad f . d
(clipped to <= 0, "iter_cos", with its cos annealing). We use exactly that per sample and hand
the renderer its optical depth, written stably with log-sigmoids:

    sigma * step = -log(1 - alpha) = max(log Phi_s(f_prev) - log Phi_s(f_next), 0).

Why the section form rather than rho at the sample times the step: the section form is exact
for a planar surface at any s * step, so the surface is unbiased also when s grows far past
1 / step (a sharp, opaque surface between two samples); the point form saturates there and puts
the opacity at whichever sample lands nearest.

The slope comes with the value from the same eight corners (:class:`TrilinearWithGradient`),
and is trained through (NeuS does too). s is a learned scalar (``log_s``, its own learning
rate), saved with the table in ``state_dict_plain`` and checkpoints. Regularisers: the eikonal
loss (|grad f| - 1)^2 on the render samples of the step (their gradients are already computed),
and a curvature penalty (second differences of f) on grid vertices next to those samples. The
same lookup gathers the curvature stencils, so the step's whole table gradient is one row-sparse
tensor: autograd adding two sparse gradients costs a quarter of a CPU step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from gen3d import Component, hookimpl
from gen3d_plugins.grid_field import GridNeRF, GridNeRFConfig, RowAdam, sh_basis

# The occupancy grid may skip samples deeper inside than where a ray that crossed the surface
# has transmittance below this (Phi_s(f) / Phi_s(0) for a planar SDF): they cannot show.
HIDDEN_TRANSMITTANCE = 1e-4


@dataclass
class SDFGridConfig(GridNeRFConfig):
    """grid-nerf's settings (resolutions, upsample_at, sh_degree, lr, betas, tv_weight) plus the
    SDF's. grid-nerf's density settings (init_alpha, blob_density, density_lr) mean nothing to an
    SDF and are ignored, so a recipe written for grid-nerf runs with ``type: sdf-grid``."""

    sdf_lr: float = 0.005  # signed distances, world units a step (RMSprop-normalised steps)
    # Start: a sphere at the box centre, radius relative to the box's smallest half size (None:
    # blob_radius, so text-to-3D recipes written for grid-nerf's ball start from the same ball).
    # "hull": the visual hull of the training silhouettes where the loop has them (nerf-reconstruct
    # with alpha; see carve()), the sphere elsewhere. Carving a sphere down to the object from the
    # images alone takes most of a CPU budget; the hull has the object's outline from step 0.
    init: Literal["sphere", "hull"] = "sphere"
    sphere_radius: float | None = None
    init_s: float = 20.0  # NeuS's initial inverse standard deviation (its exp(10 * 0.3))
    s_lr: float = 0.01  # of log s
    s_max: float = 5000.0  # log s is clamped below log(s_max): keeps gradients finite
    # Where the loop knows the images' blur (nerf-reconstruct: the pixel filter at the object's
    # distance, see set_image_blur), s stops where the surface's own blur matches it: a sharper
    # edge than the images' is one that a pixel's few rays cannot integrate, so its silhouette
    # pixels come out stepped (docs/benchmarks.md, "sdf-grid: s no sharper than the images").
    match_image_blur: bool = True
    # NeuS's cos annealing: steps over which the slope used by alpha goes from half direction-free
    # (every sample has some density, so gradients reach the back of the start sphere) to the
    # true, occlusion-aware one. 0: true from the start.
    cos_anneal_steps: int = 0
    eikonal_weight: float = 0.01
    curvature_weight: float = 0.0
    curvature_samples: int = 20000  # vertices next to this many render samples get the penalty

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sdf_lr <= 0 or self.s_lr < 0:
            raise ValueError(f"sdf_lr must be > 0 and s_lr >= 0, got {self.sdf_lr} and {self.s_lr}")
        if self.sphere_radius is not None and not 0 < self.sphere_radius < 1:
            raise ValueError(f"sphere_radius is relative to the box's half size, in (0, 1); got {self.sphere_radius}")
        if not 0 < self.init_s < self.s_max:
            raise ValueError(f"init_s must be > 0 and below s_max ({self.s_max}), got {self.init_s}")
        if self.cos_anneal_steps < 0 or self.curvature_samples < 1:
            raise ValueError("cos_anneal_steps must be >= 0 and curvature_samples >= 1")
        if self.eikonal_weight < 0 or self.curvature_weight < 0:
            raise ValueError(f"eikonal_weight and curvature_weight are loss weights, >= 0; got "
                             f"{self.eikonal_weight} and {self.curvature_weight}")


class SDFGrid(GridNeRF):
    def __init__(self, config: SDFGridConfig, aabb: torch.Tensor, step_size: float):
        super().__init__(config, aabb, step_size)
        self.step_size = float(step_size)
        self.log_s = nn.Parameter(torch.full((1, 1), math.log(config.init_s), device=self.table.device))
        self.s_limit = float(config.s_max)  # lowered by set_image_blur
        self.cos_anneal = 1.0 if config.cos_anneal_steps == 0 else 0.0
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (gradients, cells)
        with torch.no_grad():
            self.table[:, 0] = self._sphere()

    def _sphere(self) -> torch.Tensor:
        cfg = self.config
        radius = cfg.sphere_radius if cfg.sphere_radius is not None else cfg.blob_radius
        low, high = self.aabb[:3], self.aabb[3:]
        return (self.vertices() - (low + high) / 2).norm(dim=-1) - radius * float((high - low).min()) / 2

    @torch.no_grad()
    def carve(self, inside) -> None:
        """With ``init: hull``, start from a solid instead of the sphere: ``inside(points) -> bool``
        says which grid vertices are in it (nerf-reconstruct passes its silhouettes' visual hull).
        f becomes the solid's signed distance (scipy's exact Euclidean distance transform, lightly
        smoothed so the voxel steps do not show as bumps), in world units."""
        if self.config.init != "hull":
            return
        r = self.resolution
        solid = torch.cat([inside(points) for points in self.vertices().split(1 << 18)])
        solid = solid.reshape(r, r, r).cpu().numpy()
        if not solid.any() or solid.all():
            return  # nothing to carve from: keep the sphere
        spacing = ((self.aabb[3:] - self.aabb[:3]) / (r - 1)).cpu().numpy()
        outside = ndimage.distance_transform_edt(~solid, sampling=spacing)
        depth = ndimage.distance_transform_edt(solid, sampling=spacing)
        half = 0.5 * float(spacing.min())
        sdf = ndimage.gaussian_filter(np.where(solid, half - depth, outside - half), sigma=1.0)
        self.table[:, 0] = torch.from_numpy(sdf.reshape(-1)).to(self.table)

    def set_image_blur(self, blur: float) -> None:
        """The training images blur every edge by ``blur`` world units (the standard deviation of
        their pixel filter at the object's distance). NeuS's density makes a silhouette whose
        opacity falls off as the logistic sigmoid(-s * distance), of standard deviation
        pi / (sqrt(3) s); with ``match_image_blur`` s is held where that equals ``blur``."""
        if self.config.match_image_blur and blur > 0:
            self.s_limit = min(float(self.config.s_max), math.pi / (math.sqrt(3) * blur))

    @property
    def s(self) -> torch.Tensor:
        return self.log_s.clamp(max=math.log(self.s_limit)).exp()[0, 0]

    # --- lookups -------------------------------------------------------------------------

    def _values_and_gradient(self, x: torch.Tensor, stencil_samples: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every channel at x, grad f at x (world units), and f at the curvature stencils of up to
        ``stencil_samples`` of the points' cells (:meth:`stencils`)."""
        idx, f = self._cell(x)
        w = [torch.stack([1 - f[:, k], f[:, k]], dim=1) for k in range(3)]
        dw = torch.tensor([-1.0, 1.0], device=x.device).expand(len(x), 2)
        scale = (self.resolution - 1) / (self.aabb[3:] - self.aabb[:3])
        derivs = torch.stack([self._weights(*(dw if k == axis else w[k] for k in range(3))) * scale[axis]
                              for axis in range(3)], dim=-1)
        stencil = self.stencils(idx[:, 0], stencil_samples)
        return TrilinearWithGradient.apply(self.table, idx, self._weights(*w), derivs, stencil)

    def stencils(self, cells: torch.Tensor, count: int) -> torch.Tensor:
        """[n, 7] vertex indices: centre, +x +y +z, -x -y -z, around the first corners of up to
        ``count`` of ``cells`` picked at random (kept one vertex in from the grid's faces)."""
        if count == 0 or len(cells) == 0:
            return cells.new_zeros(0, 7)
        r = self.resolution
        base = cells[torch.randint(0, len(cells), (min(len(cells), count),), device=cells.device)]
        ijk = torch.stack([base // (r * r), base // r % r, base % r], dim=1).clamp(1, r - 2)
        centre = (ijk[:, 0] * r + ijk[:, 1]) * r + ijk[:, 2]
        offsets = torch.tensor([r * r, r, 1], device=cells.device)
        return torch.cat([centre[:, None], centre[:, None] + offsets, centre[:, None] - offsets], dim=1)

    def optical_depth(self, f: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """NeuS's section alpha as -log(1 - alpha), from the sample's value and slope along the ray."""
        r = self.cos_anneal  # NeuS: iter_cos = -(relu(-cos/2 + 1/2) (1 - r) + relu(-cos) r)
        iter_cos = -(F.relu(0.5 - 0.5 * cos) * (1 - r) + F.relu(-cos) * r)
        half = iter_cos * (self.step_size / 2)
        s = self.s
        return (F.logsigmoid(s * (f - half)) - F.logsigmoid(s * (f + half))).clamp_min(0)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        training = torch.is_grad_enabled() and self.training
        curvature = self.config.curvature_samples if training and self.config.curvature_weight > 0 else 0
        values, grad, stencil_f = self._values_and_gradient(x, curvature)
        if training:  # for regularizer(); at most a few renders a step
            self._samples = [*self._samples[-3:], (grad, stencil_f)]
        sigma = self.optical_depth(values[:, 0], (grad * d).sum(-1)) / self.step_size
        coeffs = values[:, 1:].view(-1, 3, self.n_sh)
        rgb = torch.sigmoid((coeffs * sh_basis(d, self.n_sh)[:, None]).sum(-1))
        return sigma, rgb

    def surface(self, x: torch.Tensor) -> torch.Tensor:
        return self._lookup(x, slice(0, 1))[:, 0]

    def _density_bound(self, f: torch.Tensor) -> torch.Tensor:
        """The highest density a sample with value f can have in any direction (|grad f| = 1, a
        ray heading straight in), except deep inside, where no ray from outside arrives visibly."""
        with torch.no_grad():
            s = float(self.s)
            depth = math.log(1 / HIDDEN_TRANSMITTANCE) / s + self.step_size / 2
            half = self.step_size / 2
            optical = F.logsigmoid(s * (f + half)) - F.logsigmoid(s * (f - half))
            return torch.where(f < -depth, torch.zeros_like(f), optical / self.step_size)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self._density_bound(self.surface(x).detach())

    def normals(self, x: torch.Tensor) -> torch.Tensor:
        """grad f / |grad f|: outward (f grows outwards), differentiable w.r.t. the grid."""
        return -super().normals(x)  # grid-nerf's is -grad(column 0), outward for a density

    @torch.no_grad()
    def cell_max_density(self, resolution: int) -> torch.Tensor:
        """Per occupancy cell, the density bound at the cell's lowest value not hidden deep inside
        (the bound falls as f rises); trilinear blends stay within their corners' range."""
        r = self.resolution
        f = self.table[:, 0].view(1, 1, r, r, r)
        high = F.adaptive_max_pool3d(f, resolution)[0, 0]
        low = -F.adaptive_max_pool3d(-f, resolution)[0, 0]
        depth = math.log(1 / HIDDEN_TRANSMITTANCE) / float(self.s) + self.step_size / 2
        bound = self._density_bound(low.clamp_min(-depth))
        return torch.where(high < -depth, torch.zeros_like(bound), bound)

    @torch.no_grad()
    def density_volume(self, resolution: int) -> torch.Tensor:
        r = self.resolution
        f = F.interpolate(self.table[:, 0].view(1, 1, r, r, r), size=(resolution,) * 3, mode="trilinear",
                          align_corners=True)
        return self._density_bound(f[0, 0])

    # --- training support --------------------------------------------------------------------

    def make_optimizer(self) -> torch.optim.Optimizer:
        lr = torch.full((self.table.shape[1],), self.config.lr, device=self.table.device)
        lr[0] = self.config.sdf_lr
        return RowAdam([{"params": [self.table], "lr": lr}, {"params": [self.log_s], "lr": self.config.s_lr}],
                       lr=self.config.lr, betas=self.config.betas)

    def grow(self, step: int) -> bool:
        steps = self.config.cos_anneal_steps
        self.cos_anneal = 1.0 if steps == 0 else min(1.0, step / steps)
        self._samples = []  # a new step: the last one's samples are spent
        return super().grow(step)

    def regularizer(self, step: int) -> torch.Tensor | None:
        """Eikonal loss on this step's render samples, curvature next to them, grid-nerf's TV."""
        samples, self._samples = self._samples, []
        terms = [t for t in (super().regularizer(step),) if t is not None]
        grads = [g for g, _ in samples if len(g)]
        if grads and self.config.eikonal_weight > 0:
            norm = torch.cat(grads).norm(dim=-1)
            terms.append(self.config.eikonal_weight * ((norm - 1) ** 2).mean())
        stencils = [f for _, f in samples if len(f)]
        if stencils and self.config.curvature_weight > 0:
            terms.append(self.config.curvature_weight * self.curvature(torch.cat(stencils)))
        return sum(terms) if terms else None

    def curvature(self, f: torch.Tensor) -> torch.Tensor:
        """Mean squared second difference of f along each axis, over voxel size (a plane has none,
        unlike TV, which fights the eikonal term), from f at [n, 7] stencils (:meth:`stencils`)."""
        h = (self.aabb[3:] - self.aabb[:3]) / (self.resolution - 1)
        second = (f[:, 1:4] + f[:, 4:7] - 2 * f[:, :1]) / h
        return second.pow(2).mean()

    def outside_row(self) -> None:
        return None  # raw 0 is no empty space here: a grown box repeats the edge values

    @torch.no_grad()
    def init_from(self, source) -> bool:
        """From an earlier sdf-grid stage: its box, values and s, resampled to this resolution."""
        if not isinstance(source, SDFGrid) or source.n_sh != self.n_sh:
            return False
        self.load_state_dict_plain(source.state_dict_plain())
        self.refit(source.aabb, self.config.resolutions[0])
        return True

    def state_dict_plain(self) -> dict:
        return {**super().state_dict_plain(), "log_s": self.log_s.detach(), "cos_anneal": float(self.cos_anneal),
                "s_limit": self.s_limit}

    def load_state_dict_plain(self, state: dict) -> None:
        super().load_state_dict_plain(state)
        self.log_s = nn.Parameter(state["log_s"].to(self.table.device).float().clone().reshape(1, 1))
        self.cos_anneal = float(state.get("cos_anneal", 1.0))
        self.s_limit = float(state.get("s_limit", self.config.s_max))  # saved before the limit existed: none


class TrilinearWithGradient(torch.autograd.Function):
    """Every channel's trilinear blend and column 0's spatial gradient, from the same eight corners,
    and column 0 at the curvature stencils.

    Forward: ``embedding_bag`` for the blend, a gather of column 0's corners for the gradient
    (``derivs``: each corner's weight in d/dx, d/dy, d/dz), a gather of the stencils. Backward:
    one uncoalesced row-sparse gradient for all three, as grid-nerf's TrilinearLookup makes
    (RowAdam sums its rows), written into one buffer: no sparse tensors to add."""

    @staticmethod
    def forward(ctx, table, idx, w, derivs, stencil):
        values = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
        column = table[:, 0]
        grad = (column[idx][:, :, None] * derivs).sum(1)
        ctx.save_for_backward(idx, w, derivs, stencil)
        ctx.rows, ctx.channels = table.shape
        ctx.set_materialize_grads(False)
        return values, grad, column[stencil]

    @staticmethod
    def backward(ctx, grad_values, grad_grad, grad_stencil):
        idx, w, derivs, stencil = ctx.saved_tensors
        n, channels = idx.numel(), ctx.channels
        extra = stencil.numel() if grad_stencil is not None else 0
        contributions = w.new_empty(n + extra, channels)
        blend = contributions[:n].view(*idx.shape, channels)
        if grad_values is not None:
            torch.mul(w[:, :, None], grad_values[:, None, :], out=blend)
        else:
            blend.zero_()
        if grad_grad is not None:
            contributions[:n, 0] += (derivs * grad_grad[:, None, :]).sum(-1).reshape(-1)
        index = idx.reshape(-1)
        if extra:
            contributions[n:].zero_()
            contributions[n:, 0] = grad_stencil.reshape(-1)
            index = torch.cat([index, stencil.reshape(-1)])
        sparse = torch.sparse_coo_tensor(index[None], contributions, (ctx.rows, channels), check_invariants=False)
        return sparse, None, None, None, None


def build(config: SDFGridConfig, *, aabb: torch.Tensor, step_size: float) -> SDFGrid:
    return SDFGrid(config, aabb, step_size)


@hookimpl
def gen3d_representations():
    return [Component("sdf-grid", build, SDFGridConfig,
                      "signed distance grid rendered as in NeuS (learned sharpness, eikonal loss, exact normals)",
                      provides=("radiance", "surface", "trainable", "refit"))]
