"""``text-to-3d``: optimise a radiance field so its renderings satisfy a text guidance (DreamFusion).

Each step renders a few random views of the field (random elevation, azimuth, distance and
field of view around the object), shades them in one of DreamFusion's modes (albedo,
Lambertian under a random light near the camera, or textureless: white albedo, so the
guidance must be satisfied by geometry alone), composites a background (learned from the ray
direction, solid, or a random colour per view), asks the guidance component for a loss on the
images with view-dependent prompts, adds regularisers (opacity sparsity, opacity entropy,
orientation of normals towards the camera) and steps the field's optimiser.

The loop works with any representation that renders colour and opacity; Lambertian shading
and the orientation loss use ``field.normals(x)`` when the field has it, else finite
differences of its density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gen3d import (Choice, Component, ConfigError, FieldLoop, FieldTrainer, GuidanceInput, Orbit, RenderSettings, StageOutputs,
                   ViewAngles, ViewPrompts, binary_entropy, choice, hookimpl, random_views, view_prompts)


@dataclass
class CameraSampling:
    sizes: list[int] = field(default_factory=lambda: [64])  # rendered image side per stage
    size_at: list[int] = field(default_factory=list)  # steps where the next size starts
    batch: int = 1  # views per step
    elevation: list[float] = field(default_factory=lambda: [-10.0, 60.0])  # degrees
    azimuth: list[float] = field(default_factory=lambda: [-180.0, 180.0])  # degrees, 0 = front (+x)
    distance: list[float] = field(default_factory=lambda: [1.5, 2.0])  # in units of the box half-size
    fov: list[float] = field(default_factory=lambda: [40.0, 70.0])  # degrees

    def __post_init__(self) -> None:
        if len(self.size_at) != len(self.sizes) - 1:
            raise ValueError(f"size_at needs {len(self.sizes) - 1} steps for {len(self.sizes)} sizes")
        if any(s < 8 for s in self.sizes) or self.batch < 1:
            raise ValueError("sizes must be at least 8 pixels and batch at least 1")
        for name in ("elevation", "azimuth", "distance", "fov"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ValueError(f"{name} must be a range [low, high], got {bounds}")
        if self.distance[0] <= 0 or not (0 < self.fov[0] and self.fov[1] < 180):
            raise ValueError("distance must be positive and fov within (0, 180) degrees")

    def size_at_step(self, step: int) -> int:
        return self.sizes[sum(step >= s for s in self.size_at)]


@dataclass
class Shading:
    # Probabilities of the modes after the albedo-only warm-up (Lambertian gets the rest).
    albedo: float = 0.25
    textureless: float = 0.25
    albedo_only_steps: int = 100  # shape first: shading needs some geometry to mean anything
    ambient: float = 0.1  # share of light that does not depend on the normal
    light_jitter: float = 0.5  # random offset of the light direction from the camera direction
    normal_eps: float = 0.01  # finite-difference step (in box units) for fields without normals()

    def __post_init__(self) -> None:
        if min(self.albedo, self.textureless) < 0 or self.albedo + self.textureless > 1:
            raise ValueError("albedo and textureless are probabilities that must add up to at most 1")
        if not 0 <= self.ambient <= 1:
            raise ValueError(f"ambient must be in [0, 1], got {self.ambient}")


@dataclass
class BackgroundSettings:
    kind: Literal["learned", "solid", "random"] = "learned"
    color: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # for solid (and the previews)
    lr: float = 1e-3  # learned background's Adam step


@dataclass
class Regularisers:
    opacity: float = 0.0  # sparsity: mean sqrt(opacity^2 + 0.01), discourages fog filling the view
    entropy: float = 0.0  # binary entropy of each ray's opacity: rays either hit or miss
    orientation: float = 0.0  # sum_i w_i max(0, n_i . d)^2: normals must face the camera (Ref-NeRF)


@dataclass
class PreviewSettings:
    size: int = 128  # turntable side (preview.size overrides it)
    elevation: float = 15.0  # degrees (preview.elevation overrides it)


@dataclass
class TextTo3DConfig:
    prompt: str = ""
    guidance: Choice = choice("guidance", "stable-diffusion")
    representation: Choice = choice("representation", "grid-nerf")
    view_prompts: ViewPrompts = field(default_factory=ViewPrompts)
    box: float = 1.0  # the scene box is [-box, box]^3
    cameras: CameraSampling = field(default_factory=CameraSampling)
    shading: Shading = field(default_factory=Shading)
    background: BackgroundSettings = field(default_factory=BackgroundSettings)
    regularisers: Regularisers = field(default_factory=Regularisers)
    render: RenderSettings = field(default_factory=RenderSettings)
    turntable: PreviewSettings = field(default_factory=PreviewSettings)

    def __post_init__(self) -> None:
        if self.box <= 0:
            raise ValueError(f"box must be positive, got {self.box}")


class LearnedBackground(nn.Module):
    """Colour from the ray direction only (an environment at infinity), a small MLP."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(dirs))


