"""``field-teacher``: score distillation from a trained field, a diffusion model that knows the answer.

For each view of the batch the teacher (a field reconstructed by another run) is rendered at that
view's camera, and the guidance returns the gradient a perfect denoiser of the teacher's images
would give. For a rendering x, noise eps and a timestep t (sampled and weighted as in
``stable-diffusion``):

    x_t     = sqrt(abar_t) x + sqrt(1 - abar_t) eps
    eps_hat = (x_t - sqrt(abar_t) x_teacher) / sqrt(1 - abar_t)   (the noise, if x_teacher is the image)
    grad_x  = w(t) (eps_hat - eps) = w(t) sqrt(abar_t) / sqrt(1 - abar_t) (x - x_teacher)

in image space (a field has no VAE), reaching the renderer through ``sds_loss``. Two uses:

- a fidelity oracle for the guided loops: with a teacher, ``recipes/dreamfusion.yaml`` must
  rebuild the teacher's object from random views, so its cameras, shading, backgrounds, guidance
  path and export are checked end to end without a diffusion model;
- distillation: render any reconstructed field into another representation or resolution.

The teacher renders what it was trained on (the photos' sRGB colour), with no shading, on each
view's background colour when the loop passes it (``GuidanceInput.background``), else on the
configured ``background``: pair it with albedo-only shading and a solid background of that colour.
``benchmarks/bench_teacher.py`` holds the override set that turns ``dreamfusion.yaml`` into a
distillation of the shipped toy, and scores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gen3d import (Component, Gen3DError, GuidanceInput, GuidanceOutput, TrainedField, Weighting, ddpm_alphas_cumprod,
                   hookimpl, load_trained_field, perfect_denoiser_gradient, psnr, sample_timesteps, sds_loss, t_range)


@dataclass
class FieldTeacherConfig:
    # The teacher: a run folder of `gen3d run ... --out DIR` (recipe.yaml + checkpoints/), or a
    # checkpoint file inside one. On the command line, relative to where you run.
    run: Path
    # Of a multi-stage teacher run, the stage whose field teaches (None: the last, or the stage
    # folder `run` points into).
    stage: str | None = None
    # The solid colour the teacher is composited on when the loop does not say which colour each
    # view has (GuidanceInput.background). It must be the student's (text-to-3d: background.kind
    # =solid, background.color): where they differ the student is taught to paint the teacher's
    # background into space.
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # Teacher renderings averaged over this many sample shifts (RenderSettings.eval_offsets):
    # a cleaner target where a ray grazes thin parts, at that many times the teacher's cost.
    offsets: int = 1
    # The DDPM noise schedule abar_t of the imagined diffusion model. With a perfect denoiser the
    # noise cancels and only w(t) sqrt(abar_t / (1 - abar_t)) is left, a per-view weight on
    # (x - x_teacher): Stable Diffusion's schedule (scaled_linear, 0.00085..0.012 over 1000 steps)
    # keeps those weights, and so the settings below, comparable with `stable-diffusion`'s.
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    # Timesteps uniform in [t_min, t_max] x num_train_timesteps, as stable-diffusion samples them;
    # annealing (none, linear, sqrt) lowers t_max to t_max_end over the run.
    t_min: float = 0.02
    t_max: float = 0.98
    t_anneal: Literal["none", "linear", "sqrt"] = "none"
    t_max_end: float = 0.5
    # w(t), as in stable-diffusion: one_minus_alpha (DreamFusion's; the weight on x - x_teacher
    # is then sqrt(abar (1 - abar)), at most 0.5), sigma_squared (weight sqrt((1 - abar) / abar),
    # up to ~14 at t = 0.98: pair it with grad_clip) or uniform.
    weighting: Weighting = "one_minus_alpha"
    grad_clip: float | None = None  # clip each element of the image gradient to [-c, c]
    # Multiplies the loss (and so the gradient). 1: stable-diffusion's scale (a sum over pixels).
    # Under Adam the scale only decides which gradients fall under its eps: 1e-3 (about a pixel-mean
    # loss, as reconstruction's) leaves the faint gradients behind an opaque surface alone, so an
    # unseen interior is not randomised and stays solid for export (benchmarks/bench_teacher.py).
    weight: float = 1.0

    def __post_init__(self) -> None:
        if len(self.background) != 3 or not all(0 <= c <= 1 for c in self.background):
            raise ValueError(f"background must be 3 numbers in 0..1 (RGB), got {self.background}")
        if not 1 <= self.offsets <= 16:
            raise ValueError(f"offsets is renderings averaged, 1 to 16; got {self.offsets}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if not self.t_min <= self.t_max_end <= self.t_max:
            raise ValueError(f"t_max_end must lie in [t_min, t_max], got {self.t_max_end}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")


def alphas_cumprod(config: FieldTeacherConfig) -> torch.Tensor:
    return ddpm_alphas_cumprod(config.beta_start, config.beta_end, config.num_train_timesteps, config.beta_schedule)


class FieldTeacher:
    def __init__(self, config: FieldTeacherConfig, device: torch.device):
        self.config, self.device = config, torch.device(device)
        self.teacher: TrainedField = load_trained_field(config.run, self.device, config.stage)
        self.alphas = alphas_cumprod(config).to(self.device)

    def render_teacher(self, batch: GuidanceInput) -> torch.Tensor:
        """The teacher at each view's camera, [B, 3, H, W] in 0..1, at the images' resolution."""
        _, _, h, w = batch.images.shape
        cameras = batch.cameras
        if (cameras.width, cameras.height) != (w, h):
            raise Gen3DError(f"field-teacher: {w}x{h} images from {cameras.width}x{cameras.height} cameras; "
                             "render the views at their cameras' size")
        background = self.config.background if batch.background is None else batch.background.detach().float()
        return self.teacher.render_images(cameras, background, self.config.offsets)

    def gradient(self, images: torch.Tensor, teacher: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """w(t) (eps_hat - eps) of a perfect denoiser of the teacher's images; no graph is kept."""
        return perfect_denoiser_gradient(images, teacher, self.alphas, t, noise, self.config.weighting,
                                         self.config.grad_clip)

    def __call__(self, batch: GuidanceInput) -> GuidanceOutput:
        images = batch.images
        if images.dim() != 4 or images.shape[1] != 3:
            raise Gen3DError(f"field-teacher scores RGB renderings [B, 3, H, W]; got {list(images.shape)}")
        teacher = self.render_teacher(batch).to(images.device)
        low, high = t_range(self.config, batch.step, batch.total_steps)
        t = sample_timesteps(low, high, self.config.num_train_timesteps, len(images), batch.generator).to(self.device)
        noise = torch.randn(images.shape, generator=batch.generator).to(images.device)
        grad = self.gradient(images, teacher, t, noise)
        loss = self.config.weight * sds_loss(images, grad)
        return GuidanceOutput(loss, {"teacher_psnr": psnr(images.detach().cpu().numpy(), teacher.cpu().numpy()),
                                     "sds_t": float(t.float().mean()), "sds_grad": float(grad.norm())})


def build(config: FieldTeacherConfig, *, device: torch.device | str = "cpu") -> FieldTeacher:
    return FieldTeacher(config, torch.device(device))


@hookimpl
def gen3d_guidance():
    return [Component("field-teacher", build, FieldTeacherConfig,
                      "score distillation from a trained field (a run folder): a perfect denoiser of its renderings")]
