"""A third-party gen3d plugin, living outside gen3d/ and plugins/, as someone's own package would.

It provides a loop (``fit-sphere``: fits the radius and colour of a sphere-shaped density field,
a tiny but real optimisation), a representation (``ball``) and an exporter (``xyz``: a point list),
and observes the run through the lifecycle hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import gen3d
from gen3d.config import Choice, choice
from gen3d.export import MeshSettings, timed_export
from gen3d.plugins import get_component
from gen3d.specs import Component

__version__ = "1.2.3"
STEPS_SEEN: list[int] = []


@dataclass
class BallConfig:
    radius: float = 0.2
    sharpness: float = 30.0


class Ball(torch.nn.Module):
    def __init__(self, config: BallConfig):
        super().__init__()
        self.aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
        self.radius = torch.nn.Parameter(torch.tensor(config.radius))
        self.color = torch.nn.Parameter(torch.zeros(3))
        self.sharpness = config.sharpness

    def density(self, x):
        return 100 * torch.sigmoid((self.radius - x.norm(dim=-1)) * self.sharpness)

    def albedo(self, x):
        return torch.sigmoid(self.color).expand(len(x), 3)


@dataclass
class FitSphereConfig:
    representation: Choice = choice("representation", "ball")
    target_radius: float = 0.6
    lr: float = 0.05
    nan_at_step: int | None = None  # for testing the trainer's NaN handling
    export: MeshSettings = field(default_factory=lambda: MeshSettings(resolution=32, level=50.0, formats=["xyz", "glb"]))


class FitSphere:
    def __init__(self, config: FitSphereConfig, run):
        self.config, self.run = config, run
        rep = get_component("representation", config.representation.type)
        self.field = rep.factory(config.representation.config)
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

    def finish(self, train):
        mesh, files, seconds = timed_export(self.field, self.config.export, self.run.out_dir)
        return {"radius": self.field.radius.item(), "files": sorted(p.name for p in files), **self.evaluate()}


def write_xyz(mesh, path):
    with open(path, "w") as f:
        for v in mesh.vertices:
            f.write(f"{v[0]:.5f} {v[1]:.5f} {v[2]:.5f}\n")


@gen3d.hookimpl
def gen3d_loops():
    return [Component("fit-sphere", lambda config, run: FitSphere(config, run), FitSphereConfig,
                      "fits a ball's radius and colour (example third-party loop)")]


@gen3d.hookimpl
def gen3d_representations():
    return [Component("ball", Ball, BallConfig, "a soft ball with one colour")]


@gen3d.hookimpl
def gen3d_exporters():
    return [Component("xyz", lambda config: write_xyz, None, "vertex positions, one per line")]


@gen3d.hookimpl
def gen3d_on_step(run, step, metrics):
    STEPS_SEEN.append(step)