NEEDS = ("radiance",)  # what the loop asks of its representation


class TextTo3D(FieldLoop):
    def __init__(self, config: TextTo3DConfig, run):
        if not config.prompt.strip():
            raise ConfigError(f"{run.recipe.source}: prompt is missing: add prompt=\"a hamburger\" "
                              "on the command line or a prompt: key to the recipe")
        self.config, self.run = config, run
        device = run.device
        self.total_steps = run.steps
        self.aabb = torch.tensor([-config.box] * 3 + [config.box] * 3, device=device)
        # The guidance's draws (timesteps, noise, crops) come from a CPU generator: reproducible on any device.
        self.trainer = FieldTrainer(run, config.representation, self.aabb, config.render, needs=NEEDS,
                                    generator_device="cpu", loop_name="text-to-3d")
        self.guidance = config.guidance.build(device=device)
        self.background = LearnedBackground().to(device)
        self.background_optimizer = torch.optim.Adam(self.background.parameters(), lr=config.background.lr)
        run.log(f"prompt: {config.prompt!r}; guidance: {config.guidance.type}; renderer: {self.renderer.path}")

    # --- one step ---------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        cfg = self.config
        occupied = self.trainer.prepare(step)
        size = cfg.cameras.size_at_step(step)
        views = self.sample_views(cfg.cameras.batch, size)
        origins, dirs = self.view_rays(views.cameras)
        background = self.background_colours(dirs, len(views.cameras), size)
        mode = self.shading_mode(step)
        light = self.light_directions(views.cameras)
        shader = Shader(self.field, mode, light, size * size, cfg.shading,
                        need_normals=mode != "albedo" or cfg.regularisers.orientation > 0)
        out = self.renderer.render(self.field, origins, dirs, background, stratified=True, shader=shader)
        images = out.rgb.view(len(views.cameras), size, size, 3).permute(0, 3, 1, 2)
        prompts = view_prompts(cfg.prompt, views.azimuth, views.elevation, cfg.view_prompts)
        angles = ViewAngles(views.elevation, views.azimuth, views.distance)
        # Solid and random backgrounds are one colour a view: a guidance that renders its own
        # target (field-teacher) composites it on the same colour.
        view_background = None if cfg.background.kind == "learned" else background.view(len(images), -1, 3)[:, 0]
        guided = self.guidance(GuidanceInput(images, prompts, views.cameras, angles, step, self.total_steps,
                                             generator=self.generator, background=view_background))
        loss = guided.loss + self.regularisers(out, dirs, shader.normals)
        own = self.trainer.regularizer(step)
        if own is not None:  # the representation's own (e.g. total variation)
            loss = loss + own
        self.background_optimizer.zero_grad(set_to_none=True)
        self.trainer.backward(loss)
        self.trainer.optimizer_step(step)
        if cfg.background.kind == "learned":
            self.background_optimizer.step()
        metrics = {"loss": loss.item(), "opacity": float(out.opacity.detach().mean()),
                   "samples_per_ray": out.samples / len(origins), **guided.metrics}
        if occupied is not None:
            metrics["occupied"] = occupied
        return metrics

    def sample_views(self, n: int, size: int):
        c = self.config.cameras
        box = self.config.box
        return random_views(n, size, tuple(c.elevation), tuple(c.azimuth), (c.distance[0] * box, c.distance[1] * box),
                            tuple(c.fov), self.generator)

    def view_rays(self, cameras) -> tuple[torch.Tensor, torch.Tensor]:
        cameras = cameras.to(self.run.device)
        rays = [cameras.image_rays(i) for i in range(len(cameras))]
        return torch.cat([o for o, _ in rays]), torch.cat([d for _, d in rays])

    def background_colours(self, dirs: torch.Tensor, views: int, size: int) -> torch.Tensor:
        kind = self.config.background.kind
        if kind == "learned":
            return self.background(dirs)
        if kind == "random":  # one random colour per view: opacity must be explicit
            colours = torch.rand(views, 3, generator=self.generator).to(dirs.device)
            return colours.repeat_interleave(size * size, dim=0)
        return torch.tensor(self.config.background.color, device=dirs.device).expand(len(dirs), 3)

    def shading_mode(self, step: int) -> str:
        s = self.config.shading
        if step < s.albedo_only_steps:
            return "albedo"
        u = float(torch.rand(1, generator=self.generator))
        if u < s.albedo:
            return "albedo"
        return "textureless" if u < s.albedo + s.textureless else "lambertian"

    def light_directions(self, cameras) -> torch.Tensor:
        """Unit directions towards a light near each camera (DreamFusion samples the light around it)."""
        position = cameras.c2w[:, :3, 3]
        jitter = self.config.shading.light_jitter * torch.randn(position.shape, generator=self.generator)
        light = F.normalize(position, dim=-1) + jitter
        return F.normalize(light, dim=-1).to(self.run.device)

    def regularisers(self, out, dirs: torch.Tensor, normals: torch.Tensor | None) -> torch.Tensor:
        reg = self.config.regularisers
        loss = torch.zeros((), device=dirs.device)
        opacity = out.opacity.clamp(1e-5, 1 - 1e-5)
        if reg.opacity > 0:
            loss = loss + reg.opacity * torch.sqrt(opacity ** 2 + 0.01).mean()
        if reg.entropy > 0:
            loss = loss + reg.entropy * binary_entropy(out.opacity).mean()
        if reg.orientation > 0 and normals is not None and out.weights is not None:
            facing = (normals * dirs[out.ray_index]).sum(-1).clamp_min(0) ** 2
            loss = loss + reg.orientation * (out.weights.detach() * facing).sum() / len(dirs)
        return loss

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {**self.trainer.state_dict(), "background": self.background.state_dict(),
                "background_optimizer": self.background_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)
        self.background.load_state_dict(state["background"])
        self.background_optimizer.load_state_dict(state["background_optimizer"])

    def evaluate(self) -> dict[str, float]:
        return {}  # no ground truth for a prompt; the turntable preview is the evaluation

    # --- outputs ------------------------------------------------------------------------------

    def outputs(self, train) -> StageOutputs:
        c, p = self.config.cameras, self.config.turntable
        distance = 0.5 * (c.distance[0] + c.distance[1]) * self.config.box
        metrics = {"prompt": self.config.prompt}
        if train is not None:
            metrics["final_loss"] = round(train.last_metrics.get("loss", float("nan")), 5)
        # No silhouettes to match: the core places the surface by the field's own opacity.
        return StageOutputs(field=self.field, renderer=self.renderer, render_view=self.render_view,
                            orbit=Orbit(distance, math.radians(sum(c.fov) / 2), p.size, p.elevation),
                            metrics=metrics)

    @torch.no_grad()
    def render_view(self, cameras, index: int) -> np.ndarray:
        origins, dirs = cameras.image_rays(index)
        out = self.renderer.render_chunked(self.field, origins, dirs, self.preview_background(dirs))
        return out.rgb.view(cameras.height, cameras.width, 3).clamp(0, 1).cpu().numpy()

    def preview_background(self, dirs: torch.Tensor) -> torch.Tensor:
        if self.config.background.kind == "learned":
            return self.background(dirs)
        return torch.tensor(self.config.background.color, device=dirs.device)


