"""``occupancy-grid``: an occupancy field on the grid-nerf voxel grid, rendered as in UNISURF.

Column 0 of grid-nerf's table holds a logit; the occupancy o(x) = sigmoid(logit) in [0, 1]
(Occupancy Networks), the surface is o = 0.5, and, as in UNISURF (Oechsle et al. 2021), each
sample's alpha *is* its occupancy. The renderer is fixed (it composites alpha = 1 - exp(-sigma *
step) at the step the field was built with), so the field returns

    sigma = -log(1 - o) / step = softplus(logit) / step,

the same expression written without a clamp: 1 - sigmoid(z) = sigmoid(-z), and
-log(sigmoid(-z)) = softplus(z), finite for every logit. Rendered at its own step, a sample's
alpha is then exactly o. Everything else (lookups, row-sparse gradients, RowAdam, coarse-to-fine
growth, refits, exact normals, the occupancy grid's per-cell maxima) is grid-nerf's, because
grid-nerf's density is softplus of its raw value too: only the scale differs.

Where the surface lands. Rays stop where the summed -log(1 - o) of their samples passes ln 2,
which is the o = 0.5 level only when o steps from 0 to 1 within a sample or so; images do not
ask for that (a soft ramp renders like a sharp one further out), so a field trained from a clear
start keeps soft ramps whose 0.5 level lies inside the object. Two settings sharpen them: the
``hull`` start (binary from step 0, the visual hull of the silhouettes) and ``entropy_weight``
(binary entropy of o at the render samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from gen3d import Component, binary_entropy, hookimpl
from gen3d_plugins.grid_field import GridNeRF, GridNeRFConfig, RowAdam, sh_basis


@dataclass
class OccupancyGridConfig(GridNeRFConfig):
    """grid-nerf's settings, read for an occupancy field: ``init_alpha`` is the starting
    occupancy (a clear start: small), ``blob_density`` / ``blob_radius`` add grid-nerf's ball, so
    the field starts rendering exactly as grid-nerf with the same settings would. ``density_lr``
    is grid-nerf's and ignored: the logits have their own ``logit_lr``."""

    # Smaller steps than grid-nerf's raw density (alpha = sigmoid(logit) saturates within a few
    # units, grid-nerf's softplus(raw) * step needs raw in the hundreds), yet large enough to
    # carve the hull's concave parts within a CPU budget (0.1 leaves them filled: see
    # docs/benchmarks.md, occupancy-grid).
    logit_lr: float = 0.5
    # "clear": grid-nerf's start (init_alpha everywhere, plus its ball). "hull": where the loop has
    # silhouettes (nerf-reconstruct with alpha), occupancy 1 - init_alpha inside their visual hull
    # and init_alpha outside (see carve()): a sharp ramp from the start, so the o = 0.5 level is
    # where rays stop; from a clear start the ramp stays soft and its 0.5 level sits inside.
    init: Literal["clear", "hull"] = "clear"
    # Binary entropy of the occupancy at this step's render samples. Images fix where rays stop,
    # not how sharp the ramp from empty to full is: a soft ramp renders as a sharp one further out,
    # with its o = 0.5 level inside the visible surface. Pushing o to 0 or 1 makes the two meet.
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logit_lr <= 0:
            raise ValueError(f"logit_lr must be positive, got {self.logit_lr}")
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight is a loss weight, >= 0; got {self.entropy_weight}")


