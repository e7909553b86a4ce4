"""Camera trajectories of a progressive scene recipe: ``forward``, ``circle`` or a file of poses.

Every trajectory starts at the start pose (the first view, the one text-to-image makes) and is
visited in a fixed order, so a resumed run meets the same views in the same order.

- ``forward``: the start pose, then 8 views around it, one per direction in the image plane
  (right, up-right, up, up-left, left, down-left, down, down-right: every 45 deg,
  counter-clockwise from the camera's +x). Each is moved ``translation`` along its direction and
  turned ``rotation_deg`` to look that way: small steps that keep most of the start view in
  sight, so each new view has a few holes to inpaint and enough known pixels to align against.
- ``circle``: ``views`` poses turned about the world's Z axis through the circle's centre,
  360 deg / ``views`` apart, looking outward. The centre is ``radius`` behind the start
  position (along its horizontal viewing direction), so the first pose is the start pose;
  ``radius`` 0 turns on the spot (a panorama: no parallax).
- ``file``: a JSON list of 4x4 camera-to-world matrices (OpenGL axes, world Z up), or an object
  with ``poses`` (such a list) or ``frames`` (NeRF-synthetic ``transform_matrix`` entries). The
  first pose is the start view. A malformed pose is one line naming the file and the pose index.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from gen3d.errors import DataError

KINDS = ("forward", "circle", "file")
ORTHONORMAL_TOLERANCE = 1e-4  # on max |R^T R - I|: float32 matrices written with 6+ digits pass


@dataclass
class TrajectoryConfig:
    kind: Literal["forward", "circle", "file"] = "forward"
    translation: float = 0.15  # forward: world units moved along each direction
    rotation_deg: float = 10.0  # forward: turn toward each direction
    views: int = 12  # circle: poses over the 360 deg (30 deg apart: about half of a 60 deg view is new)
    radius: float = 0.0  # circle: distance from the circle's centre to the poses
    path: Path | None = None  # file: the JSON file of poses

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not 0 <= self.translation < 10:
            raise ValueError(f"translation is world units, 0 to 10; got {self.translation}")
        if not 0 <= self.rotation_deg <= 90:
            raise ValueError(f"rotation_deg is degrees, 0 to 90; got {self.rotation_deg}")
        if not 2 <= self.views <= 360:
            raise ValueError(f"views is the circle's pose count, 2 to 360; got {self.views}")
        if self.radius < 0:
            raise ValueError(f"radius must be >= 0; got {self.radius}")
        if self.kind == "file" and self.path is None:
            raise ValueError("path: kind 'file' needs the JSON file of poses")


def rotation(axis: torch.Tensor, angle: float) -> torch.Tensor:
    """3x3 rotation by ``angle`` radians about the unit ``axis`` (Rodrigues)."""
    k = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]],
                     dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def forward_poses(start: torch.Tensor, translation: float, rotation_deg: float, first_deg: float = 0.0) -> torch.Tensor:
    """[9, 4, 4]: the start pose, then the 8 directions in their fixed order (the first at
    ``first_deg`` from the camera's +x: 22.5 puts poses between the trajectory's, to hold out)."""
    start = start.double()
    poses = [start]
    for k in range(8):
        angle = math.radians(first_deg + 45 * k)
        along = torch.tensor([math.cos(angle), math.sin(angle), 0.0], dtype=torch.float64)  # camera axes
        # Turning toward `along` tilts the viewing axis (-z) into it: a rotation about z x along.
        axis = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), along)
        pose = start.clone()
        pose[:3, :3] = start[:3, :3] @ rotation(axis, -math.radians(rotation_deg))
        pose[:3, 3] = start[:3, 3] + translation * (start[:3, :3] @ along)
        poses.append(pose)
    return torch.stack(poses).float()


def circle_poses(start: torch.Tensor, views: int, radius: float) -> torch.Tensor:
    """[views, 4, 4]: the start pose turned about world Z by 360 deg / views at a time."""
    start = start.double()
    look = -start[:3, 2]
    horizontal = torch.tensor([look[0], look[1], 0.0], dtype=torch.float64)
    if horizontal.norm() < 1e-6 and radius > 0:
        raise ValueError("circle: the start camera looks straight up or down, so 'behind it' is undefined; "
                         "use radius 0")
    centre = start[:3, 3] - radius * horizontal / horizontal.norm().clamp_min(1e-12)
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    poses = []
    for k in range(views):
        turn = rotation(z, 2 * math.pi * k / views)
        pose = start.clone()
        pose[:3, :3] = turn @ start[:3, :3]
        pose[:3, 3] = centre + turn @ (start[:3, 3] - centre)
        poses.append(pose)
    return torch.stack(poses).float()


def check_pose(pose, where: str) -> torch.Tensor:
    """One camera-to-world matrix as a [4, 4] tensor; a one-line DataError naming ``where`` if it is malformed."""
    try:
        matrix = torch.tensor(pose, dtype=torch.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a 4x4 list of numbers, got {json.dumps(pose)[:60]}") from None
    if matrix.shape != (4, 4):
        raise DataError(f"{where}: expected a 4x4 matrix, got shape {list(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise DataError(f"{where}: holds a non-finite number (NaN or infinity)")
    if (matrix[3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)).abs().max() > ORTHONORMAL_TOLERANCE:
        raise DataError(f"{where}: the last row must be [0, 0, 0, 1], got {matrix[3].tolist()}")
    rot = matrix[:3, :3]
    error = float((rot.T @ rot - torch.eye(3, dtype=torch.float64)).abs().max())
    if error > ORTHONORMAL_TOLERANCE:
        raise DataError(f"{where}: the rotation is not orthonormal (max |R^T R - I| = {error:.3g}; a scaled or "
                        "sheared camera?)")
    if torch.linalg.det(rot) < 0:
        raise DataError(f"{where}: the rotation is a reflection (determinant -1): the camera axes must be "
                        "right-handed (OpenGL: x right, y up, looking down -z)")
    return matrix.float()


def load_poses(path: Path) -> torch.Tensor:
    """[N, 4, 4] camera-to-world poses from a JSON file (see the module's docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"{path}: cannot read the trajectory file ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and "frames" in data:
        frames = data["frames"]
        if not isinstance(frames, list) or not all(isinstance(f, dict) and "transform_matrix" in f for f in frames):
            raise DataError(f"{path}: every entry of 'frames' needs a 'transform_matrix'")
        data = [f["transform_matrix"] for f in frames]
    elif isinstance(data, dict):
        data = data.get("poses")
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty list of 4x4 camera-to-world matrices "
                        "(or an object with 'poses' or 'frames')")
    return torch.stack([check_pose(pose, f"{path}: pose {i}") for i, pose in enumerate(data)])


def trajectory(config: TrajectoryConfig, start: torch.Tensor) -> torch.Tensor:
    """[N, 4, 4] poses to visit in order; the first is ``start`` (for ``file``: the file's first pose)."""
    if config.kind == "forward":
        return forward_poses(start, config.translation, config.rotation_deg)
    if config.kind == "circle":
        return circle_poses(start, config.views, config.radius)
    return load_poses(config.path)
