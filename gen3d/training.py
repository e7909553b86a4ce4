"""The training state every field-optimising loop shares: field, optimiser, renderer, generator,
coarse-to-fine growth, the learning-rate schedule, box refits, checkpoint state and ``init_from``."""

from __future__ import annotations

from typing import Any

import torch

from . import fields
from .errors import ConfigError
from .render import RenderSettings, VolumeRenderer


class FieldTrainer:
    """Owns a field and what optimises it. A loop renders and computes its loss; this does the rest."""

    def __init__(self, run, representation, aabb: torch.Tensor, render: RenderSettings,
                 needs: tuple[str, ...] = ("radiance",), lr_decay: float = 1.0, generator_device=None,
                 loop_name: str = "this loop"):
        self.run = run
        self.render_settings = render
        self.lr_decay = lr_decay
        self.renderer = VolumeRenderer(aabb, render)
        self.field = fields.build(representation, aabb, self.renderer.step_size, needs, f"loop {loop_name!r}")
        device = run.device if generator_device is None else generator_device
        self.generator = torch.Generator(device=device).manual_seed(run.seed)
        self.new_optimizer()
        if run.stage.init_from:  # a later stage of a multi-stage recipe
            how = self.init_from(run.field_of(run.stage.init_from))
            run.log(f"field initialised from stage {run.stage.init_from!r} by {how}")

    # --- a step ------------------------------------------------------------------------

    def prepare(self, step: int) -> float | None:
        """Before a step: grow the field (a new optimiser when its parameters changed) and
        refresh the occupancy grid; returns the occupied fraction when it was refreshed."""
        if fields.grow(self.field, step):
            self.new_optimizer()
        return self.renderer.update_occupancy(self.field, step)

    def regularizer(self, step: int) -> torch.Tensor | None:
        return fields.regularizer(self.field, step)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def optimizer_step(self, step: int) -> None:
        self.decay_learning_rates(step)
        self.optimizer.step()

    def new_optimizer(self) -> None:
        self.optimizer = fields.make_optimizer(self.field)
        self.base_lrs = [g["lr"].clone() if torch.is_tensor(g["lr"]) else g["lr"] for g in self.optimizer.param_groups]

    def decay_learning_rates(self, step: int) -> None:
        """Learning rates fall exponentially to ``lr_decay`` of their own by the stage's last step
        (by step count, so a resumed run matches a straight one)."""
        if self.lr_decay == 1.0:
            return
        scale = self.lr_decay ** min(1.0, step / max(1, self.run.steps))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale

    def refit(self, aabb: torch.Tensor, step: int) -> bool:
        """Lay a refittable field over a new box (a new renderer and optimiser); False when it cannot."""
        if not isinstance(self.field, fields.RefittableField):
            return False
        self.field.refit(aabb, self.field.resolution_at(step))
        self.renderer = VolumeRenderer(aabb, self.render_settings, step_size=self.renderer.step_size)
        self.renderer.update_occupancy(self.field, 0)
        self.new_optimizer()
        return True

    # --- init_from ---------------------------------------------------------------------

    def init_from(self, source: Any, steps: int = 300, points: int = 1 << 15) -> str:
        """Start from an earlier stage's field: the field's own conversion when it has one
        (``init_from(source)`` returning True), else distillation: fit density and colour to the source's at
        random points of the box. Returns how it was done."""
        if hasattr(self.field, "init_from") and self.field.init_from(source):
            method = "conversion"
        else:
            self.distill(source, steps, points)
            method = "distillation"
        if not torch.equal(self.field.aabb, self.renderer.aabb):
            self.renderer = VolumeRenderer(self.field.aabb, self.render_settings, step_size=self.renderer.step_size)
        self.renderer.update_occupancy(self.field, 0)
        self.new_optimizer()
        return method

    def distill(self, source: Any, steps: int, points: int) -> None:
        if not isinstance(source, fields.RadianceField):
            raise ConfigError("init_from: the earlier stage's field has no density and colour to distil from")
        aabb = self.field.aabb
        optimizer = fields.make_optimizer(self.field)
        generator = torch.Generator(device=aabb.device).manual_seed(self.run.seed)
        for _ in range(steps):
            x = aabb[:3] + (aabb[3:] - aabb[:3]) * torch.rand(points, 3, generator=generator, device=aabb.device)
            d = torch.nn.functional.normalize(torch.randn(points, 3, generator=generator, device=aabb.device), dim=-1)
            with torch.no_grad():
                sigma_t, rgb_t = source(x, d)
            sigma, rgb = self.field(x, d)
            # Densities span orders of magnitude: compare them as opacities over one render step.
            alpha = lambda s: 1 - torch.exp(-s * self.renderer.step_size)
            loss = ((alpha(sigma) - alpha(sigma_t)) ** 2).mean() + (alpha(sigma_t)[:, None] * (rgb - rgb_t) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    # --- state -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"field": fields.state(self.field), "optimizer": self.optimizer.state_dict(),
                "renderer": self.renderer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        fields.load_state(self.field, state["field"])
        if not torch.equal(self.field.aabb, self.renderer.aabb):  # the box was refitted before the checkpoint
            self.renderer = VolumeRenderer(self.field.aabb, self.render_settings, step_size=self.renderer.step_size)
        self.new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.renderer.load_state_dict(state["renderer"])
        self.generator.set_state(state["generator"])


class FieldLoop:
    """A base for loops built around a :class:`FieldTrainer` (``self.trainer``): its field,
    renderer and generator as attributes of the loop."""

    trainer: FieldTrainer

    @property
    def field(self):
        return self.trainer.field

    @property
    def renderer(self) -> VolumeRenderer:
        return self.trainer.renderer

    @property
    def generator(self) -> torch.Generator:
        return self.trainer.generator
