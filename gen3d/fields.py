"""What a loop may ask of a representation, and defaults for what it does not offer.

A representation (kind ``representation``) is built as ``factory(config, aabb=..., step_size=...)``
and must be a ``torch.nn.Module`` with:

- ``aabb``: a [6] tensor, the box it lives in (xmin, ymin, zmin, xmax, ymax, zmax);
- ``density(x) -> [N]`` and ``forward(x, d) -> (sigma [N], rgb [N, 3])`` (see render.RadianceField).

Everything else is optional; loops call the helpers below, which fall back to sensible defaults:

- ``make_optimizer()``: default Adam on all parameters (lr 1e-2);
- ``grow(step) -> bool``: coarse-to-fine schedules; default never (True means "new parameters:
  build a new optimiser");
- ``regularizer(step) -> tensor | None``: the representation's own loss terms; default none;
- ``state_dict_plain()`` / ``load_state_dict_plain(state)``: for fields whose parameter shapes
  change (grow); default the module's ``state_dict``;
- ``normals(x)``, ``albedo(x)``, ``cell_max_density(r)``, ``density_volume(r)``: faster or exact
  versions of what the loops, renderer and exporter otherwise compute by sampling.
"""

from __future__ import annotations

import torch

DEFAULT_LR = 1e-2


def build(choice, aabb: torch.Tensor, step_size: float):
    """Build the recipe's representation on the device of its box (a factory may build on the CPU)."""
    field = choice.build(aabb=aabb, step_size=step_size)
    return field.to(aabb.device) if isinstance(field, torch.nn.Module) else field


def make_optimizer(field) -> torch.optim.Optimizer:
    if hasattr(field, "make_optimizer"):
        return field.make_optimizer()
    return torch.optim.Adam(field.parameters(), lr=DEFAULT_LR)


def grow(field, step: int) -> bool:
    return bool(field.grow(step)) if hasattr(field, "grow") else False


def regularizer(field, step: int) -> torch.Tensor | None:
    return field.regularizer(step) if hasattr(field, "regularizer") else None


def state(field) -> dict:
    return field.state_dict_plain() if hasattr(field, "state_dict_plain") else dict(field.state_dict())


def load_state(field, saved: dict) -> None:
    if hasattr(field, "load_state_dict_plain"):
        field.load_state_dict_plain(saved)
    else:
        field.load_state_dict(saved)
