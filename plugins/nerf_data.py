"""``nerf-synthetic``: multi-view images with cameras, in the NeRF-synthetic or instant-ngp convention.

- NeRF-synthetic: ``transforms_{train,val,test}.json`` with ``camera_angle_x`` and per-frame
  ``file_path`` (extension optional) and camera-to-world ``transform_matrix`` (OpenGL axes).
- instant-ngp / nerfstudio: ``fl_x, fl_y, cx, cy, w, h`` given globally or per frame, in one
  ``transforms.json`` (then every ``test_every``-th frame is held out) or per-split files.

Images are RGBA (alpha composited on the background at training time) or RGB.
World frame: Z up. Scene bounds: the recipe's ``aabb``, else ``scene.json`` beside the data,
else estimated from the cameras (where their optical axes meet, and what the nearest camera sees).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gen3d import Cameras, Component, DataError, focal_from_fov, hookimpl

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".exr")


@dataclass
class NerfDataConfig:
    path: Path
    downscale: int = 1  # integer factor, for big images
    aabb: list[float] | None = None  # xmin ymin zmin xmax ymax zmax; default: scene.json or estimated
    test_split: str = "test"
    max_test_views: int | None = None  # evaluate on the first N held-out views only
    test_every: int = 8  # with a single transforms.json: hold out every N-th frame

    def __post_init__(self) -> None:
        if self.downscale < 1:
            raise ValueError(f"downscale must be a positive integer, got {self.downscale}")
        if self.aabb is not None and (len(self.aabb) != 6 or any(
                self.aabb[i] >= self.aabb[i + 3] for i in range(3))):
            raise ValueError(f"aabb must be 6 numbers [xmin, ymin, zmin, xmax, ymax, zmax], got {self.aabb}")


@dataclass
class Views:
    images: torch.Tensor  # [N,H,W,4] float in [0,1], straight alpha (alpha 1 for RGB inputs)
    cameras: Cameras
    names: list[str]


@dataclass
class MultiViewData:
    train: Views
    test: Views
    aabb: torch.Tensor  # [6]
    has_alpha: bool
    root: Path

    @property
    def ground_truth_mesh(self) -> Path | None:
        path = self.root / "mesh.ply"
        return path if path.is_file() else None


def load(config: NerfDataConfig) -> MultiViewData:
    root = Path(config.path)
    if not root.is_dir():
        raise DataError(f"data set folder not found: {root}")
    splits = _read_splits(root, config)
    train = _load_views(root, splits["train"], config.downscale)
    test = _load_views(root, splits["test"][: config.max_test_views], config.downscale)
    if len(train.names) == 0:
        raise DataError(f"{root}: no training frames")
    aabb = _scene_box(root, config, train.cameras)
    has_alpha = bool((train.images[..., 3] < 1).any())
    return MultiViewData(train, test, aabb, has_alpha, root)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise DataError(f"{path}: expected an object with a 'frames' list")
    return data


def _read_splits(root: Path, config: NerfDataConfig) -> dict[str, list[tuple[dict, dict, Path]]]:
    """Per split, a list of (frame, shared intrinsics, json path)."""
    per_split = root / "transforms_train.json"
    if per_split.is_file():
        test_file = root / f"transforms_{config.test_split}.json"
        if not test_file.is_file():
            raise DataError(f"{root}: has transforms_train.json but no transforms_{config.test_split}.json")
        out = {}
        for split, path in (("train", per_split), ("test", test_file)):
            data = _read_json(path)
            out[split] = [(frame, data, path) for frame in data["frames"]]
        return out
    single = root / "transforms.json"
    if not single.is_file():
        raise DataError(f"{root}: no transforms_train.json (NeRF-synthetic) or transforms.json (instant-ngp) found")
    data = _read_json(single)
    frames = sorted(data["frames"], key=lambda f: str(f.get("file_path", "")))
    items = [(frame, data, single) for frame in frames]
    test = items[:: config.test_every]
    train = [item for i, item in enumerate(items) if i % config.test_every]
    return {"train": train, "test": test}


def _image_path(root: Path, frame: dict, source: Path) -> Path:
    if "file_path" not in frame:
        raise DataError(f"{source}: a frame has no 'file_path'")
    path = (source.parent / frame["file_path"]).resolve()
    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        return path
    for suffix in IMAGE_SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    raise DataError(f"{source}: image {frame['file_path']!r} not found (looked for {path} with "
                    f"{', '.join(IMAGE_SUFFIXES)})")


def read_rgba(path: Path, downscale: int = 1) -> np.ndarray:
    """An image as float32 RGBA in [0,1]; 16-bit, grayscale, palette and EXIF-rotated files included."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float32) / 65535.0
                arr = np.stack([arr, arr, arr, np.ones_like(arr)], axis=-1)
            else:
                arr = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    if downscale > 1:
        h, w = arr.shape[0] // downscale, arr.shape[1] // downscale
        arr = arr[: h * downscale, : w * downscale].reshape(h, downscale, w, downscale, 4)
        # Average colour weighted by alpha so edges don't pick up the transparent pixels' colour.
        alpha = arr[..., 3:].mean(axis=(1, 3))
        rgb = (arr[..., :3] * arr[..., 3:]).mean(axis=(1, 3)) / np.maximum(alpha, 1e-8)
        arr = np.concatenate([rgb, alpha], axis=-1)
    return arr


