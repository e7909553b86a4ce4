"""``image-to-3d``: a radiance field from one cut-out photo and a view-conditioned guidance (Zero-1-to-3).

The reference image is seen from a fixed *reference camera* (elevation ~0, azimuth 0 = the
object's front on +x, a distance and field of view that match how the cut-out was centred:
Zero-1-to-3 was trained on objects filling ~80 % of a 256 px frame, drawn at a fixed field of
view). Each step does two things, whose losses are added before one optimiser step:

1. a guidance sub-step: a few random views around the object (elevation and azimuth ranges
   that widen from the reference's over the first ``widen_steps``), rendered and scored by the
   guidance, which gets each view's camera and the reference (``GuidanceInput.reference``);
2. a reference sub-step: the reference camera rendered and compared with the cut-out: colour
   (MSE, composited on the background), mask (MSE of the opacity against the alpha), and
   optionally relative depth (1 - Pearson correlation against a monocular estimate, with the
   sign that makes a disparity map agree with depth).

Regularisers as in ``text-to-3d`` (opacity sparsity, opacity entropy, orientation), plus the
smoothness of normals in 3D: neighbouring points of the surface should face the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from gen3d import (Cameras, Choice, Component, ConfigError, DataError, FieldLoop, FieldTrainer, GuidanceInput, Orbit,
                   ReferenceView, RenderSettings, StageOutputs, ViewAngles, atomic_path, binary_entropy, choice,
                   focal_from_fov, hookimpl, look_at, psnr, random_views, to_uint8)
from gen3d_plugins.text_to_3d import PreviewSettings, Shader, Shading, normals

NEEDS = ("radiance",)


@dataclass
class ReferenceSettings:
    # The cut-out: an RGBA image (straight alpha, the object centred), or None to read the
    # rgba.png of the earlier preprocessing stage `from_stage`.
    image: Path | None = None
    from_stage: str | None = None
    elevation: float = 0.0  # degrees: photos are mostly taken from about the object's height
    azimuth: float = 0.0  # degrees: 0 puts the photo's view on +x, the object's front
    # Distance and field of view of the reference camera. With the object filling `fill` (0.8)
    # of the frame, 3.8 units at 20 degrees put it inside a box of about +-0.6: the box below.
    distance: float = 3.8
    fov: float = 20.0
    size: int = 128  # the reference view is rendered (and the cut-out resized) to this side
    # Reference pixels a step, drawn at random (None: the whole view). The losses are means over
    # pixels, so a random subset estimates them without bias at a fraction of the rays.
    rays: int | None = 4096

    def __post_init__(self) -> None:
        if self.image is not None and self.from_stage is not None:
            raise ValueError("give reference.image or reference.from_stage, not both")
        if self.distance <= 0 or not 0 < self.fov < 180 or self.size < 8:
            raise ValueError("reference: distance must be positive, fov within (0, 180), size at least 8")
        if self.rays is not None and self.rays < 1:
            raise ValueError(f"reference.rays must be at least 1 (or null: every pixel), got {self.rays}")


@dataclass
class ViewSampling:
    sizes: list[int] = field(default_factory=lambda: [64])  # rendered view side per stage
    size_at: list[int] = field(default_factory=list)  # steps where the next size starts
    batch: int = 1  # random views per step
    elevation: list[float] = field(default_factory=lambda: [-10.0, 80.0])  # degrees, at full width
    azimuth: list[float] = field(default_factory=lambda: [-180.0, 180.0])  # degrees, at full width
    # The ranges open from the reference's angles to the full ones over these steps: the back of
    # the object is only asked for once the front has a shape.
    widen_steps: int = 200

    def __post_init__(self) -> None:
        if len(self.size_at) != len(self.sizes) - 1:
            raise ValueError(f"size_at needs {len(self.sizes) - 1} steps for {len(self.sizes)} sizes")
        if any(s < 8 for s in self.sizes) or self.batch < 1 or self.widen_steps < 0:
            raise ValueError("sizes must be at least 8 pixels, batch at least 1, widen_steps 0 or more")
        for name in ("elevation", "azimuth"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ValueError(f"{name} must be a range [low, high], got {bounds}")

    def size_at_step(self, step: int) -> int:
        return self.sizes[sum(step >= s for s in self.size_at)]


@dataclass
class ImageLosses:
    rgb: float = 1.0  # reference view's colour, mean squared error
    mask: float = 1.0  # reference view's opacity against the cut-out's alpha, mean squared error
    depth: float = 0.0  # 1 - Pearson(rendered depth, -disparity) on the mask; needs a depth map
    opacity: float = 0.0  # sparsity: mean sqrt(opacity^2 + 0.01) of the random views
    entropy: float = 0.0  # binary entropy of each ray's opacity: rays either hit or miss
    orientation: float = 0.0  # normals must face the camera (Ref-NeRF)
    normal_smoothness: float = 0.0  # |n(x) - n(x + jitter)|^2 at surface samples
    normal_jitter: float = 0.01  # the neighbour's offset, in world units


@dataclass
class ImageTo3DConfig:
    guidance: Choice = choice("guidance", "zero123")
    representation: Choice = choice("representation", "grid-nerf")
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    views: ViewSampling = field(default_factory=ViewSampling)
    losses: ImageLosses = field(default_factory=ImageLosses)
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # Zero-1-to-3 draws on white
    box: float = 0.6  # the scene box is [-box, box]^3 (see reference.distance)
    render: RenderSettings = field(default_factory=RenderSettings)
    turntable: PreviewSettings = field(default_factory=PreviewSettings)

    def __post_init__(self) -> None:
        if self.box <= 0:
            raise ValueError(f"box must be positive, got {self.box}")
        if len(self.background) != 3 or not all(0 <= c <= 1 for c in self.background):
            raise ValueError(f"background must be 3 numbers in 0..1 (RGB), got {self.background}")


def camera_at(elevation: float, azimuth: float, distance: float, fov_deg: float, size: int) -> Cameras:
    """One camera looking at the origin from these angles (gen3d's: Z up, azimuth 0 = +x)."""
    e, a = math.radians(elevation), math.radians(azimuth)
    eye = distance * torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    f = torch.tensor([focal_from_fov(math.radians(fov_deg), size)])
    c = torch.tensor([size / 2])
    return Cameras(look_at(eye, torch.zeros(3))[None], f, f.clone(), c, c.clone(), size, size)


def read_cutout(path: Path) -> torch.Tensor:
    """[4, H, W] in 0..1 from an RGBA image file; a clear error for anything else."""
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
            has_alpha = "A" in image.getbands()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not an image ({exc.__class__.__name__})") from None
    if not has_alpha or rgba[..., 3].min() > 0.99:
        raise DataError(f"{path}: has no transparent background; image-to-3D needs a cut-out (run the "
                        "preprocess stage first, as recipes/zero123.yaml does)")
    return torch.from_numpy(rgba).permute(2, 0, 1).contiguous()


def resize_cutout(rgba: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resized straight-alpha RGBA; premultiplied while resampling, so the colour hidden
    under transparent pixels does not bleed into the object's edge."""
    alpha = rgba[3:]
    small = F.interpolate(torch.cat([rgba[:3] * alpha, alpha])[None], size=(size, size), mode="area")[0]
    a = small[3:]
    return torch.cat([torch.where(a > 1e-4, small[:3] / a.clamp_min(1e-4), torch.zeros_like(small[:3])), a])


def depth_in_cutout(depth: np.ndarray, box: list[float], size: int, fill: float) -> torch.Tensor:
    """The preprocessing stage's depth map (input pixels) resampled into its cut-out's frame: the
    square around the object's box whose side is the box's longer side / ``fill`` (centre_object)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) / fill
    left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
    h, w = depth.shape
    u = left + (torch.arange(size) + 0.5) * side / size  # input x of each output column
    v = top + (torch.arange(size) + 0.5) * side / size
    grid = torch.stack(torch.meshgrid(2 * u / w - 1, 2 * v / h - 1, indexing="xy"), dim=-1)[None].float()
    out = F.grid_sample(torch.from_numpy(depth)[None, None].float(), grid, align_corners=False, padding_mode="border")
    return out[0, 0]


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-8)


class ImageTo3D(FieldLoop):
    def __init__(self, config: ImageTo3DConfig, run):
        self.config, self.run = config, run
        device = run.device
        self.total_steps = run.steps
        ref = config.reference
        self.cutout_path = self.find_cutout(run)
        cutout = read_cutout(self.cutout_path)
        self.target = resize_cutout(cutout, ref.size).to(device)
        self.depth = self.find_depth(run, ref.size)
        self.aabb = torch.tensor([-config.box] * 3 + [config.box] * 3, device=device)
        self.trainer = FieldTrainer(run, config.representation, self.aabb, config.render, needs=NEEDS,
                                    generator_device="cpu", loop_name="image-to-3d")
        self.reference_camera = camera_at(ref.elevation, ref.azimuth, ref.distance, ref.fov, ref.size)
        self.reference = ReferenceView(cutout, self.reference_camera, ViewAngles.of(self.reference_camera))
        self.guidance = config.guidance.build(device=device)
        self.background = torch.tensor(config.background, device=device)
        run.log(f"reference: {self.cutout_path} seen from elevation {ref.elevation:g}, azimuth {ref.azimuth:g}, "
                f"distance {ref.distance:g}, fov {ref.fov:g}; guidance: {config.guidance.type}")

    def find_cutout(self, run) -> Path:
        ref = self.config.reference
        if ref.image is not None:
            return ref.image
        if ref.from_stage is None:
            raise ConfigError(f"{run.recipe.source}: reference.image is missing: give the cut-out "
                              "(reference.image=cutout.png) or an earlier preprocess stage (reference.from_stage)")
        return run.earlier_stage_path(ref.from_stage, "rgba.png")

    def find_depth(self, run, size: int) -> torch.Tensor | None:
        """The preprocessing stage's depth in the cut-out's frame, when the depth loss asks for it."""
        if self.config.losses.depth <= 0:
            return None
        stage = self.config.reference.from_stage
        if stage is None:
            raise ConfigError(f"{run.recipe.source}: losses.depth needs the preprocess stage's depth map "
                              "(reference.from_stage with depth=depth-anything there)")
        depth_file = run.earlier_stage_path(stage, "depth.npy")
        notes = run.earlier_stage_path(stage, "detections.json")
        if not depth_file.is_file():
            raise ConfigError(f"{run.recipe.source}: losses.depth: stage {stage!r} wrote no depth.npy; give it a depth "
                              "estimator (depth=depth-anything)")
        info = json.loads(notes.read_text())
        disparity = depth_in_cutout(np.load(depth_file), info["object_box"], size, info["output"]["fill"])
        return disparity.to(self.run.device)

    # --- one step ---------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        occupied = self.trainer.prepare(step)
        guided, view_loss, view_metrics = self.guidance_substep(step)
        ref_loss, ref_metrics = self.reference_substep()
        loss = guided.loss + view_loss + ref_loss
        own = self.trainer.regularizer(step)
        if own is not None:
            loss = loss + own
        self.trainer.backward(loss)
        self.trainer.optimizer_step(step)
        metrics = {"loss": loss.item(), **view_metrics, **ref_metrics, **guided.metrics}
        if occupied is not None:
            metrics["occupied"] = occupied
        return metrics

    def view_ranges(self, step: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """Elevation and azimuth ranges at this step: from the reference's angles to the full ranges."""
        v, ref = self.config.views, self.config.reference
        p = 1.0 if v.widen_steps == 0 else min(1.0, step / v.widen_steps)
        widen = lambda centre, bounds: (centre + (bounds[0] - centre) * p, centre + (bounds[1] - centre) * p)
        return widen(ref.elevation, v.elevation), widen(ref.azimuth, v.azimuth)

    def guidance_substep(self, step: int):
        cfg = self.config
        size = cfg.views.size_at_step(step)
        elevation, azimuth = self.view_ranges(step)
        ref = cfg.reference
        views = random_views(cfg.views.batch, size, elevation, azimuth, (ref.distance, ref.distance),
                             (ref.fov, ref.fov), self.generator)
        out, shader, dirs = self.render_views(views.cameras, stratified=True)
        n = len(views.cameras)
        images = out.rgb.view(n, size, size, 3).permute(0, 3, 1, 2)
        angles = ViewAngles(views.elevation, views.azimuth, views.distance)
        guided = self.guidance(GuidanceInput(images, [""] * n, views.cameras, angles, step, self.total_steps,
                                             reference=self.reference, generator=self.generator,
                                             background=self.background.cpu().expand(n, 3)))
        loss = self.view_regularisers(out, dirs, shader)
        return guided, loss, {"opacity": float(out.opacity.detach().mean()), "samples_per_ray": out.samples / len(dirs)}

    def render_views(self, cameras: Cameras, stratified: bool):
        losses = self.config.losses
        cameras = cameras.to(self.run.device)
        rays = [cameras.image_rays(i) for i in range(len(cameras))]
        origins, dirs = torch.cat([o for o, _ in rays]), torch.cat([d for _, d in rays])
        need_normals = losses.orientation > 0 or losses.normal_smoothness > 0
        shader = Shader(self.field, "albedo", torch.zeros(len(cameras), 3, device=dirs.device),
                        cameras.width * cameras.height, Shading(), need_normals)
        out = self.renderer.render(self.field, origins, dirs, self.background, stratified=stratified, shader=shader)
        return out, shader, dirs

    def view_regularisers(self, out, dirs: torch.Tensor, shader: Shader) -> torch.Tensor:
        losses = self.config.losses
        loss = torch.zeros((), device=dirs.device)
        if losses.opacity > 0:
            loss = loss + losses.opacity * torch.sqrt(out.opacity ** 2 + 0.01).mean()
        if losses.entropy > 0:
            loss = loss + losses.entropy * binary_entropy(out.opacity).mean()
        if shader.normals is not None and out.weights is not None:
            weights = out.weights.detach()
            if losses.orientation > 0:
                facing = (shader.normals * dirs[out.ray_index]).sum(-1).clamp_min(0) ** 2
                loss = loss + losses.orientation * (weights * facing).sum() / len(dirs)
            if losses.normal_smoothness > 0:
                loss = loss + losses.normal_smoothness * self.normal_smoothness(shader, out, weights, dirs)
        return loss

    def normal_smoothness(self, shader: Shader, out, weights: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        """Weighted |n(x) - n(x + jitter)|^2 over the samples that make up the surface."""
        keep = weights > 1e-3
        if not keep.any():
            return torch.zeros((), device=dirs.device)
        points = shader.points[keep]
        jitter = self.config.losses.normal_jitter * torch.randn(points.shape, generator=self.generator).to(points)
        near = normals(self.field, points + jitter, dirs[out.ray_index][keep], Shading().normal_eps)
        return (weights[keep] * (shader.normals[keep] - near).pow(2).sum(-1)).sum() / len(dirs)

    def reference_substep(self) -> tuple[torch.Tensor, dict[str, float]]:
        losses, ref = self.config.losses, self.config.reference
        pixels = self.reference_pixels()
        cameras = self.reference_camera.to(self.run.device)
        origins, dirs = cameras.rays(torch.zeros_like(pixels), (pixels % ref.size).float() + 0.5,
                                     (pixels // ref.size).float() + 0.5)
        out = self.renderer.render(self.field, origins, dirs, self.background, stratified=True)
        alpha = self.target[3].reshape(-1)[pixels]
        colour = self.target[:3].reshape(3, -1)[:, pixels].T
        target_rgb = colour * alpha[:, None] + self.background * (1 - alpha[:, None])
        rgb_loss = F.mse_loss(out.rgb, target_rgb)
        mask_loss = F.mse_loss(out.opacity, alpha)
        loss = losses.rgb * rgb_loss + losses.mask * mask_loss
        metrics = {"ref_rgb": rgb_loss.item(), "ref_mask": mask_loss.item()}
        if self.depth is not None:
            inside = alpha > 0.5
            # Rendered depth grows away from the camera; the estimate is disparity (larger = nearer).
            depth_loss = 1 - pearson(out.depth[inside], -self.depth.reshape(-1)[pixels][inside])
            loss = loss + losses.depth * depth_loss
            metrics["ref_depth"] = depth_loss.item()
        return loss, metrics

    def reference_pixels(self) -> torch.Tensor:
        """This step's reference pixels (row-major indices): all, or a random subset."""
        ref = self.config.reference
        count = ref.size * ref.size
        if ref.rays is None or ref.rays >= count:
            return torch.arange(count, device=self.run.device)
        return torch.randperm(count, generator=self.generator)[:ref.rays].to(self.run.device)

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return self.score_reference(*self.reference_prediction())

    def score_reference(self, predicted: np.ndarray, alpha: np.ndarray) -> dict[str, float]:
        target = self.target_on_background()
        truth = self.target[3].cpu().numpy() > 0.5
        iou = float((truth & (alpha > 0.5)).sum() / max(1, (truth | (alpha > 0.5)).sum()))
        return {"reference_psnr": round(psnr(predicted, target), 3), "reference_mask_iou": round(iou, 4)}

    def target_on_background(self) -> np.ndarray:
        alpha = self.target[3:]
        return (self.target[:3] * alpha + self.background.view(3, 1, 1) * (1 - alpha)).permute(1, 2, 0).cpu().numpy()

    @torch.no_grad()
    def reference_prediction(self) -> tuple[np.ndarray, np.ndarray]:
        size = self.config.reference.size
        origins, dirs = self.reference_camera.to(self.run.device).image_rays(0)
        out = self.renderer.render_chunked(self.field, origins, dirs, self.background)
        return (out.rgb.view(size, size, 3).clamp(0, 1).cpu().numpy(), out.opacity.view(size, size).cpu().numpy())

    # --- outputs ------------------------------------------------------------------------------

    def outputs(self, train) -> StageOutputs:
        ref, p = self.config.reference, self.config.turntable
        predicted, alpha = self.reference_prediction()  # rendered once: scored, and written beside the cut-out
        metrics = {"reference_image": str(self.cutout_path), **self.score_reference(predicted, alpha)}
        if train is not None:
            metrics["final_loss"] = round(train.last_metrics.get("loss", float("nan")), 5)
        self.write_reference_sheet(predicted)
        return StageOutputs(field=self.field, renderer=self.renderer, render_view=self.render_view,
                            orbit=Orbit(ref.distance, math.radians(ref.fov), p.size, p.elevation), metrics=metrics)

    def write_reference_sheet(self, predicted: np.ndarray) -> None:
        """reference.png: the cut-out as given beside the field seen from the reference camera
        (``predicted``); cutout.png: the cut-out itself."""
        sheet = np.concatenate([self.target_on_background(), predicted], axis=1)
        with atomic_path(self.run.path("reference.png")) as tmp:
            Image.fromarray(to_uint8(sheet)).save(tmp, format="PNG")
        with atomic_path(self.run.path("cutout.png")) as tmp:
            Image.fromarray(to_uint8(self.target.permute(1, 2, 0).cpu().numpy())).save(tmp, format="PNG")

    @torch.no_grad()
    def render_view(self, cameras, index: int) -> np.ndarray:
        origins, dirs = cameras.image_rays(index)
        out = self.renderer.render_chunked(self.field, origins, dirs, self.background)
        return out.rgb.view(cameras.height, cameras.width, 3).clamp(0, 1).cpu().numpy()


def build(config: ImageTo3DConfig, *, run) -> ImageTo3D:
    return ImageTo3D(config, run)


@hookimpl
def gen3d_loops():
    return [Component("image-to-3d", build, ImageTo3DConfig,
                      "one cut-out photo to a field: view-conditioned guidance (Zero-1-to-3) plus the reference view",
                      needs=NEEDS)]
