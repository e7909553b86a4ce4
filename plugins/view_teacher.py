"""``view-teacher``: a Zero-1-to-3 stand-in that knows the answer, the fidelity oracle of image-to-3D.

It gets what the real model gets, and nothing more: the reference image and, for every view, the
relative camera T that ``zero123`` would hand its UNet (``gen3d.relative_camera`` of the view and
the reference). From T it recovers the absolute camera *in the model's convention* (Zero-1-to-3's
``get_T``: polar angle from +z, azimuth atan2(y, x), radius), starting from the camera its own
reference image was rendered from, renders a trained field (the teacher, a run folder) there, and
returns the gradient of a perfect denoiser of that rendering (``perfect_denoiser_gradient``),
with the timestep schedule and weighting of ``zero123``.

So the loop under test never talks to the teacher's world directly: if it computes T with a
wrong sign or axis, or places the reference camera wrongly, the teacher renders another view than
the one the loop rendered and the reconstruction comes out mirrored, tilted or smeared. The
benchmark ``benchmarks/bench_image_to_3d.py`` scores that against the ground truth.

``mirror_azimuth`` is a test-only switch that flips the sign of T's azimuth, to show that the
check fails when the convention is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gen3d import (Cameras, Component, Gen3DError, GuidanceInput, GuidanceOutput, TrainedField, Weighting, annealed,
                   ddpm_alphas_cumprod, focal_from_fov, hookimpl, load_trained_field, look_at, perfect_denoiser_gradient,
                   psnr, relative_camera, sample_timesteps, sds_loss)


@dataclass
class TeacherCamera:
    """Where the teacher's reference image was rendered, in the teacher's world (degrees, units)."""

    elevation: float = 0.0
    azimuth: float = 0.0
    distance: float = 6.4
    fov: float = 20.0  # the model's fixed field of view: every view is rendered with it
    # The point the cameras look at and orbit: the object's centre in the teacher's world (the
    # model's frame is centred on the object, as a centred cut-out is).
    center: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


@dataclass
class ViewTeacherConfig:
    run: Path  # the teacher: a run folder of `gen3d run ... --out DIR` (or a checkpoint inside one)
    stage: str | None = None  # of a multi-stage teacher run, the stage whose field teaches (None: the last)
    reference: TeacherCamera = field(default_factory=TeacherCamera)
    model_variant: Literal["zero123", "stable-zero123"] = "zero123"  # which T the teacher reads
    # Teacher units per unit of T's change of distance (zero123's fourth entry).
    distance_scale: float = 1.0
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # Zero-1-to-3 draws on white
    offsets: int = 1  # teacher renderings averaged over this many sample shifts
    # zero123's timestep schedule and weighting (see there).
    t_min_start: float = 0.4
    t_min_end: float = 0.2
    t_max_start: float = 0.85
    t_max_end: float = 0.5
    t_anneal_steps: int = 200
    weighting: Weighting = "one_minus_alpha"
    grad_clip: float | None = None
    weight: float = 1.0
    mirror_azimuth: bool = False  # test only: T's azimuth with the wrong sign, to show the check fails

    def __post_init__(self) -> None:
        if len(self.background) != 3 or not all(0 <= c <= 1 for c in self.background):
            raise ValueError(f"background must be 3 numbers in 0..1 (RGB), got {self.background}")
        if not 0 < self.reference.fov < 180 or self.reference.distance <= 0:
            raise ValueError("reference.fov must be within (0, 180) degrees and reference.distance positive")
        if len(self.reference.center) != 3:
            raise ValueError(f"reference.center must be a point [x, y, z], got {self.reference.center}")
        if not 1 <= self.offsets <= 16:
            raise ValueError(f"offsets is renderings averaged, 1 to 16; got {self.offsets}")


def spherical(position: torch.Tensor) -> tuple[float, float, float]:
    """Zero-1-to-3's spherical coordinates of a camera position: polar from +z, azimuth atan2(y, x), radius."""
    x, y, z = (float(v) for v in position)
    return math.atan2(math.hypot(x, y), z), math.atan2(y, x), math.sqrt(x * x + y * y + z * z)


def camera_position(elevation: float, azimuth: float, distance: float) -> torch.Tensor:
    e, a = math.radians(elevation), math.radians(azimuth)
    return torch.tensor([distance * math.cos(e) * math.cos(a), distance * math.cos(e) * math.sin(a),
                         distance * math.sin(e)])


