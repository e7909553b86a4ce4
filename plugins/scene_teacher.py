"""``scene-teacher``: text-to-image, inpainter and depth estimator stand-ins that know the scene.

The fidelity oracle of progressive scene generation (Text2NeRF-style loops), as ``field-teacher``
is for score distillation. It serves a known scene, the shipped analytic room (``assets/scene``,
:mod:`gen3d.scene.analytic`) or any ``scene.json`` of that form, through the interfaces the
real model roles have, so a loop run against it must rebuild the known scene: that checks its
cameras, warping, hole masks, depth alignment and losses without weights.

- ``generate(prompt, seed, camera) -> [H, W, 3]``, the text-to-image role (``gen3d.TextToImage``):
  the scene's render from its start camera (``scene.json``'s ``camera``; ``start_camera()``
  gives it). A prompt makes the first view, so a loop must put its first view where the
  teacher's is; another pose is refused with one line. Intrinsics and size are the camera's.
- ``inpaint(image, mask, prompt, seed, camera) -> [H, W, 3]``, the inpainter (``gen3d.Inpainter``):
  the masked pixels (True: fill) from the scene's render at ``camera``; every other pixel is
  ``image``'s, bit for bit, as a real inpainter's output must be checked to keep.
- ``estimate(image, camera) -> [H, W]``, monocular depth: the scene's true z-depth at ``camera``
  as relative inverse depth ``s / z + t`` under a random scale and shift, drawn from the seed and
  the camera's pose (so a run and its resumption see the same draws): what
  ``gen3d.scene.align_depth`` must undo. ``estimate_depth(image, camera=...)`` gives the same as
  a :class:`gen3d.DepthMap` (normalised to [0, 1] per image, the ``depth`` role's convention).

Images are float arrays in 0..1 (sRGB; tensors are taken too), masks bool, as the real roles'
(``sd-text-to-image``, ``sd-inpainter``, ``depth-anything``); ``camera`` is a one-camera
:class:`gen3d.Cameras` (OpenGL axes, world Z up: the scene's own world), which the real models
take and ignore and the teacher needs. Prompts are checked as the real models check them, seeds
ignored: the teacher has one answer (``*_candidates`` give one candidate). It registers as a
preprocessor playing the roles ``text-to-image``, ``inpainter`` and ``depth``, as the real
models do.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from gen3d import Cameras, Component, ConfigError, DepthMap, Gen3DError, hookimpl, scene

SHIPPED_SCENE = Path(__file__).resolve().parents[1] / "assets" / "scene"


@dataclass
class SceneTeacherConfig:
    # The scene: a scene.json or the folder holding one (default: the shipped room). On the
    # command line, relative to where you run.
    scene: Path = SHIPPED_SCENE
    # Colour rays a pixel side: 2 x 2 averages each pixel's square as a camera (and a diffusion
    # model's output) does, so edges are not jagged differently in every view. Depth is always
    # exact at the pixel centre.
    supersample: int = 2
    seed: int = 0  # of the depth stand-in's scale and shift draws
    # The unknown affine map of the depth stand-in: s log-uniform in scale_range, t uniform in
    # shift_range times s / (median depth), so the shift is comparable with the disparity itself.
    scale_range: list[float] = field(default_factory=lambda: [0.1, 10.0])
    shift_range: list[float] = field(default_factory=lambda: [-0.5, 0.5])
    # How far (world units, and the rotation's max entry difference) a pose may be from the
    # start camera for generate(): a float32 round trip of the pose passes.
    start_tolerance: float = 1e-4

    ROLES: ClassVar[tuple[str, ...]] = ("text-to-image", "inpainter", "depth")

    def __post_init__(self) -> None:
        if not 1 <= self.supersample <= 8:
            raise ValueError(f"supersample is rays a pixel side, 1 to 8; got {self.supersample}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be [low, high] with 0 < low <= high; got {self.scale_range}")
        if len(self.shift_range) != 2 or not self.shift_range[0] <= self.shift_range[1]:
            raise ValueError(f"shift_range must be [low, high] with low <= high; got {self.shift_range}")
        if self.start_tolerance <= 0:
            raise ValueError(f"start_tolerance must be > 0; got {self.start_tolerance}")


class SceneTeacher:
    def __init__(self, config: SceneTeacherConfig):
        self.config = config
        self.scene = scene.AnalyticScene.load(config.scene)
        self._cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def start_camera(self, pinhole: scene.PinholeConfig | None = None) -> Cameras:
        """The start camera (the view ``generate`` makes), with the scene's intrinsics or ``pinhole``'s."""
        return self.scene.start_camera(pinhole)

    def render(self, camera: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
        """(rgb [H, W, 3], z-depth [H, W]) of the scene at ``camera``; the last few are cached."""
        cam = self._check_camera(camera, "render")
        key = b"".join(t.double().numpy().tobytes() for t in (cam.c2w, cam.fx, cam.fy, cam.cx, cam.cy))
        key += f"{cam.width}x{cam.height}".encode()
        if key not in self._cache:
            if len(self._cache) >= 4:  # a loop asks for one camera's render a few times in a row
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self.scene.render(cam, self.config.supersample)
        return self._cache[key]

    def generate(self, prompt: str, seed: int, camera: Cameras | None = None) -> np.ndarray:
        """The text-to-image stand-in: the scene from its start camera, float32 [H, W, 3] in 0..1."""
        _check_prompt(prompt, "text-to-image")
        cam = self._check_camera(camera, "generate")
        start = torch.tensor(self.scene.camera["c2w"], dtype=torch.float64)
        off = float((cam.c2w[0].double() - start).abs().max())
        if off > self.config.start_tolerance:
            raise Gen3DError(f"scene-teacher: generate() was asked for a camera {off:.3g} from the scene's start "
                             "camera: start the trajectory at the teacher's start_camera() (its scene.json 'camera')")
        return self.render(cam)[0].numpy().copy()

    def generate_candidates(self, prompt: str, seed: int, camera: Cameras | None = None) -> list[np.ndarray]:
        """The teacher has one answer: one candidate."""
        return [self.generate(prompt, seed, camera)]

    def inpaint(self, image, mask, prompt: str, seed: int, camera: Cameras | None = None) -> np.ndarray:
        """The inpainter stand-in: ``image`` (float [H, W, 3]) with its ``mask`` pixels (bool, True:
        fill) from the scene's render at ``camera``; every other pixel as given, in its dtype."""
        _check_prompt(prompt, "inpainter")
        cam = self._check_camera(camera, "inpaint")
        image, mask = _numpy(image), _numpy(mask)
        size = (cam.height, cam.width)
        if image.shape != size + (3,) or mask.shape != size or not np.issubdtype(image.dtype, np.floating):
            raise Gen3DError(f"scene-teacher: inpaint() takes a float image [{cam.height}, {cam.width}, 3] and a mask "
                             f"[{cam.height}, {cam.width}] for this camera; got {image.dtype} {list(image.shape)} "
                             f"and {list(mask.shape)}")
        if mask.dtype != bool:
            raise Gen3DError(f"scene-teacher: inpaint()'s mask must be bool (True: fill), got {mask.dtype}")
        rgb = self.render(cam)[0].numpy().astype(image.dtype)
        return np.where(mask[..., None], rgb, image)

    def inpaint_candidates(self, image, mask, prompt: str, seed: int,
                           camera: Cameras | None = None) -> list[np.ndarray]:
        """The teacher has one answer: one candidate."""
        return [self.inpaint(image, mask, prompt, seed, camera)]

    def rank_candidates(self, candidates, first_view) -> int:
        """The candidate nearest the first view in mean squared pixel difference: the teacher's
        stand-in for CLIP similarity (its own candidates are one, so this only ranks others')."""
        if not len(candidates):
            raise ValueError("rank_candidates: no candidates")
        first = _numpy(first_view).astype(np.float64)
        return int(np.argmin([np.mean((_numpy(c).astype(np.float64) - first) ** 2) for c in candidates]))

    def estimate(self, image, camera: Cameras | None = None) -> np.ndarray:
        """The depth stand-in: relative inverse depth ``s / z + t`` float32 [H, W] of the scene at ``camera``."""
        cam = self._check_camera(camera, "estimate")
        image = _numpy(image)
        if image.shape[:2] != (cam.height, cam.width):
            raise Gen3DError(f"scene-teacher: estimate() got a {list(image.shape)} image for a "
                             f"{cam.width}x{cam.height} camera")
        depth = self.render(cam)[1].double()
        s, t = self.affine(cam)
        return (s / depth + t * s / depth.median()).float().numpy()

    def estimate_depth(self, image, camera: Cameras | None = None) -> DepthMap:
        """``estimate`` in the ``depth`` role's convention (:class:`gen3d.DepthMap`)."""
        raw = self.estimate(image, camera)
        low, high = float(raw.min()), float(raw.max())
        normalised = (raw - low) / (high - low) if high > low else np.zeros_like(raw)
        return DepthMap(normalised.astype(np.float32), (low, high), "scene-teacher")

    def affine(self, camera: Cameras) -> tuple[float, float]:
        """The (scale, relative shift) drawn for this camera's pose: the same on every call and resume."""
        digest = hashlib.sha256(np.round(camera.c2w[0].double().numpy(), 5).tobytes()).digest()
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + int.from_bytes(digest[:6], "little"))
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        (s0, s1), (t0, t1) = self.config.scale_range, self.config.shift_range
        return math.exp(math.log(s0) + u[0] * (math.log(s1) - math.log(s0))), t0 + u[1] * (t1 - t0)

    def _check_camera(self, camera: Cameras | None, what: str) -> Cameras:
        if not isinstance(camera, Cameras) or len(camera) != 1:
            raise Gen3DError(f"scene-teacher: {what}() needs the view's camera (one gen3d.Cameras), got "
                             f"{type(camera).__name__}: the teacher renders what that camera sees")
        eye = camera.c2w[0, :3, 3].double()
        lo, hi = torch.tensor(self.scene.room["min"]), torch.tensor(self.scene.room["max"])
        if ((eye <= lo) | (eye >= hi)).any():
            raise Gen3DError(f"scene-teacher: camera at {[round(float(v), 3) for v in eye]} is outside the scene's "
                             f"room {self.scene.aabb}")
        return camera


def _check_prompt(prompt: str, role: str) -> None:
    # As the real models refuse it (sd-text-to-image, sd-inpainter): a loop must not get further
    # with the teacher than it would with them.
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{role}: the prompt is empty; say what the scene shows, e.g. prompt=\"a cosy living room\"")


def _numpy(value) -> np.ndarray:
    """An array of ``value`` (a tensor is converted without changing a value)."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def build(config: SceneTeacherConfig, *, role: str = "text-to-image") -> SceneTeacher:
    return SceneTeacher(config)


@hookimpl
def gen3d_preprocessors():
    return [Component("scene-teacher", build, SceneTeacherConfig,
                      "text-to-image, inpainter and depth stand-ins that render a known scene (a fidelity oracle)")]