class Shader:
    """Colours samples in one shading mode; keeps the normals it computed for the orientation loss."""

    def __init__(self, field, mode: str, light: torch.Tensor, rays_per_view: int, settings: Shading,
                 need_normals: bool):
        self.field, self.mode, self.light = field, mode, light
        self.rays_per_view, self.settings, self.need_normals = rays_per_view, settings, need_normals
        self.normals: torch.Tensor | None = None
        self.points: torch.Tensor | None = None  # where the normals were taken (for smoothness losses)

    def __call__(self, points: torch.Tensor, dirs: torch.Tensor, ray_index: torch.Tensor):
        sigma, albedo = self.field(points, dirs)
        if not self.need_normals:
            return sigma, albedo
        self.normals = normals(self.field, points, dirs, self.settings.normal_eps)
        self.points = points
        if self.mode == "albedo":
            return sigma, albedo
        light = self.light[ray_index // self.rays_per_view]  # rays are view-major
        shade = self.settings.ambient + (1 - self.settings.ambient) * (self.normals * light).sum(-1).clamp_min(0)
        base = albedo if self.mode == "lambertian" else torch.ones_like(albedo)
        return sigma, base * shade[:, None]


def normals(field, points: torch.Tensor, dirs: torch.Tensor, eps: float) -> torch.Tensor:
    if hasattr(field, "normals"):
        return field.normals(points)
    # Tetrahedral finite differences of the (trainable) density: four evaluations, not six.
    offsets = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=points.dtype,
                           device=points.device)
    grad = sum(o * field(points + eps * o, dirs)[0][:, None] for o in offsets)
    return -F.normalize(grad, dim=-1, eps=1e-8)


def build(config: TextTo3DConfig, *, run) -> TextTo3D:
    return TextTo3D(config, run)


@hookimpl
def gen3d_loops():
    return [Component("text-to-3d", build, TextTo3DConfig,
                      "DreamFusion-style text-to-3D: random views, shading modes, guidance (SDS or CLIP), mesh export",
                      needs=NEEDS)]
