"""What a guidance component receives and returns (kind ``guidance``).

A guidance scores rendered views and returns a loss whose gradient pushes the renderings towards
what its model expects: score distillation from a text-conditioned diffusion model, CLIP
similarity, a view-conditioned model (Zero-1-to-3) that also needs each view's camera and a
reference image, or a teacher field that knows the answer. Loops stay model-agnostic: they
render, fill a :class:`GuidanceInput`, call the guidance, and back-propagate its loss.

Camera convention of :class:`ViewAngles` (gen3d's world is right-handed and Z up):

- ``elevation``: degrees above the horizontal plane through the look-at point (90 = from above);
- ``azimuth``: degrees counter-clockwise seen from above, 0 = the camera on the +x axis looking
  along -x at the object's front; in [-180, 180);
- ``distance``: from the camera to the look-at point, in world units.

A model with another convention converts from these: Zero-1-to-3 (:func:`relative_camera`)
measures the polar angle from +z (``90 - elevation``) and the azimuth as ``atan2(y, x)`` of the
camera's position, in a Z-up world: gen3d's azimuth, with the same sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from .cameras import Cameras


@dataclass
class ViewAngles:
    """Spherical coordinates of cameras around their look-at point, one entry per view [N]."""

    elevation: torch.Tensor  # degrees above the horizon
    azimuth: torch.Tensor  # degrees, 0 = +x, counter-clockwise from above, in [-180, 180)
    distance: torch.Tensor  # world units

    @staticmethod
    def of(cameras: Cameras, center: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> "ViewAngles":
        """The angles of cameras (camera-to-world poses) around ``center``."""
        offset = cameras.c2w[:, :3, 3].float().cpu() - torch.tensor(center, dtype=torch.float32)
        distance = offset.norm(dim=-1)
        elevation = torch.rad2deg(torch.asin((offset[:, 2] / distance.clamp_min(1e-9)).clamp(-1, 1)))
        azimuth = torch.rad2deg(torch.atan2(offset[:, 1], offset[:, 0]))
        return ViewAngles(elevation, (azimuth + 180) % 360 - 180, distance)


@dataclass
class ReferenceView:
    """A conditioning image and where it was seen from (image-to-3D)."""

    image: torch.Tensor  # [3, H, W] (or [4, H, W] with alpha) in 0..1, sRGB
    camera: Cameras  # one camera
    angles: ViewAngles  # of that camera


@dataclass
class GuidanceInput:
    """One batch of rendered views for a guidance to score.

    ``images``: [B, 3, H, W] renderings in 0..1 (sRGB, what a model sees in photos), or
    [B, 4, h, w] latents where the guidance accepts them. ``prompts``: one per view, view
    suffixes already added. ``cameras``: the B cameras the views were rendered from (camera-to-
    world, intrinsics: the field of view is ``2 atan(width / (2 fx))``). ``angles``: the same
    cameras as elevation / azimuth / distance (module docstring). ``reference``: the conditioning
    image of image-to-3D, else None. ``step`` / ``total_steps``: for schedules (timestep ranges).
    ``generator``: a CPU generator for every random draw (timesteps, noise, crops), so the
    guidance's randomness is part of the run's reproducible, checkpointed state.
    ``background``: [B, 3], the solid colour (0..1) each view was composited on, where the loop
    knows one (solid or random backgrounds); None for a learned one. A guidance that renders
    its own target (``field-teacher``) composites it on the same colour.
    """

    images: torch.Tensor
    prompts: list[str]
    cameras: Cameras
    angles: ViewAngles
    step: int = 0
    total_steps: int = 1
    reference: ReferenceView | None = None
    generator: torch.Generator | None = None
    background: torch.Tensor | None = None

    def __post_init__(self) -> None:
        batch = self.images.shape[0]
        if len(self.prompts) != batch or len(self.cameras) != batch or len(self.angles.azimuth) != batch:
            raise ValueError(f"GuidanceInput: {batch} images but {len(self.prompts)} prompts, "
                             f"{len(self.cameras)} cameras, {len(self.angles.azimuth)} angles")
        if self.background is not None and tuple(self.background.shape) != (batch, 3):
            raise ValueError(f"GuidanceInput: background must be [{batch}, 3] (one colour a view), "
                             f"got {list(self.background.shape)}")

    def fov_x(self) -> torch.Tensor:
        """Horizontal field of view of each camera, radians [B]."""
        return 2 * torch.atan(0.5 * self.cameras.width / self.cameras.fx)


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar; its gradient w.r.t. the images is the guidance signal
    metrics: dict[str, float] = field(default_factory=dict)


class Guidance(Protocol):
    """A guidance is a callable: ``guidance(batch) -> GuidanceOutput``."""

    def __call__(self, batch: GuidanceInput) -> GuidanceOutput: ...


# --- score distillation pieces shared by the diffusion-style guidances -----------------------

Weighting = Literal["one_minus_alpha", "sigma_squared", "uniform"]


class TimestepSchedule(Protocol):
    """The settings :func:`t_range` reads (a guidance's config)."""

    t_min: float
    t_max: float
    t_anneal: str  # none, linear or sqrt
    t_max_end: float


def t_range(config: TimestepSchedule, step: int, total_steps: int) -> tuple[float, float]:
    """The [low, high] fraction of the diffusion time to sample from at this step: fixed, or with
    ``t_max`` lowered towards ``t_max_end`` over the run (linearly, or by the square root of the
    progress: most of the drop early)."""
    if config.t_anneal == "none" or total_steps <= 1:
        return config.t_min, config.t_max
    progress = min(1.0, step / (total_steps - 1))
    if config.t_anneal == "sqrt":
        progress = math.sqrt(progress)
    return config.t_min, config.t_max + (config.t_max_end - config.t_max) * progress


def sample_timesteps(low: float, high: float, num_train_timesteps: int, batch: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch`` integer timesteps uniform in [low, high] x (num_train_timesteps - 1), on the CPU."""
    last = num_train_timesteps - 1
    t_low = round(low * last)
    t_high = max(t_low, round(high * last))
    return torch.randint(t_low, t_high + 1, (batch,), generator=generator)


def sds_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """w(t): ``one_minus_alpha`` is DreamFusion's 1 - abar_t (the VP noise variance);
    ``sigma_squared`` the VE noise variance (1 - abar_t) / abar_t; ``uniform`` 1."""
    alpha = alphas_cumprod[t]
    if weighting == "one_minus_alpha":
        return 1 - alpha
    if weighting == "sigma_squared":
        return (1 - alpha) / alpha
    return torch.ones_like(alpha)


def sds_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient w.r.t. ``latents`` is ``grad`` / batch size (the SDS gradient,
    averaged over the batch): d/dz 0.5 ||z - stopgrad(z - grad)||^2 = grad."""
    target = (latents - grad).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum") / len(latents)


def annealed(start: float, end: float, step: int, steps: int) -> float:
    """A setting that moves linearly from ``start`` to ``end`` over the first ``steps`` steps, then stays."""
    if steps <= 0:
        return end
    return start + (end - start) * min(1.0, step / steps)


def perfect_denoiser_gradient(images: torch.Tensor, target: torch.Tensor, alphas_cumprod: torch.Tensor,
                              t: torch.Tensor, noise: torch.Tensor, weighting: Weighting,
                              grad_clip: float | None = None) -> torch.Tensor:
    """w(t) (eps_hat - eps) of a denoiser that knows the clean image is ``target``: for
    x_t = sqrt(abar) x + sqrt(1 - abar) eps it predicts eps_hat = (x_t - sqrt(abar) target) / sqrt(1 - abar),
    so the gradient is w(t) sqrt(abar / (1 - abar)) (x - target). The teachers (``field-teacher``,
    ``view-teacher``) use it in image space; no graph is kept."""
    with torch.no_grad():
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x = images.detach().float()
        noisy = abar.sqrt() * x + (1 - abar).sqrt() * noise
        eps_hat = (noisy - abar.sqrt() * target.float()) / (1 - abar).sqrt()
        grad = sds_weights(alphas_cumprod, t, weighting).view(-1, 1, 1, 1) * (eps_hat - noise)
        grad = torch.nan_to_num(grad)
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
    return grad


def ddpm_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000,
                        schedule: Literal["scaled_linear", "linear"] = "scaled_linear") -> torch.Tensor:
    """abar_t of a DDPM noise schedule (diffusers' DDPMScheduler with the same betas gives the same);
    the defaults are Stable Diffusion's (and Zero-1-to-3's) training schedule."""
    if schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


# --- view-conditioned diffusion (Zero-1-to-3, Stable Zero123) ------------------------------------

ZeroVariant = Literal["zero123", "stable-zero123"]


def relative_camera(views: ViewAngles, reference: ViewAngles, variant: ZeroVariant = "zero123") -> torch.Tensor:
    """Zero-1-to-3's camera conditioning T [B, 4] of each view relative to the reference view, as
    the model was trained (Zero-1-to-3's ``get_T``: spherical coordinates of the camera positions,
    polar angle theta from +z, azimuth phi = atan2(y, x), radius r, in a Z-up world):

        T = [theta_view - theta_ref (radians), sin(phi_view - phi_ref), cos(phi_view - phi_ref), x]

    with x = r_view - r_ref for ``zero123`` and x = theta_ref (the reference's absolute polar
    angle, radians) for ``stable-zero123``. gen3d's elevation is 90 degrees - theta and its azimuth is
    phi, so a view above the reference has a negative first entry and a view counter-clockwise of
    it (seen from above) a positive sine. ``reference`` holds one view (or B)."""
    polar_view = torch.deg2rad(90.0 - views.elevation.float())
    polar_ref = torch.deg2rad(90.0 - reference.elevation.float()).expand_as(polar_view)
    delta_azimuth = torch.deg2rad(views.azimuth.float() - reference.azimuth.float())
    if variant == "zero123":
        fourth = views.distance.float() - reference.distance.float()
    elif variant == "stable-zero123":
        fourth = polar_ref
    else:
        raise ValueError(f"model variant must be zero123 or stable-zero123, got {variant!r}")
    return torch.stack([polar_view - polar_ref, torch.sin(delta_azimuth), torch.cos(delta_azimuth),
                        fourth.expand_as(polar_view)], dim=-1)