class OccupancyField(GridNeRF):
    def __init__(self, config: OccupancyGridConfig, aabb: torch.Tensor, step_size: float):
        super().__init__(config, aabb, step_size)
        self.step_size = float(step_size)
        self._logits: list[torch.Tensor] = []  # this step's render samples' logits
        with torch.no_grad():
            if config.blob_density > 0:  # grid-nerf's ball, as the alpha it renders with
                sigma = F.softplus(self.table[:, 0] + self.shift)  # _blob_raw's raw, grid-nerf's density
                self.table[:, 0] = logit_of_alpha(1 - torch.exp(-sigma * step_size))
            else:
                self.table[:, 0] = math.log(config.init_alpha / (1 - config.init_alpha))

    @torch.no_grad()
    def carve(self, inside) -> None:
        """With ``init: hull``: occupancy 1 - init_alpha at the grid vertices ``inside(points)``
        marks (nerf-reconstruct passes its silhouettes' visual hull), init_alpha elsewhere."""
        if self.config.init != "hull":
            return
        solid = torch.cat([inside(points) for points in self.vertices().split(1 << 18)])
        if solid.any() and not solid.all():
            outside = math.log(self.config.init_alpha / (1 - self.config.init_alpha))  # logit of init_alpha
            self.table[:, 0] = torch.where(solid, -outside, outside)

    def _activate_density(self, logit: torch.Tensor) -> torch.Tensor:
        return F.softplus(logit) / self.step_size

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._lookup(x)
        if torch.is_grad_enabled() and self.training:  # for regularizer(): at most a few renders a step
            self._logits = [*self._logits[-3:], values[:, 0]]
        coeffs = values[:, 1:].view(-1, 3, self.n_sh)
        rgb = torch.sigmoid((coeffs * sh_basis(d, self.n_sh)[:, None]).sum(-1))
        return self._activate_density(values[:, 0]), rgb

    def grow(self, step: int) -> bool:
        self._logits = []  # a new step: the last one's samples are spent
        return super().grow(step)

    def regularizer(self, step: int) -> torch.Tensor | None:
        """Binary entropy of o at this step's render samples, plus grid-nerf's TV when it is on."""
        logits, self._logits = [l for l in self._logits if len(l)], []
        terms = [t for t in (super().regularizer(step),) if t is not None]
        if logits and self.config.entropy_weight > 0:
            terms.append(self.config.entropy_weight * binary_entropy(torch.sigmoid(torch.cat(logits))).mean())
        return sum(terms) if terms else None

    def occupancy(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._lookup(x, slice(0, 1))[:, 0])

    def surface(self, x: torch.Tensor) -> torch.Tensor:
        """0.5 - o(x): negative inside, zero on the o = 0.5 surface."""
        return 0.5 - self.occupancy(x)

    def make_optimizer(self) -> torch.optim.Optimizer:
        lr = torch.full((self.table.shape[1],), self.config.lr, device=self.table.device)
        lr[0] = self.config.logit_lr
        return RowAdam([self.table], lr=lr, betas=self.config.betas)

    def outside_row(self) -> None:
        return None  # raw 0 is no empty space here: a grown box repeats the edge values

    @torch.no_grad()
    def init_from(self, source) -> bool:
        """From an earlier occupancy-grid stage (its values), or from a grid-nerf stage: the
        logits that give its alpha at this field's step, so it renders as it did."""
        if type(source) is OccupancyField and source.n_sh == self.n_sh:
            self.load_state_dict_plain(source.state_dict_plain())
        elif type(source) is GridNeRF and source.n_sh == self.n_sh:
            self.load_state_dict_plain(source.state_dict_plain())
            alpha = 1 - torch.exp(-source._activate_density(self.table[:, 0]) * self.step_size)
            self.table[:, 0] = logit_of_alpha(alpha)
        else:
            return False
        self.refit(source.aabb, self.config.resolutions[0])
        return True


def logit_of_alpha(alpha: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    alpha = alpha.clamp(eps, 1 - eps)
    return torch.log(alpha) - torch.log1p(-alpha)


def build(config: OccupancyGridConfig, *, aabb: torch.Tensor, step_size: float) -> OccupancyField:
    return OccupancyField(config, aabb, step_size)


@hookimpl
def gen3d_representations():
    return [Component("occupancy-grid", build, OccupancyGridConfig,
                      "occupancy grid rendered as in UNISURF (alpha = occupancy; surface at 0.5)",
                      provides=("radiance", "surface", "trainable", "refit"))]
