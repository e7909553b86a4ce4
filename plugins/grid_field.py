"""``grid-nerf``: a dense voxel-grid radiance field, fast on a CPU.

One channels-last table ``[R^3, 1 + 3*K]`` holds, per grid vertex, a raw density and K
spherical-harmonic colour coefficients per RGB channel. A point's value is the trilinear blend
of its cell's eight corners, computed with ``F.embedding_bag`` (eight indices, trilinear
weights): on a CPU that is several times faster than ``grid_sample``. Its gradient is kept
row-sparse (never a dense 128^3 x 13 tensor) and :class:`RowAdam` updates only the vertices
rays reached this step: a dense gradient and a dense or row-scanning Adam would touch every
vertex every step, most of a step's time at 128^3 (torch's SparseAdam coalesces, slower still).

Density = softplus(raw + shift), the shift chosen so that every vertex starts at a small
alpha per marching step (a clear, not foggy, start). The grid grows coarse-to-fine with
trilinear upsampling at the configured steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gen3d import Component, hookimpl

# torch 2.11 warns (once) about sparse tensors built with check_invariants=False ("implicitly
# disabled", seen on the GPU machine); ours is valid by construction and checking it would cost
# a pass over ~240k indices a step. torch 2.13 no longer warns.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199


@dataclass
class GridNeRFConfig:
    resolutions: list[int] = field(default_factory=lambda: [48, 80, 128])
    upsample_at: list[int] = field(default_factory=lambda: [150, 350])  # steps where the next resolution starts
    sh_degree: int = 1  # 0: view-independent colour; 1: 4 coefficients per channel
    init_alpha: float = 0.01  # alpha of one marching step at initialisation
    # DreamFusion's density blob: extra density blob_density * (1 - r / blob_radius) near the box
    # centre (r relative to the box's half size), so text-to-3D starts from an object, not fog.
    blob_density: float = 0.0
    blob_radius: float = 0.5
    lr: float = 0.1  # colour coefficients
    density_lr: float = 1.0  # raw density: softplus is linear up high, so opaque needs big moves
    betas: tuple[float, float] = (0.9, 0.99)
    tv_weight: float = 0.0  # total variation on sampled vertices (slower, and no better on the shipped data)
    tv_every: int = 4
    tv_samples: int = 200_000

    def __post_init__(self) -> None:
        if len(self.upsample_at) != len(self.resolutions) - 1:
            raise ValueError(f"upsample_at needs {len(self.resolutions) - 1} steps for "
                             f"{len(self.resolutions)} resolutions, got {len(self.upsample_at)}")
        if any(r < 2 for r in self.resolutions):
            raise ValueError("every resolution must be at least 2")
        if self.sh_degree not in (0, 1):
            raise ValueError(f"sh_degree must be 0 or 1, got {self.sh_degree}")
        if not 0 < self.init_alpha < 1:
            raise ValueError(f"init_alpha must be between 0 and 1, got {self.init_alpha}")
        if not (0 <= self.betas[0] < 1 and 0 < self.betas[1] < 1):
            raise ValueError(f"betas are Adam's (beta1, beta2): 0 <= beta1 < 1 and 0 < beta2 < 1; got {list(self.betas)}")
        if self.blob_density < 0 or self.blob_radius <= 0:
            raise ValueError("blob_density must be >= 0 and blob_radius > 0")


class GridNeRF(nn.Module):
    def __init__(self, config: GridNeRFConfig, aabb: torch.Tensor, step_size: float):
        super().__init__()
        self.config = config
        self.register_buffer("aabb", aabb.clone().float())
        self.n_sh = (config.sh_degree + 1) ** 2
        sigma0 = -math.log(1.0 - config.init_alpha) / step_size
        self.shift = math.log(math.expm1(sigma0))  # softplus(0 + shift) = sigma0
        self.resolution = config.resolutions[0]
        self.table = nn.Parameter(torch.zeros(self.resolution ** 3, 1 + 3 * self.n_sh, device=aabb.device))
        if config.blob_density > 0:
            with torch.no_grad():
                self.table[:, 0] = self._blob_raw(sigma0)

    def _blob_raw(self, sigma0: float) -> torch.Tensor:
        """Raw density values at the vertices giving sigma0 plus the centre blob."""
        r = self.resolution
        unit = torch.linspace(-1.0, 1.0, r, device=self.aabb.device)
        grid = torch.stack(torch.meshgrid(unit, unit, unit, indexing="ij"), dim=-1).reshape(-1, 3)
        distance = grid.norm(dim=-1) / self.config.blob_radius
        sigma = sigma0 + self.config.blob_density * (1 - distance).clamp_min(0)
        return torch.log(torch.expm1(sigma)) - self.shift

    def vertices(self) -> torch.Tensor:
        """World positions of the grid's vertices, in the table's row order (x, then y, then z)."""
        low, high, r = self.aabb[:3], self.aabb[3:], self.resolution
        axes = [torch.linspace(float(low[i]), float(high[i]), r, device=self.aabb.device) for i in range(3)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    # --- lookups ---------------------------------------------------------------------

    def _cell(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of the 8 corners of each point's cell, and the point's position in it (0..1 per axis)."""
        r = self.resolution
        g = ((x - self.aabb[:3]) / (self.aabb[3:] - self.aabb[:3])).clamp(0, 1) * (r - 1)
        i0 = g.floor().clamp(max=r - 2)
        f = g - i0
        i0 = i0.long()
        base = (i0[:, 0] * r + i0[:, 1]) * r + i0[:, 2]
        offsets = torch.tensor([(a * r + b) * r + c for a in (0, 1) for b in (0, 1) for c in (0, 1)],
                               device=x.device)
        return base[:, None] + offsets[None], f

    @staticmethod
    def _weights(wx: torch.Tensor, wy: torch.Tensor, wz: torch.Tensor) -> torch.Tensor:
        """[N,8] corner weights from each axis's [N,2] weights (corner order: x, then y, then z)."""
        return (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(-1, 8)

    def _corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of the 8 corners of each point's cell and their trilinear weights."""
        idx, f = self._cell(x)
        return idx, self._weights(*(torch.stack([1 - f[:, k], f[:, k]], dim=1) for k in range(3)))

    def _lookup(self, x: torch.Tensor, columns: slice | None = None) -> torch.Tensor:
        idx, w = self._corners(x)
        if columns is not None:  # density-only or colour-only queries are never trained through
            return F.embedding_bag(idx, self.table.detach()[:, columns], per_sample_weights=w, mode="sum")
        return TrilinearLookup.apply(self.table, idx, w)

    def _activate_density(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw + self.shift)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self._activate_density(self._lookup(x, slice(0, 1))[:, 0])

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._lookup(x)
        sigma = self._activate_density(values[:, 0])
        coeffs = values[:, 1:].view(-1, 3, self.n_sh)
        rgb = torch.sigmoid((coeffs * sh_basis(d, self.n_sh)[:, None]).sum(-1))
        return sigma, rgb

    def normals(self, x: torch.Tensor) -> torch.Tensor:
        """Unit outward normals -grad(density)/|grad(density)|, differentiable w.r.t. the grid.

        Exact for the trilinear blend: the derivative along an axis swaps that axis's weights
        (1 - f, f) for (-1, 1). Softplus is monotonic, so the raw value's gradient has the same
        direction as the density's.
        """
        idx, f = self._cell(x)
        w = [torch.stack([1 - f[:, k], f[:, k]], dim=1) for k in range(3)]
        dw = torch.tensor([-1.0, 1.0], device=x.device).expand(len(x), 2)
        derivs = [self._weights(*(dw if k == axis else w[k] for k in range(3))) for axis in range(3)]
        raw = TrilinearLookup.apply(self.table, idx.repeat(3, 1), torch.cat(derivs))[:, 0]
        grad = raw.view(3, -1).t() * ((self.resolution - 1) / (self.aabb[3:] - self.aabb[:3]))
        return -F.normalize(grad, dim=-1, eps=1e-8)

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        """View-independent colour (the SH DC term), for mesh vertex colours."""
        dc = self._lookup(x, slice(1, None)).view(-1, 3, self.n_sh)[..., 0]
        return torch.sigmoid(dc * SH_C0)

    @torch.no_grad()
    def cell_max_density(self, resolution: int) -> torch.Tensor:
        """Exact max density per occupancy cell: trilinear blends peak at a vertex."""
        r = self.resolution
        raw = self.table[:, 0].view(1, 1, r, r, r)
        cells = F.adaptive_max_pool3d(raw, resolution)[0, 0]
        return self._activate_density(cells)

    @torch.no_grad()
    def density_volume(self, resolution: int) -> torch.Tensor:
        """Density on a resolution^3 lattice spanning the box: the same trilinear blend, upsampled at once."""
        r = self.resolution
        raw = self.table[:, 0].view(1, 1, r, r, r)
        raw = F.interpolate(raw, size=(resolution,) * 3, mode="trilinear", align_corners=True)
        return self._activate_density(raw[0, 0])

    # --- training support ------------------------------------------------------------

    def make_optimizer(self) -> torch.optim.Optimizer:
        # One table, two learning rates: column 0 is density, the rest colour.
        lr = torch.full((self.table.shape[1],), self.config.lr, device=self.table.device)
        lr[0] = self.config.density_lr
        return RowAdam([self.table], lr=lr, betas=self.config.betas)

    def resolution_at(self, step: int) -> int:
        index = sum(step >= s for s in self.config.upsample_at)
        return self.config.resolutions[index]

    @torch.no_grad()
    def grow(self, step: int) -> bool:
        """Upsample to this step's resolution; True if the parameters changed (new optimiser needed)."""
        target = self.resolution_at(step)
        if target == self.resolution:
            return False
        r, c = self.resolution, self.table.shape[1]
        grid = self.table.t().reshape(1, c, r, r, r)
        grid = F.interpolate(grid, size=(target,) * 3, mode="trilinear", align_corners=True)
        self.table = nn.Parameter(grid.reshape(c, -1).t().contiguous())
        self.resolution = target
        return True

    @torch.no_grad()
    def refit(self, aabb: torch.Tensor, resolution: int | None = None) -> None:
        """Lay the grid over a new (smaller) box, resampling the current field at the new vertices.

        The same number of vertices over a tighter box is a finer grid at the same cost per sample.
        """
        r = resolution or self.resolution
        axes = [torch.linspace(float(aabb[i]), float(aabb[i + 3]), r, device=self.table.device) for i in range(3)]
        yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), dim=-1).reshape(-1, 2)
        empty = self.outside_row()
        slabs = []
        for x in axes[0]:
            points = torch.cat([x.expand(len(yz), 1), yz], dim=1)
            rows = self._lookup(points, slice(None))
            if empty is not None:  # a larger box: what lies beyond the old one starts empty
                beyond = ((points < self.aabb[:3]) | (points > self.aabb[3:])).any(dim=1)
                rows[beyond] = empty.to(rows.dtype)
            slabs.append(rows)
        self.table = nn.Parameter(torch.cat(slabs).contiguous())
        self.aabb = aabb.clone().float().to(self.table.device)
        self.resolution = r

    def outside_row(self) -> torch.Tensor | None:
        """The table row for space a refit adds beyond the old box (a scene loop grows its box as
        views see farther): raw 0, the clear start every vertex had. None repeats the old box's
        edge values instead, for fields whose raw 0 means something else."""
        return torch.zeros(self.table.shape[1], device=self.table.device)

    @torch.no_grad()
    def init_from(self, source) -> bool:
        """Start from another grid field (an earlier stage): take its box and values, resampled
        to this field's first resolution. False for any other kind of field (the core then
        distils it instead)."""
        if type(source) is not GridNeRF or source.n_sh != self.n_sh:  # subclasses' column 0 means another thing
            return False
        self.load_state_dict_plain(source.state_dict_plain())
        self.refit(source.aabb, self.config.resolutions[0])
        return True

    def regularizer(self, step: int) -> torch.Tensor | None:
        """Total variation on a random sample of vertices (sparse-gradient friendly)."""
        cfg = self.config
        if cfg.tv_weight <= 0 or step % cfg.tv_every:
            return None
        r = self.resolution
        n = min(cfg.tv_samples, (r - 1) ** 3)
        ijk = torch.randint(0, r - 1, (n, 3), device=self.table.device)
        base = (ijk[:, 0] * r + ijk[:, 1]) * r + ijk[:, 2]
        idx = torch.stack([base, base + r * r, base + r, base + 1], dim=1)
        values = F.embedding(idx, self.table, sparse=True)  # [n,4,C], row-sparse gradient
        diffs = values[:, 1:] - values[:, :1]
        return cfg.tv_weight * diffs.pow(2).mean() * 3

    def state_dict_plain(self) -> dict:
        return {"table": self.table.detach(), "resolution": self.resolution, "aabb": self.aabb}

    def load_state_dict_plain(self, state: dict) -> None:
        self.resolution = int(state["resolution"])
        if "aabb" in state:
            self.aabb = state["aabb"].to(self.aabb.device).float()
        self.table = nn.Parameter(state["table"].to(self.aabb.device).clone())


