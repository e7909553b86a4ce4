"""A third-party gen3d plugin, living outside gen3d/ and plugins/, as someone's own package would.

It uses only the public API (``from gen3d import ...``) and provides a loop (``fit-sphere``:
fits the radius and colour of a ball-shaped density field, a tiny but real optimisation), a
representation (``ball``, which satisfies the ``radiance`` and ``trainable`` contracts) and an
exporter (``xyz``: a point list with a settable precision). It observes the run through the
lifecycle hooks. The loop writes no files: the core evaluates, exports and previews what its
``outputs`` hands over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import gen3d
from gen3d import (Choice, Component, Field, Orbit, RenderSettings, StageOutputs, VolumeRenderer, choice,
                   plain_view_renderer)

__version__ = "1.2.3"
STEPS_SEEN: list[int] = []
EXPORTED: list[str] = []


@dataclass
class BallConfig:
    radius: float = 0.2
    sharpness: float = 30.0


class Ball(Field):
    def __init__(self, config: BallConfig, aabb: torch.Tensor):
        super().__init__()
        self.register_buffer("aabb", aabb.clone())
        self.radius = torch.nn.Parameter(torch.tensor(config.radius))
        self.color = torch.nn.Parameter(torch.zeros(3))
        self.sharpness = config.sharpness

    def density(self, x):
        return 100 * torch.sigmoid((self.radius - x.norm(dim=-1)) * self.sharpness)

    def forward(self, x, d):
        return self.density(x), torch.sigmoid(self.color).expand(len(x), 3)


@dataclass
class FitSphereConfig:
    representation: Choice = choice("representation", "ball")
    target_radius: float = 0.6
    lr: float = 0.05
    nan_at_step: int | None = None  # for testing the trainer's NaN handling


class FitSphere:
    def __init__(self, config: FitSphereConfig, run):
        self.config, self.run = config, run
        aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
        self.renderer = VolumeRenderer(aabb, RenderSettings(samples_per_diagonal=64))
        self.field = config.representation.build(aabb=aabb, step_size=self.renderer.step_size)
        self.optimizer = torch.optim.Adam(self.field.parameters(), lr=config.lr)

    def step(self, step):
        points = torch.rand(512, 3) * 2 - 1
        inside = (points.norm(dim=-1) < self.config.target_radius).float() * 100
        loss = ((self.field.density(points) - inside) ** 2).mean() / 1e4
        loss = loss + ((torch.sigmoid(self.field.color) - torch.tensor([0.9, 0.2, 0.1])) ** 2).mean()
        if self.config.nan_at_step is not None and step >= self.config.nan_at_step:
            loss = loss * float("nan")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "radius": self.field.radius.item()}

    def state_dict(self):
        return {"field": self.field.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.field.load_state_dict(state["field"])
        self.optimizer.load_state_dict(state["optimizer"])

    def evaluate(self):
        return {"radius_error": abs(self.field.radius.item() - self.config.target_radius)}

    def outputs(self, train):
        white = torch.ones(3)
        return StageOutputs(field=self.field, renderer=self.renderer,
                            render_view=plain_view_renderer(self.renderer, self.field, white),
                            orbit=Orbit(radius=3.0, fov_x=math.radians(40), size=32),
                            metrics={"radius": self.field.radius.item(), **self.evaluate()})


@dataclass
class XyzConfig:
    precision: int = 5  # decimals per coordinate

    def __post_init__(self):
        if not 0 <= self.precision <= 9:
            raise ValueError(f"precision must be 0..9 decimals, got {self.precision}")


def make_xyz_writer(config: XyzConfig):
    def write_xyz(mesh, path):
        with open(path, "w") as f:
            for v in mesh.vertices:
                f.write(" ".join(f"{c:.{config.precision}f}" for c in v) + "\n")

    return write_xyz


@gen3d.hookimpl
def gen3d_loops():
    return [Component("fit-sphere", lambda config, run: FitSphere(config, run), FitSphereConfig,
                      "fits a ball's radius and colour (example third-party loop)", needs=("radiance",))]


@gen3d.hookimpl
def gen3d_representations():
    return [Component("ball", lambda config, aabb, step_size: Ball(config, aabb), BallConfig,
                      "a soft ball with one colour", provides=("radiance", "trainable"))]


@gen3d.hookimpl
def gen3d_exporters():
    return [Component("xyz", make_xyz_writer, XyzConfig, "vertex positions, one per line")]


@gen3d.hookimpl
def gen3d_on_step(run, step, metrics):
    STEPS_SEEN.append(step)


@gen3d.hookimpl
def gen3d_on_export(run, paths):
    EXPORTED.extend(p.name for p in paths)