def _intrinsics(frame: dict, shared: dict, width: int, height: int, source: Path) -> tuple[float, ...]:
    get = lambda key: frame.get(key, shared.get(key))  # noqa: E731  (per-frame wins)
    if get("fl_x") is not None:
        w0, h0 = float(get("w") or width), float(get("h") or height)
        sx, sy = width / w0, height / h0
        fx = float(get("fl_x")) * sx
        fy = float(get("fl_y") or get("fl_x")) * sy
        cx = float(get("cx") if get("cx") is not None else w0 / 2) * sx
        cy = float(get("cy") if get("cy") is not None else h0 / 2) * sy
        return fx, fy, cx, cy
    if get("camera_angle_x") is not None:
        fx = focal_from_fov(float(get("camera_angle_x")), width)
        fy = focal_from_fov(float(get("camera_angle_y")), height) if get("camera_angle_y") else fx
        return fx, fy, width / 2, height / 2
    raise DataError(f"{source}: no intrinsics: give camera_angle_x or fl_x/fl_y/cx/cy")


def _load_views(root: Path, items: list[tuple[dict, dict, Path]], downscale: int) -> Views:
    images, poses, intr, names = [], [], [], []
    size = None
    for frame, shared, source in items:
        path = _image_path(root, frame, source)
        arr = read_rgba(path, downscale)
        if size is None:
            size = arr.shape[:2]
        elif arr.shape[:2] != size:
            raise DataError(f"{path}: size {arr.shape[1]}x{arr.shape[0]} differs from the first image's "
                            f"{size[1]}x{size[0]}")
        matrix = np.asarray(frame.get("transform_matrix"), dtype=np.float32)
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
            raise DataError(f"{source}: frame {frame['file_path']!r}: transform_matrix must be a finite 4x4 matrix")
        images.append(arr)
        poses.append(matrix)
        intr.append(_intrinsics(frame, shared, arr.shape[1], arr.shape[0], source))
        names.append(path.name)
    h, w = size if size else (0, 0)
    k = torch.tensor(intr, dtype=torch.float32).reshape(-1, 4)
    cameras = Cameras(torch.from_numpy(np.stack(poses)) if poses else torch.zeros(0, 4, 4),
                      k[:, 0], k[:, 1], k[:, 2], k[:, 3], w, h)
    stack = torch.from_numpy(np.stack(images)) if images else torch.zeros(0, h, w, 4)
    return Views(stack, cameras, names)


def _scene_box(root: Path, config: NerfDataConfig, cameras: Cameras) -> torch.Tensor:
    if config.aabb is not None:
        return torch.tensor(config.aabb, dtype=torch.float32)
    scene = root / "scene.json"
    if scene.is_file():
        try:
            return torch.tensor(json.loads(scene.read_text())["aabb"], dtype=torch.float32)
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{scene}: expected an 'aabb' of 6 numbers ({exc})") from None
    return estimate_box(cameras)


def estimate_box(cameras: Cameras) -> torch.Tensor:
    """A cube around the point the cameras look at, as wide as the nearest camera's view there."""
    origins = cameras.c2w[:, :3, 3].double()
    axes = -cameras.c2w[:, :3, 2].double()
    axes = axes / axes.norm(dim=-1, keepdim=True)
    # Least-squares point closest to every optical axis: sum (I - a a^T) (p - o) = 0.
    proj = torch.eye(3, dtype=torch.float64) - axes[:, :, None] * axes[:, None, :]
    center = torch.linalg.lstsq(proj.sum(0), (proj @ origins[:, :, None]).sum(0)).solution[:, 0]
    distance = (origins - center).norm(dim=-1).min()
    half_fov = math.atan(0.5 * cameras.width / float(cameras.fx.max()))
    half = float(distance * math.tan(half_fov))
    return torch.cat([center - half, center + half]).float()


@hookimpl
def gen3d_datasets():
    return [Component("nerf-synthetic", load, NerfDataConfig,
                      "multi-view RGBA images + cameras (NeRF-synthetic or instant-ngp transforms)")]