def cameras_from_relative(relative: torch.Tensor, reference_position: torch.Tensor, variant: str,
                          fov_deg: float, size: int, distance_scale: float = 1.0,
                          center: torch.Tensor | None = None) -> Cameras:
    """The absolute cameras T [B, 4] describes, relative to a reference camera at
    ``reference_position`` (relative to ``center``, which every camera looks at), in the model's
    convention; all ``size`` px square at the model's field of view."""
    center = torch.zeros(3) if center is None else center
    polar_ref, azimuth_ref, radius_ref = spherical(reference_position)
    poses = []
    for d_polar, sin_a, cos_a, fourth in relative.double().tolist():
        polar = polar_ref + d_polar
        azimuth = azimuth_ref + math.atan2(sin_a, cos_a)
        radius = radius_ref + fourth * distance_scale if variant == "zero123" else radius_ref
        eye = torch.tensor([radius * math.sin(polar) * math.cos(azimuth), radius * math.sin(polar) * math.sin(azimuth),
                            radius * math.cos(polar)], dtype=torch.float32)
        poses.append(look_at(center + eye, center))
    n = len(poses)
    f = torch.full((n,), focal_from_fov(math.radians(fov_deg), size))
    c = torch.full((n,), size / 2)
    return Cameras(torch.stack(poses), f, f.clone(), c, c.clone(), size, size)


class ViewTeacher:
    def __init__(self, config: ViewTeacherConfig, device: torch.device):
        self.config, self.device = config, torch.device(device)
        self.teacher: TrainedField = load_trained_field(config.run, self.device, config.stage)
        self.alphas = ddpm_alphas_cumprod().to(self.device)
        ref = config.reference
        self.reference_position = camera_position(ref.elevation, ref.azimuth, ref.distance)
        self.center = torch.tensor(ref.center, dtype=torch.float32)
        self.reference_psnr: float | None = None

    def relative_cameras(self, batch: GuidanceInput) -> torch.Tensor:
        """T of each view: exactly what ``zero123`` computes and hands its UNet."""
        relative = relative_camera(batch.angles, batch.reference.angles, self.config.model_variant)
        if self.config.mirror_azimuth:
            relative = relative * torch.tensor([1.0, -1.0, 1.0, 1.0])
        return relative

    def check_variant(self, relative: torch.Tensor) -> None:
        if self.config.model_variant != "stable-zero123":
            return
        polar_ref = spherical(self.reference_position)[0]
        said = float(relative[0, 3])
        if abs(said - polar_ref) > math.radians(1.0):
            raise Gen3DError(f"view-teacher: T says the reference's polar angle is {math.degrees(said):.1f} deg, but "
                             f"the teacher's reference camera is at {math.degrees(polar_ref):.1f} deg: set the loop's "
                             "reference elevation to the teacher's (reference.elevation)")

    def render(self, cameras: Cameras, background) -> torch.Tensor:
        return self.teacher.render_images(cameras, background, self.config.offsets)

    def score_reference(self, batch: GuidanceInput) -> None:
        """Once: how close the loop's reference image is to the teacher's own view from its reference camera."""
        image = batch.reference.image.float().cpu()
        rgb = image[:3] * image[3:] + (1 - image[3:]) if image.shape[0] == 4 else image[:3]
        size = rgb.shape[-1]
        own = cameras_from_relative(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), self.reference_position, "zero123",
                                    self.config.reference.fov, size, center=self.center)
        mine = self.render(own, [1.0, 1.0, 1.0])[0].cpu()
        self.reference_psnr = psnr(rgb.numpy(), mine.numpy())

    def __call__(self, batch: GuidanceInput) -> GuidanceOutput:
        if batch.reference is None:
            raise Gen3DError("view-teacher needs a reference view (an image-to-3D loop such as image-to-3d)")
        images = batch.images
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise Gen3DError(f"view-teacher scores square RGB renderings [B, 3, S, S]; got {list(images.shape)}")
        if self.reference_psnr is None:
            self.score_reference(batch)
        relative = self.relative_cameras(batch)
        self.check_variant(relative)
        cameras = cameras_from_relative(relative, self.reference_position, self.config.model_variant,
                                        self.config.reference.fov, images.shape[-1], self.config.distance_scale,
                                        self.center)
        background = self.config.background if batch.background is None else batch.background.detach().float()
        target = self.render(cameras, background).to(images.device)
        cfg = self.config
        low = annealed(cfg.t_min_start, cfg.t_min_end, batch.step, cfg.t_anneal_steps)
        high = annealed(cfg.t_max_start, cfg.t_max_end, batch.step, cfg.t_anneal_steps)
        t = sample_timesteps(low, high, len(self.alphas), len(images), batch.generator).to(self.device)
        noise = torch.randn(images.shape, generator=batch.generator).to(images.device)
        grad = perfect_denoiser_gradient(images, target, self.alphas, t, noise, cfg.weighting, cfg.grad_clip)
        loss = cfg.weight * sds_loss(images, grad)
        return GuidanceOutput(loss, {"teacher_psnr": psnr(images.detach().cpu().numpy(), target.cpu().numpy()),
                                     "reference_psnr": round(self.reference_psnr, 2), "sds_t": float(t.float().mean())})


def build(config: ViewTeacherConfig, *, device: torch.device | str = "cpu") -> ViewTeacher:
    return ViewTeacher(config, torch.device(device))


@hookimpl
def gen3d_guidance():
    return [Component("view-teacher", build, ViewTeacherConfig,
                      "a Zero-1-to-3 stand-in that renders a trained field at the view T describes (a fidelity oracle)")]