class TrilinearLookup(torch.autograd.Function):
    """``embedding_bag`` forward; backward scatters with ``index_add_`` (no sort, unlike its own)."""

    @staticmethod
    def forward(ctx, table, idx, w):
        ctx.save_for_backward(idx, w)
        ctx.rows = table.shape[0]
        return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        idx, w = ctx.saved_tensors
        contributions = (w[:, :, None] * grad[:, None, :]).reshape(-1, grad.shape[1])
        # An uncoalesced row-sparse gradient: no pass over the whole 128^3 table (RowAdam sums rows).
        sparse = torch.sparse_coo_tensor(idx.reshape(1, -1), contributions, (ctx.rows, grad.shape[1]),
                                         check_invariants=False)
        return sparse, None, None


class RowAdam(torch.optim.Optimizer):
    """Adam that updates only the rows of a table whose gradient is non-zero this step.

    "Lazy" Adam as in torch's SparseAdam (rows no ray reached keep their moments and values), but
    from a dense gradient: finding the touched rows by a scan is cheaper on a CPU than coalescing
    a sparse gradient. Bias correction uses the global step count.

    ``betas[0] = 0`` keeps no first moment (RMSprop with Adam's bias correction): one table-sized
    state less and a third fewer row gathers and scatters. With lazy updates a row's momentum
    is also stale by the time a ray next touches it. The reconstruction recipe runs so
    (docs/experiments.md).
    """

    def __init__(self, params, lr: float | torch.Tensor, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8):
        # lr may be a tensor with one learning rate per column.
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self._scratch: dict[int, dict] = {}  # per-parameter buffers of touched_rows, never saved

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_tensor(lr) and lr.device != p.device:  # a checkpoint loads onto the CPU
                    group["lr"] = lr = lr.to(p.device)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if beta1 > 0:
                        state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                rows, g = touched_rows(p.grad, self._scratch.setdefault(id(p), {}))
                # index_select / index_copy_ rather than tensor[rows] and index_add_: on a CPU
                # they are much faster for these large row blocks (rows are unique here).
                if beta1 > 0:
                    m = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
                    state["exp_avg"].index_copy_(0, rows, m)
                else:  # no first moment: a third less row traffic (see the class docstring)
                    m = g
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                denom = v.mul_(1 / (1 - beta2 ** t)).sqrt_().add_(eps)
                step = m.div_(denom).mul_(lr * (-1 / (1 - beta1 ** t)))
                p.index_copy_(0, rows, p.index_select(0, rows).add_(step))


