"""What a representation is: typed capability protocols, a base class, and the signed surface.

A representation (kind ``representation``) is built as ``factory(config, aabb=..., step_size=...)``
and is a ``torch.nn.Module`` with ``aabb``, a [6] tensor (xmin, ymin, zmin, xmax, ymax, zmax).
What else it offers is said by the capabilities below; its component declares them
(``Component(..., provides=("radiance", "trainable"))``) so a recipe that pairs it with a loop
needing something it lacks fails at validation, with one line, before any work.

- ``radiance`` (:class:`RadianceField`): ``density(x) -> [N]`` and ``field(x, d) -> (sigma, rgb)``;
  what the volume renderer draws.
- ``surface`` (:class:`SurfaceField`): ``surface(x) -> [N]``, a signed function with the surface
  at 0 and the inside negative (an SDF is one; an occupancy field gives ``0.5 - o``). A radiance
  field without one gets ``level - density`` (:class:`DensitySurface`), with the level chosen
  from silhouettes; export, the level choice and interior filling all work on this function.
- ``trainable`` (:class:`TrainableField`): ``make_optimizer()``, ``grow(step)``,
  ``regularizer(step)``, ``state_dict_plain()`` / ``load_state_dict_plain(state)``. Subclass
  :class:`Field` to get all five with plain defaults.
- ``refit`` (:class:`RefittableField`): ``refit(aabb, resolution)`` lays the field over a new
  box; ``resolution_at(step)``. Loops use it to tighten the scene box when it is offered.

Optional speed-ups, used when present and computed by sampling otherwise: ``normals(x)`` (exact
outward normals), ``albedo(x)`` (view-independent colour for vertex colours),
``cell_max_density(r)`` and ``density_volume(r)``. Optional set-ups, called by loops that
have what they need: ``carve(inside)`` (start from the images' visual hull) and
``set_image_blur(blur)`` (the training images' edge blur in world units; sdf-grid keeps its
surface no sharper), both from nerf-reconstruct.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import ConfigError

DEFAULT_LR = 1e-2


@runtime_checkable
class RadianceField(Protocol):
    aabb: torch.Tensor

    def density(self, x: torch.Tensor) -> torch.Tensor: ...  # [N,3] -> [N]
    def __call__(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class SurfaceField(Protocol):
    aabb: torch.Tensor

    def surface(self, x: torch.Tensor) -> torch.Tensor: ...  # [N,3] -> [N], < 0 inside, 0 on the surface


@runtime_checkable
class TrainableField(Protocol):
    def make_optimizer(self) -> torch.optim.Optimizer: ...
    def grow(self, step: int) -> bool: ...  # True: new parameters, build a new optimiser
    def regularizer(self, step: int) -> torch.Tensor | None: ...
    def state_dict_plain(self) -> dict: ...
    def load_state_dict_plain(self, state: dict) -> None: ...


@runtime_checkable
class RefittableField(Protocol):
    def refit(self, aabb: torch.Tensor, resolution: int | None = None) -> None: ...
    def resolution_at(self, step: int) -> int: ...


CAPABILITIES: dict[str, tuple[type, str]] = {
    "radiance": (RadianceField, "density(x) and field(x, d) -> (sigma, rgb)"),
    "surface": (SurfaceField, "surface(x): a signed function, negative inside"),
    "trainable": (TrainableField, "make_optimizer, grow, regularizer, state_dict_plain, load_state_dict_plain"),
    "refit": (RefittableField, "refit(aabb, resolution) and resolution_at(step)"),
}


class Field(nn.Module):
    """A base class for representations: the ``trainable`` capability with plain defaults.

    Subclasses implement ``density`` and ``forward`` (radiance) and/or ``surface``, and override
    what they do better: a grid field its own optimiser and coarse-to-fine ``grow``."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=DEFAULT_LR)

    def grow(self, step: int) -> bool:
        return False

    def regularizer(self, step: int) -> torch.Tensor | None:
        return None

    def state_dict_plain(self) -> dict:
        return dict(self.state_dict())

    def load_state_dict_plain(self, state: dict) -> None:
        self.load_state_dict(state)


def missing_capabilities(field: Any, needed: tuple[str, ...]) -> list[str]:
    return [name for name in needed if not isinstance(field, CAPABILITIES[name][0])]


def describe_missing(representation: str, user: str, missing: list[str]) -> str:
    wanted = "; ".join(f"{name}: {CAPABILITIES[name][1]}" for name in missing)
    return f"representation {representation!r} cannot be used by {user}: it lacks {', '.join(missing)} ({wanted})"


def check_capabilities(component: Any, needed: tuple[str, ...], user: str, where: str) -> None:
    """Validation-time check of a representation component's declared capabilities."""
    unknown = [n for n in needed if n not in CAPABILITIES]
    if unknown:
        raise ValueError(f"{user} needs unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")
    declared = tuple(getattr(component, "provides", ()) or ())
    if not declared:
        return  # an undeclared component is checked on the built field instead (build below)
    missing = [n for n in needed if n not in declared]
    if missing:
        raise ConfigError(f"{where}: {describe_missing(component.name, user, missing)}")


def build(choice, aabb: torch.Tensor, step_size: float, needs: tuple[str, ...] = (), user: str = "this loop"):
    """Build the recipe's representation on the device of its box (a factory may build on the CPU),
    and check that it has the capabilities ``needs`` names."""
    field = choice.build(aabb=aabb, step_size=step_size)
    if isinstance(field, nn.Module):
        field = field.to(aabb.device)
    missing = missing_capabilities(field, needs)
    if missing:
        raise ConfigError(describe_missing(choice.type, user, missing))
    return field


class DensitySurface:
    """The signed surface of a density field at ``level``: ``level - density(x)``.

    ``empty_above`` says what counts as empty space when the interior is filled (density under
    ``fill_fraction`` of the level), ``inside_value`` what deep interior voxels are set to."""

    def __init__(self, field: RadianceField, level: float, fill_fraction: float = 0.25):
        self.field, self.level = field, float(level)
        self.aabb = field.aabb
        self.empty_above = (1.0 - fill_fraction) * self.level
        self.inside_value = -self.level

    def surface(self, x: torch.Tensor) -> torch.Tensor:
        return self.level - self.field.density(x)


def surface_of(field: Any, level: float | None, fill_fraction: float = 0.25) -> Any:
    """The field's signed surface: its own when it has one, else its density at ``level``."""
    if isinstance(field, SurfaceField):
        return field
    if level is None:
        raise ConfigError("export.level is not set and this recipe does not choose one: set export.level")
    return DensitySurface(field, level, fill_fraction)


# --- helpers loops call (fields that are not TrainableField get the defaults of Field) ---------


def make_optimizer(field) -> torch.optim.Optimizer:
    if isinstance(field, TrainableField):
        return field.make_optimizer()
    return torch.optim.Adam(field.parameters(), lr=DEFAULT_LR)


def grow(field, step: int) -> bool:
    return bool(field.grow(step)) if isinstance(field, TrainableField) else False


def regularizer(field, step: int) -> torch.Tensor | None:
    return field.regularizer(step) if isinstance(field, TrainableField) else None


def state(field) -> dict:
    return field.state_dict_plain() if isinstance(field, TrainableField) else dict(field.state_dict())


def load_state(field, saved: dict) -> None:
    if isinstance(field, TrainableField):
        field.load_state_dict_plain(saved)
    else:
        field.load_state_dict(saved)
