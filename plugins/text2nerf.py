"""``text2nerf``: a 3D scene from a prompt, view by view, as in Text2NeRF (Zhang et al., TVCG 2024).

1. **The first view.** The text-to-image role draws the prompt from the start camera; the depth
   role estimates its relative inverse depth, which ``first_depth`` (the view's nearest and
   farthest z-depth, world units) turns into depth: a single image says nothing of its scale,
   so the recipe sets it, and every later view is aligned to it. A *support set* of a few
   nearby cameras (small sideways and vertical moves) gets the first view warped into it
   (gen3d.scene.warp), holes left out, so the field sees parallax from the start.
2. **The box.** The scene field's box holds the first view's points and the trajectory's
   cameras, grown by ``box_margin`` of its size on each side (a box from the trajectory, not a
   contraction: the trajectories are small moves inside one space, and a dense grid over that
   space is the fastest field on a CPU). What a later view sees beyond it lands on its faces.
3. **Each next view** of the trajectory, in its fixed order: render the field there; the holes
   are the pixels no view so far sees (all views' depth splatted into the new camera with a
   z-buffer); the inpainter fills them (``candidates`` fillings, the one CLIP finds closest to
   the first view kept); the depth role estimates the new view's depth, which is aligned to the
   field's rendered depth on the known, opaque pixels (gen3d.scene.align: a robust global scale
   and shift, then a smooth local correction). The view joins the training set with its hole
   pixels (the rest of it is the field's own rendering: nothing new to learn there).
4. **Training**, ``schedule.first_steps`` on the first view and its support set, then
   ``schedule.steps_per_view`` after each new view, and whatever ``steps`` leaves after the
   last: every view is drawn equally often (earlier views keep being sampled), with an RGB
   loss, a depth loss (relative L1 against the view's depth, along the ray) and a free-space
   loss: the compositing weight a ray spends before its known depth (less a margin), which
   keeps the space in front of what a view saw empty.

Each view is written to ``views/NNN.safetensors`` (and ``NNN.png``) the moment it is made; a
resumed run reads the views it finds there rather than making them again, so no view is
generated twice and a run killed between two views continues at the next one. At the end the
loop writes ``views.png`` (the views side by side, the inpainted pixels marked beneath),
``flythrough.mp4`` (along the trajectory), ``scene_points.ply`` (every view's pixels as
coloured points, Z up) and hands the core a scene mesh fused from the field's depth in every
trajectory view (gen3d.scene.fusion), exported as GLB / OBJ / PLY like any mesh.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gen3d import (PREPROCESSOR_ROLES, Choice, Component, ConfigError, FieldLoop, FieldTrainer, Orbit, RenderSettings,
                   StageOutputs, atomic_path, choice, finish_mesh, hookimpl, pixel_means,
                   preprocessor_roles, scene, to_uint8, write_json)

PREPROCESSOR = "preprocessor"
# The default start camera: 1.5 m up, looking along +y, level (camera x right, y up, looking down -z).
LEVEL_START = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 1.5], [0.0, 0.0, 0.0, 1.0]]


# --- settings ------------------------------------------------------------------------------


@dataclass
class CameraSettings:
    fov_deg: float = 60.0  # horizontal; see gen3d.scene.PinholeConfig
    width: int = 512
    height: int = 512
    # The first view's camera-to-world matrix (OpenGL axes, world Z up); the trajectory starts here.
    start: list[list[float]] = field(default_factory=lambda: [row[:] for row in LEVEL_START])

    def __post_init__(self) -> None:
        self.pinhole  # raises on a bad field of view or size
        scene.check_pose(self.start, "start")

    @property
    def pinhole(self) -> scene.PinholeConfig:
        return scene.PinholeConfig(self.fov_deg, self.width, self.height)


@dataclass
class FirstDepth:
    # The first view's nearest and farthest z-depth in world units: what turns the estimator's
    # relative inverse depth into depth (1/z = 1/far + d (1/near - 1/far), d in [0, 1]). This
    # sets the scene's scale against the trajectory's moves; a room seen from inside: about 1 to 6.
    near: float = 1.0
    far: float = 6.0

    def __post_init__(self) -> None:
        if not 0 < self.near < self.far:
            raise ValueError(f"near and far are z-depths with 0 < near < far; got {self.near}, {self.far}")

    def depth(self, disparity: torch.Tensor) -> torch.Tensor:
        """z-depth from relative inverse depth, its farthest pixel at ``far`` and its nearest at ``near``."""
        low, high = float(disparity.min()), float(disparity.max())
        d = (disparity - low) / (high - low) if high > low else torch.zeros_like(disparity)
        return 1.0 / (1.0 / self.far + d * (1.0 / self.near - 1.0 / self.far))


@dataclass
class SupportSettings:
    # Text2NeRF's support set: the first view warped to `views` nearby cameras, moved
    # `translation` (world units) right, up, left and down in turn.
    views: int = 4
    translation: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.views <= 8:
            raise ValueError(f"views must be 0 to 8; got {self.views}")
        if self.translation < 0:
            raise ValueError(f"translation must be >= 0; got {self.translation}")


@dataclass
class ScheduleSettings:
    first_steps: int = 1500  # training on the first view (and its support set) before the next
    steps_per_view: int = 600  # training after each later view before the one after it

    def __post_init__(self) -> None:
        if self.first_steps < 0 or self.steps_per_view < 0:
            raise ValueError("first_steps and steps_per_view must be 0 or more")


@dataclass
class TrainSettings:
    rays_per_step: int = 4096
    depth_weight: float = 0.1  # relative L1 of the rendered depth against the view's
    free_space_weight: float = 0.1  # compositing weight spent in front of the view's depth
    free_space_margin: float = 0.05  # ... less this fraction of it (depth estimates are not exact)
    pixel_jitter: bool = True  # rays through random points of their pixel (images are area averages)
    lr_decay: float = 0.1  # learning rates fall to this fraction by the last step

    def __post_init__(self) -> None:
        if self.rays_per_step < 1:
            raise ValueError(f"rays_per_step must be at least 1; got {self.rays_per_step}")
        if self.depth_weight < 0 or self.free_space_weight < 0:
            raise ValueError("depth_weight and free_space_weight are loss weights, 0 or more")
        if not 0 <= self.free_space_margin < 1:
            raise ValueError(f"free_space_margin is a fraction of the depth, 0 to 1; got {self.free_space_margin}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay is the final fraction of the learning rate, in (0, 1]; got {self.lr_decay}")


@dataclass
class FlythroughSettings:
    frames_between: int = 8  # frames from one trajectory pose to the next; 0: no flythrough.mp4
    size: int = 256  # the video's width; its height keeps the camera's aspect
    fps: int = 24

    def __post_init__(self) -> None:
        if self.frames_between < 0 or self.size < 16 or self.fps < 1:
            raise ValueError("frames_between must be >= 0, size >= 16 and fps >= 1")


@dataclass
class SceneMeshSettings:
    fusion: scene.FusionConfig = field(default_factory=scene.FusionConfig)
    depth_size: int = 256  # width of the field's depth renderings fused into the mesh
    points_per_view: int = 50_000  # scene_points.ply: at most this many coloured points a view
    # Pieces of the mesh with fewer faces than this are dropped (specks of noise). An object's
    # export drops pieces small against the largest; in a room the largest is the room itself,
    # and a vase on a table is a separate, small piece worth keeping.
    min_faces: int = 64
    # A vertex's colour is rendered along a camera ray started this many marching steps before it.
    colour_offset: float = 4.0

    def __post_init__(self) -> None:
        if self.depth_size < 16 or self.points_per_view < 0:
            raise ValueError("depth_size must be >= 16 and points_per_view >= 0")
        if self.min_faces < 1 or self.colour_offset < 0:
            raise ValueError("min_faces must be >= 1 and colour_offset >= 0")


@dataclass
class Text2NeRFConfig:
    prompt: str = ""
    # The three model roles (gen3d preprocessors): a name or {type: NAME, settings...}.
    text_to_image: Any = choice(PREPROCESSOR, "sd-text-to-image")  # noqa: RUF009
    inpainter: Any = choice(PREPROCESSOR, "sd-inpainter")  # noqa: RUF009
    depth: Any = choice(PREPROCESSOR, "depth-anything")  # noqa: RUF009
    representation: Choice = choice("representation", "grid-nerf")
    render: RenderSettings = field(default_factory=RenderSettings)
    camera: CameraSettings = field(default_factory=CameraSettings)
    trajectory: scene.TrajectoryConfig = field(default_factory=scene.TrajectoryConfig)
    first_depth: FirstDepth = field(default_factory=FirstDepth)
    support: SupportSettings = field(default_factory=SupportSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    align: scene.AlignConfig = field(default_factory=scene.AlignConfig)
    splat: scene.SplatConfig = field(default_factory=scene.SplatConfig)
    box_margin: float = 0.1  # the box grows this fraction of its size on each side
    flythrough: FlythroughSettings = field(default_factory=FlythroughSettings)
    scene_mesh: SceneMeshSettings = field(default_factory=SceneMeshSettings)

    def __post_init__(self) -> None:
        if not 0 <= self.box_margin <= 1:
            raise ValueError(f"box_margin is a fraction of the box's size, 0 to 1; got {self.box_margin}")


NEEDS = ("radiance",)


# --- the views -------------------------------------------------------------------------------


@dataclass
class View:
    """One view of the training set: its image, z-depth and the pixels it teaches."""

    camera: Any  # a one-camera gen3d.Cameras
    image: torch.Tensor  # [H, W, 3] in 0..1
    depth: torch.Tensor  # [H, W] z-depth (inf where unknown)
    train: torch.Tensor  # [H, W] bool: the pixels the field learns from this view
    kind: str  # "generated" (a trajectory view) or "support"
    stats: dict[str, float] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"c2w": self.camera.c2w[0], "image": self.image, "depth": self.depth, "train": self.train}


def role_object(picked: Choice, role: str, built: list) -> Any:
    """The preprocessor ``picked`` built for ``role`` (one object for roles the same component and
    settings play, so a teacher or a shared model loads once); one line if it cannot play it."""
    declared = preprocessor_roles(picked.component.config)
    key = role.replace("-", "_")
    if declared is not None and role not in declared:
        raise ConfigError(f"{key}: {picked.type!r} cannot play the {role} role (it is a {' and '.join(declared)})")
    for other, obj in built:
        if other.type == picked.type and other.config == picked.config and isinstance(obj, PREPROCESSOR_ROLES[role]):
            return obj
    obj = picked.build(role=role)
    if not isinstance(obj, PREPROCESSOR_ROLES[role]):
        raise ConfigError(f"{key}: {picked.type!r} cannot act as a {role}")
    built.append((picked, obj))
    return obj


def takes_camera(method) -> bool:
    """Whether a role's method accepts the view's camera (teachers need it; models ignore it)."""
    try:
        return "camera" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


# --- the loop --------------------------------------------------------------------------------


class Text2NeRF(FieldLoop):
    def __init__(self, config: Text2NeRFConfig, run):
        self.config, self.run = config, run
        if not config.prompt.strip():
            raise ConfigError(f"{run.recipe.source}: prompt is missing: add prompt=\"a cosy living room\" on the "
                              "command line or a prompt: key to the recipe")
        self.pinhole = config.camera.pinhole
        # A pose file's first pose is the start (config.camera.start is then not used).
        self.poses = scene.trajectory(config.trajectory, torch.tensor(config.camera.start, dtype=torch.float32))
        self.view_steps = [0] + [config.schedule.first_steps + (k - 1) * config.schedule.steps_per_view
                                 for k in range(1, len(self.poses))]
        if run.steps <= self.view_steps[-1]:
            raise ConfigError(f"{run.recipe.source}: steps: {run.steps} ends before the last of the trajectory's "
                              f"{len(self.poses)} views (made at step {self.view_steps[-1]}); set steps above it, "
                              f"e.g. steps={self.view_steps[-1] + config.schedule.first_steps}")
        built: list = []
        self.text_to_image = role_object(config.text_to_image, "text-to-image", built)
        self.inpainter = role_object(config.inpainter, "inpainter", built)
        self.depth_model = role_object(config.depth, "depth", built)
        device = run.device
        self.trainer = FieldTrainer(run, config.representation, self.frusta_box().to(device), config.render,
                                    needs=NEEDS, lr_decay=config.train.lr_decay, loop_name="text2nerf")
        self.views: list[View] = []
        self.stage_seconds: dict[str, float] = {}
        self.made_views = 0  # views this process generated (not read back from views/)
        run.log(f"prompt: {config.prompt!r}; {len(self.poses)} views ({config.trajectory.kind}), "
                f"{self.pinhole.width}x{self.pinhole.height} px; renderer: {self.renderer.path}")

    # --- geometry ------------------------------------------------------------------------

    def camera(self, pose: torch.Tensor, size: tuple[int, int] | None = None):
        if size is None:
            return scene.pinhole(pose, self.pinhole)
        return scene.pinhole(pose, scene.PinholeConfig(self.pinhole.fov_deg, *size))

    def frusta_box(self) -> torch.Tensor:
        """The box before the first view exists: every trajectory camera's view out to ``far``."""
        w, h, f = self.pinhole.width, self.pinhole.height, self.pinhole.focal
        far = self.config.first_depth.far
        corners = torch.tensor([[x * w / (2 * f) * far, y * h / (2 * f) * far, -far]
                                for x in (-1, 1) for y in (-1, 1)] + [[0.0, 0.0, 0.0]])
        points = torch.cat([corners @ p[:3, :3].T + p[:3, 3] for p in self.poses])
        return self.grown(points)

    def grown(self, points: torch.Tensor) -> torch.Tensor:
        low, high = points.min(0).values, points.max(0).values
        pad = self.config.box_margin * (high - low).clamp_min(1e-3)
        return torch.cat([low - pad, high + pad]).float()

    def view_box(self, first: View) -> torch.Tensor:
        """The scene box: the first view's points and every trajectory camera, grown by box_margin."""
        known = torch.isfinite(first.depth)
        points = scene.unproject(torch.where(known, first.depth, torch.ones_like(first.depth)), first.camera)[known]
        return self.grown(torch.cat([points, self.poses[:, :3, 3]]))

    def grown_box(self, view: View, outside_share: float = 0.002) -> torch.Tensor | None:
        """A larger box when more than ``outside_share`` of what ``view`` teaches lies outside the
        field's box (a later view sees past the first view's walls), else None. The extremes are
        quantiles, so a few far outliers of an estimated depth cannot blow the box up."""
        keep = view.train & torch.isfinite(view.depth)
        if not keep.any():
            return None
        points = scene.unproject(torch.where(keep, view.depth, torch.ones_like(view.depth)), view.camera)[keep]
        box = self.field.aabb.detach().cpu()
        outside = ((points < box[:3]) | (points > box[3:])).any(dim=1)
        if float(outside.float().mean()) <= outside_share:
            return None
        q = torch.tensor([0.001, 0.999])
        low = torch.minimum(box[:3], torch.quantile(points, q[0], dim=0))
        high = torch.maximum(box[3:], torch.quantile(points, q[1], dim=0))
        pad = self.config.box_margin * (high - low)
        return torch.cat([torch.minimum(box[:3], low - pad * (low < box[:3])),
                          torch.maximum(box[3:], high + pad * (high > box[3:]))])

    # --- making views --------------------------------------------------------------------

    def seed(self, index: int) -> int:
        return self.run.seed * 1000 + index

    def timed(self, name: str, began: float) -> float:
        now = time.perf_counter()
        self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + now - began, 3)
        return now

    def estimate_depth(self, image: np.ndarray, camera) -> torch.Tensor:
        """The depth role's relative inverse depth of ``image`` (normalised to [0, 1] per image)."""
        rgb = to_uint8(image)
        if takes_camera(self.depth_model.estimate_depth):
            found = self.depth_model.estimate_depth(rgb, camera=camera)
        else:
            found = self.depth_model.estimate_depth(rgb)
        disparity = torch.from_numpy(np.asarray(found.depth, dtype=np.float32))
        if disparity.shape != image.shape[:2]:  # estimators answer in the input's pixels; be sure
            disparity = F.interpolate(disparity[None, None], size=image.shape[:2], mode="bilinear",
                                      align_corners=False)[0, 0]
        return disparity

    def fit_size(self, image: np.ndarray) -> np.ndarray:
        """A model's image at the camera's size (a model may draw at its own)."""
        image = np.asarray(image, dtype=np.float32)
        size = (self.pinhole.height, self.pinhole.width)
        if image.shape[:2] == size:
            return image
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x[0].permute(1, 2, 0).clamp(0, 1).numpy()

    def first_view(self) -> list[View]:
        """The prompt's image from the start camera, its depth, and its support set."""
        cam, began = self.camera(self.poses[0]), time.perf_counter()
        image = self.fit_size(self.text_to_image.generate(self.config.prompt, self.seed(0), camera=cam))
        began = self.timed("text_to_image", began)
        disparity = self.estimate_depth(image, cam)
        began = self.timed("depth", began)
        depth = self.config.first_depth.depth(disparity)
        rgb = torch.from_numpy(image)
        views = [View(cam, rgb, depth, torch.ones_like(depth, dtype=torch.bool), "generated",
                      {"inpainted": 0.0})]
        step = self.config.support.translation
        moves = [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (-1, -1), (1, -1)][:self.config.support.views]
        for dx, dy in moves:
            pose = self.poses[0].clone()
            pose[:3, 3] += step * (dx * pose[:3, 0] + dy * pose[:3, 1])
            warped = scene.warp(rgb, depth, cam, self.camera(pose), config=self.config.splat)
            views.append(View(self.camera(pose), warped.image, torch.where(warped.valid, warped.depth, math.inf),
                              warped.valid, "support"))
        self.timed("support", began)
        return views

    @torch.no_grad()
    def next_view(self, index: int) -> View:
        """Trajectory view ``index``: the field rendered there, its holes inpainted, their depth aligned."""
        cam, began = self.camera(self.poses[index]), time.perf_counter()
        rendered, opacity, ray_depth = self.render_full(cam)
        z = scene.ray_to_z(ray_depth, cam)
        began = self.timed("render", began)
        generated = [v for v in self.views if v.kind == "generated"]
        hole = scene.holes([v.depth for v in generated], [v.camera for v in generated], cam, self.config.splat)
        began = self.timed("holes", began)
        known = ~hole & (opacity > 0.95)
        composite = torch.where(hole[..., None], torch.zeros_like(rendered), rendered).numpy()
        candidates = self.inpainter_candidates(composite, hole.numpy(), self.seed(index), cam)
        pick = 0
        if len(candidates) > 1 and hasattr(self.inpainter, "rank_candidates"):  # CLIP: closest to the first view
            pick = self.inpainter.rank_candidates(candidates, self.views[0].image.numpy())
        image = torch.from_numpy(self.fit_size(candidates[pick]))
        began = self.timed("inpaint", began)
        disparity = self.estimate_depth(image.numpy(), cam)
        began = self.timed("depth", began)
        stats = {"inpainted": round(float(hole.float().mean()), 4), "candidates": len(candidates)}
        try:
            aligned = scene.align_depth(disparity, z, known, self.config.align)
        except ValueError as failed:  # too few known pixels, or an estimate that grows with depth
            # The view still teaches its colours; its holes take the first view's depth range.
            self.run.log(f"view {index}: depth not aligned ({failed}); its holes take the first view's depth range")
            stats["align_failed"] = 1.0
            new_depth = self.config.first_depth.depth(disparity)
        else:
            stats.update(align_error=round(aligned.error, 5), align_global_error=round(aligned.global_error, 5),
                         align_inliers=round(aligned.inliers, 4), align_scale=aligned.scale, align_shift=aligned.shift)
            new_depth = aligned.depth
        self.timed("align", began)
        depth = torch.where(hole, new_depth, z)  # z is inf where the field is not opaque
        return View(cam, image, depth, hole, "generated", stats)

    def inpainter_candidates(self, image: np.ndarray, mask: np.ndarray, seed: int, camera) -> list[np.ndarray]:
        prompt = self.config.prompt
        if hasattr(self.inpainter, "inpaint_candidates"):
            return list(self.inpainter.inpaint_candidates(image, mask, prompt, seed, camera=camera))
        return [self.inpainter.inpaint(image, mask, prompt, seed, camera=camera)]

    @torch.no_grad()
    def render_full(self, camera, chunk: int = 1 << 14):
        """(rgb [H, W, 3], opacity [H, W], ray depth [H, W]) of the field, one ray a pixel centre, on
        black. The depth is the *median* along the ray, where the opacity gathered reaches 0.5 (inf
        where it never does): at an object's edge the mean depth lands between the object and
        the wall behind it, a point on neither, which warped or fused becomes a flying surface."""
        device = self.run.device
        h, w = camera.height, camera.width
        origins, dirs = camera.to(device).image_rays(0)
        black = torch.zeros(3, device=device)
        rgb, opacity, depth = [], [], []
        for o, d in zip(origins.split(chunk), dirs.split(chunk)):
            out = self.renderer.render(self.field, o, d, black)
            rgb.append(out.rgb.clamp(0, 1).cpu())
            opacity.append(out.opacity.cpu())
            depth.append(median_depth(out, len(o)).cpu())
        return torch.cat(rgb).reshape(h, w, 3), torch.cat(opacity).reshape(h, w), torch.cat(depth).reshape(h, w)

    def add_views(self, index: int, step: int) -> None:
        """Trajectory view ``index`` (with the support set for the first), from views/ when a run
        before this one already made it."""
        found = self.read_view(index)
        if found is not None:
            self.views.extend(found)
            self.run.log(f"view {index}: read back from {self.view_path(index, 'safetensors')}")
        else:
            made = self.first_view() if index == 0 else [self.next_view(index)]
            self.made_views += 1
            self.write_view(index, made)
            self.views.extend(made)
            self.run.log(f"view {index}: {_describe(made[0].stats)}")
        box = self.view_box(self.views[0]) if index == 0 else self.grown_box(self.views[-1])
        if box is not None and self.trainer.refit(box.to(self.run.device), step):
            self.run.log(f"view {index}: scene box {[round(v, 3) for v in box.tolist()]}")
        self.refresh_pixels()

    # --- views on disk -------------------------------------------------------------------

    def view_path(self, index: int, suffix: str):
        return self.run.path(f"views/{index:03d}.{suffix}")

    def write_view(self, index: int, views: list[View]) -> None:
        from safetensors.torch import save_file

        tensors = {f"{i}.{key}": value.contiguous().cpu() for i, v in enumerate(views)
                   for key, value in v.tensors().items()}
        tensors = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v) for k, v in tensors.items()}
        metadata = {"kinds": ",".join(v.kind for v in views),
                    "stats": ";".join(",".join(f"{k}={val}" for k, val in v.stats.items()) for v in views)}
        path = self.view_path(index, "safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.view_path(index, "png")) as tmp:
            import imageio.v3 as iio
            iio.imwrite(tmp, to_uint8(views[0].image.numpy()), extension=".png")
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def read_view(self, index: int) -> list[View] | None:
        from safetensors import safe_open

        path = self.view_path(index, "safetensors")
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata(), set(f.keys())
            data = {k: f.get_tensor(k) for k in keys}
        views = []
        for i, kind in enumerate(metadata["kinds"].split(",")):
            stats_text = metadata["stats"].split(";")[i]
            stats = {k: float(v) for k, v in (item.split("=") for item in stats_text.split(",") if item)}
            views.append(View(self.camera(data[f"{i}.c2w"]), data[f"{i}.image"], data[f"{i}.depth"],
                              data[f"{i}.train"].bool(), kind, stats))
        return views

    # --- training ------------------------------------------------------------------------

    def refresh_pixels(self) -> None:
        """The training pixels of every view, concatenated, and where each view's run starts."""
        device = self.run.device
        colours, depths, cams, pixels, counts = [], [], [], [], []
        for i, v in enumerate(self.views):
            index = v.train.reshape(-1).nonzero().squeeze(1)
            colours.append(v.image.reshape(-1, 3)[index])
            depths.append(v.depth.reshape(-1)[index])
            pixels.append(index)
            cams.append(torch.full_like(index, i))
            counts.append(len(index))
        self.pixel_rgb = torch.cat(colours).to(device)
        ray_depth = [scene.z_to_ray(v.depth, v.camera).reshape(-1)[v.train.reshape(-1)] for v in self.views]
        self.pixel_depth = torch.cat(ray_depth).to(device)
        self.pixel_index = torch.cat(pixels).to(device)
        self.pixel_camera = torch.cat(cams).to(device)
        self.counts = torch.tensor(counts, device=device)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        c2w = torch.stack([v.camera.c2w[0] for v in self.views])
        self.train_cameras = scene.pinhole(c2w, self.pinhole).to(device)
        self.usable_views = (self.counts > 0).nonzero().squeeze(1)

    def sample(self, n: int) -> torch.Tensor:
        """Training pixel rows: every view equally often, pixels uniformly within a view."""
        g, device = self.generator, self.run.device
        view = self.usable_views[torch.randint(len(self.usable_views), (n,), generator=g, device=device)]
        offset = (torch.rand(n, generator=g, device=device) * self.counts[view]).long().clamp_max(self.counts[view] - 1)
        return self.starts[view] + offset

    def step(self, step: int) -> dict[str, float]:
        while self.generated_count() < len(self.poses) and step >= self.view_steps[self.generated_count()]:
            self.add_views(self.generated_count(), step)
        occupied = self.trainer.prepare(step)
        cfg = self.config.train
        rows = self.sample(cfg.rays_per_step)
        jitter = self.generator if cfg.pixel_jitter else None
        origins, dirs = self.train_cameras.pixel_rays(self.pixel_camera[rows], self.pixel_index[rows], 1, jitter)
        background = torch.rand(len(rows), 3, generator=self.generator, device=origins.device)
        out = self.renderer.render(self.field, origins, dirs, background, stratified=True)
        mse = ((out.rgb - self.pixel_rgb[rows]) ** 2).mean()
        target = self.pixel_depth[rows]
        known = torch.isfinite(target)
        loss = mse
        metrics = {}
        if cfg.depth_weight > 0 and known.any():
            depth_error = ((out.depth - target).abs() / target)[known].mean()
            loss = loss + cfg.depth_weight * depth_error
            metrics["depth_error"] = depth_error.item()
        if cfg.free_space_weight > 0 and out.distances is not None and known.any():
            limit = torch.where(known, target, torch.zeros_like(target)) * (1 - cfg.free_space_margin)
            early = out.distances < limit[out.ray_index]
            spent = out.weights.new_zeros(len(rows)).index_add(0, out.ray_index, out.weights * early)
            free_space = spent[known].mean()
            loss = loss + cfg.free_space_weight * free_space
            metrics["free_space"] = free_space.item()
        extra = self.trainer.regularizer(step)
        if extra is not None:
            loss = loss + extra
        self.trainer.backward(loss)
        self.trainer.optimizer_step(step)
        metrics = {"loss": loss.item(), "psnr": -10 * math.log10(max(mse.item(), 1e-10)),
                   "views": float(self.generated_count()), **metrics}
        if occupied is not None:
            metrics["occupied"] = occupied
        return metrics

    def generated_count(self) -> int:
        return sum(v.kind == "generated" for v in self.views)

    def state_dict(self) -> dict:
        return {**self.trainer.state_dict(), "views": self.generated_count(), "stage_seconds": dict(self.stage_seconds)}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)
        self.stage_seconds = {k: float(v) for k, v in state.get("stage_seconds", {}).items()}
        self.views = []
        for index in range(int(state["views"])):
            found = self.read_view(index)
            if found is None:
                raise ConfigError(f"--resume: {self.view_path(index, 'safetensors')} is missing; the checkpoint "
                                  "needs it (start the run again without --resume)")
            self.views.extend(found)
        if self.views:
            self.refresh_pixels()

    def evaluate(self) -> dict[str, float]:
        return {}  # no held-out views: a generated scene has no ground truth (benchmarks use scene-teacher)

    # --- outputs -------------------------------------------------------------------------

    def render_view(self, cameras, index: int) -> np.ndarray:
        s = max(1, self.config.render.supersample)
        h, w = cameras.height, cameras.width
        origins, dirs = cameras.image_rays(index, s)
        out = self.renderer.render_chunked(self.field, origins, dirs, torch.zeros(3, device=origins.device))
        return pixel_means(out.rgb, h * w).reshape(h, w, 3).clamp(0, 1).cpu().numpy()

    def outputs(self, train) -> StageOutputs:
        aabb = self.field.aabb
        centre = tuple(((aabb[:3] + aabb[3:]) / 2).tolist())
        metrics: dict[str, Any] = {}
        if train is not None:
            metrics = self.write_previews()
        return StageOutputs(field=self.field, renderer=self.renderer, render_view=self.render_view,
                            orbit=Orbit(0.5 * float((aabb[3:] - aabb[:3]).norm()), math.radians(self.pinhole.fov_deg),
                                        256, 0.0, centre),
                            metrics=metrics, mesh=self.scene_mesh)

    def write_previews(self) -> dict[str, Any]:
        """views.png, flythrough.mp4, scene_points.ply; returns the per-view metrics."""
        began = time.perf_counter()
        self.write_contact_sheet()
        if self.config.flythrough.frames_between > 0:
            self.write_flythrough()
        if self.config.scene_mesh.points_per_view > 0:
            self.write_points()
        self.timed("previews", began)
        generated = [v for v in self.views if v.kind == "generated"]
        per_view = [{"view": i, **v.stats} for i, v in enumerate(generated)]
        aligned = [v.stats["align_error"] for v in generated if "align_error" in v.stats]
        summary = {"views": len(generated), "views_made_by_this_process": self.made_views,
                   "inpainted_mean": round(float(np.mean([v.stats.get("inpainted", 0.0) for v in generated[1:]]))
                                           if len(generated) > 1 else 0.0, 4),
                   "align_error_max": round(max(aligned), 5) if aligned else None,
                   "seconds_by_stage": self.stage_seconds, "per_view": per_view}
        write_json(self.run.path("views/views.json"), per_view)
        return summary

    def write_contact_sheet(self) -> None:
        """views.png: each generated view above the same view with its inpainted pixels tinted."""
        import imageio.v3 as iio

        generated = [v for v in self.views if v.kind == "generated"]
        top, bottom = [], []
        for i, v in enumerate(generated):
            image = v.image.numpy()
            marked = image.copy()
            if i > 0:
                hole = v.train.numpy()
                marked[hole] = 0.5 * marked[hole] + 0.5 * np.array([1.0, 0.0, 1.0], dtype=np.float32)
            top.append(image)
            bottom.append(marked)
        sheet = np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)
        scale = max(1, math.ceil(sheet.shape[1] / 4096))  # keep the sheet a viewable size
        sheet = sheet[::scale, ::scale]
        with atomic_path(self.run.path("views.png")) as tmp:
            iio.imwrite(tmp, to_uint8(sheet), extension=".png")

    def flythrough_poses(self) -> torch.Tensor:
        """The trajectory in order, back to its first pose for a closed one, ``frames_between`` a leg."""
        from scipy.spatial.transform import Rotation, Slerp

        poses = self.poses if self.config.trajectory.kind == "file" else torch.cat([self.poses, self.poses[1:2]])
        if self.config.trajectory.kind == "forward":
            poses = torch.cat([self.poses[:1], self.poses[1:], self.poses[1:2], self.poses[:1]])
        frames, n = [], self.config.flythrough.frames_between
        for a, b in zip(poses[:-1], poses[1:]):
            rotations = Rotation.from_matrix(np.stack([a[:3, :3].numpy(), b[:3, :3].numpy()]).astype(np.float64))
            slerp = Slerp([0.0, 1.0], rotations)
            for t in np.arange(n) / n:
                pose = torch.eye(4)
                pose[:3, :3] = torch.from_numpy(slerp([t]).as_matrix()[0]).float()
                pose[:3, 3] = (1 - t) * a[:3, 3] + t * b[:3, 3]
                frames.append(pose)
        frames.append(poses[-1])
        return torch.stack(frames)

    @torch.no_grad()
    def write_flythrough(self) -> None:
        import imageio.v2 as imageio

        size = self.config.flythrough.size
        height = 2 * round(size * self.pinhole.height / self.pinhole.width / 2)  # H.264 wants even sides
        frames = [to_uint8(self.render_full(self.camera(p, (size, height)))[0].numpy())
                  for p in self.flythrough_poses()]
        with atomic_path(self.run.path("flythrough.mp4")) as tmp:
            imageio.mimwrite(tmp, frames, format="FFMPEG", fps=self.config.flythrough.fps, codec="libx264",
                             quality=8, macro_block_size=2)

    def write_points(self) -> None:
        """scene_points.ply: each view's training pixels with a known depth, as coloured points (Z up)."""
        import trimesh

        g = torch.Generator().manual_seed(0)
        points, colours = [], []
        for v in self.views:
            if v.kind != "generated":
                continue
            keep = v.train & torch.isfinite(v.depth)
            xyz = scene.unproject(torch.where(keep, v.depth, torch.ones_like(v.depth)), v.camera)[keep]
            rgb = v.image[keep]
            if len(xyz) > self.config.scene_mesh.points_per_view:
                pick = torch.randperm(len(xyz), generator=g)[:self.config.scene_mesh.points_per_view]
                xyz, rgb = xyz[pick], rgb[pick]
            points.append(xyz)
            colours.append(rgb)
        cloud = trimesh.PointCloud(torch.cat(points).numpy(), colors=to_uint8(torch.cat(colours).numpy()))
        with atomic_path(self.run.path("scene_points.ply")) as tmp:
            cloud.export(tmp, file_type="ply")

    @torch.no_grad()
    def scene_mesh(self, settings):
        """The seen surface: the field's depth in every trajectory view, fused (gen3d.scene.fusion)."""
        cfg = self.config.scene_mesh
        size = cfg.depth_size
        height = max(1, round(size * self.pinhole.height / self.pinhole.width))
        depths, cameras = [], []
        for pose in self.poses:
            cam = self.camera(pose, (size, height))
            _, opacity, ray_depth = self.render_full(cam)
            depths.append(scene.ray_to_z(ray_depth, cam))
            cameras.append(cam)
        mesh = drop_specks(scene.fuse_depths(depths, cameras, self.field.aabb.detach().cpu(), cfg.fusion).mesh(),
                           cfg.min_faces)
        return finish_mesh(mesh, self.seen_colour, settings)

    @torch.no_grad()
    def seen_colour(self, points: torch.Tensor, normals: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
        """The colour each surface point shows the trajectory's camera that sees it most squarely
        (the smallest angle off that camera's axis): the field rendered along that camera's ray
        through the point, started ``colour_offset`` marching steps before it. Two things a
        colour read *at* the point, along its normal, gets wrong in a scene: a density field's
        colour at its surface mixes in the untrained space in front, and the views saw a floor or
        a wall only from one side and at a slant, so the view-dependent colour straight down its
        normal is an extrapolation."""
        device = self.run.device
        offset = self.config.scene_mesh.colour_offset * self.renderer.step_size
        eyes = self.poses[:, :3, 3].to(device)
        axes = -self.poses[:, :3, 2].to(device)  # each camera looks down its -z
        colours = []
        for p in points.split(chunk):
            p = p.to(device).float()
            towards = torch.nn.functional.normalize(p[:, None] - eyes[None], dim=-1)  # [n, cameras, 3]
            best = (towards * axes[None]).sum(-1).argmax(dim=1)
            d = towards[torch.arange(len(p), device=device), best]
            out = self.renderer.render(self.field, p - offset * d, d, torch.zeros(3, device=device))
            colours.append((out.rgb / out.opacity.clamp_min(1e-3)[:, None]).clamp(0, 1).cpu())
        return torch.cat(colours)


def median_depth(out, rays: int) -> torch.Tensor:
    """[rays] the distance of each ray's first sample at which the opacity gathered reaches 0.5
    (inf where it never does), from a rendering's packed samples (sorted by ray)."""
    w, ray, t = out.weights.double(), out.ray_index, out.distances
    total = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])  # total[k]: the weight of samples before k
    count = torch.bincount(ray, minlength=rays)
    first = torch.cumsum(count, 0) - count  # each ray's first sample
    reached = (total[1:] - total[first][ray]) >= 0.5
    return torch.full((rays,), math.inf, device=t.device, dtype=t.dtype).scatter_reduce(
        0, ray[reached], t[reached], reduce="amin")


def drop_specks(mesh, min_faces: int):
    """``mesh`` without its connected pieces of fewer than ``min_faces`` faces."""
    import trimesh

    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    mesh.update_faces(np.bincount(labels)[labels] >= min_faces)
    mesh.remove_unreferenced_vertices()
    return mesh


def _describe(stats: dict[str, float]) -> str:
    parts = [f"inpainted {100 * stats['inpainted']:.1f} %"] if "inpainted" in stats else []
    if "align_error" in stats:
        parts.append(f"depth aligned to {100 * stats['align_error']:.2f} % (global fit {100 * stats['align_global_error']:.2f} %)")
    return ", ".join(parts) or "made"


def build(config: Text2NeRFConfig, *, run) -> Text2NeRF:
    return Text2NeRF(config, run)


@hookimpl
def gen3d_loops():
    return [Component("text2nerf", build, Text2NeRFConfig,
                      "a 3D scene from a prompt: views inpainted one by one, depth aligned, a field fitted",
                      needs=NEEDS)]