def touched_rows(grad: torch.Tensor, scratch: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a gradient touches and their summed gradient, from a dense or row-sparse tensor.
    ``scratch`` keeps a table-sized buffer between calls."""
    if grad.is_sparse:
        index, values = grad._indices()[0], grad._values()
        rows, inverse = unique_rows(index, grad.shape[0], {} if scratch is None else scratch)
        return rows, values.new_zeros(len(rows), values.shape[1]).index_add_(0, inverse, values)
    rows = grad.any(dim=1).nonzero().squeeze(1)
    return rows, grad[rows]


def unique_rows(index: torch.Tensor, n_rows: int, scratch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``index`` (indices into a table of n_rows), in no particular order,
    and each entry's position among them: ``torch.unique(index, return_inverse=True)`` without
    the sort. Every entry writes its own position into a table-sized slot; where duplicates race,
    one write wins, and the entries that read back their own position are each row's one leader.
    Faster than a sort or a sorted mask scan at the sizes a step has (docs/experiments.md)."""
    slot = scratch.get("slot")
    if slot is None or len(slot) != n_rows or slot.device != index.device:  # the grid grew
        scratch["slot"] = slot = torch.empty(n_rows, dtype=torch.long, device=index.device)
    position = torch.arange(len(index), device=index.device)
    slot.index_copy_(0, index, position)
    leader_of = slot.index_select(0, index)  # position of the entry that won each row's slot
    leaders = (leader_of == position).nonzero().squeeze(1)
    compact = torch.empty_like(position).index_copy_(0, leaders, torch.arange(len(leaders), device=index.device))
    return index.index_select(0, leaders), compact.index_select(0, leader_of)


def sh_basis(d: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return torch.full_like(d[:, :1], SH_C0)
    x, y, z = d.unbind(-1)
    return torch.stack([torch.full_like(x, SH_C0), -SH_C1 * y, SH_C1 * z, -SH_C1 * x], dim=-1)


def build(config: GridNeRFConfig, *, aabb: torch.Tensor, step_size: float) -> GridNeRF:
    return GridNeRF(config, aabb, step_size)


@hookimpl
def gen3d_representations():
    return [Component("grid-nerf", build, GridNeRFConfig,
                      "dense voxel-grid radiance field (SH colour, coarse-to-fine, sparse updates)",
                      provides=("radiance", "trainable", "refit"))]
