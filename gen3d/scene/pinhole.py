"""The scene recipes' pinhole camera, and pixels <-> points through it.

Depth here is **z-depth**: the distance along the camera's viewing axis (-z in OpenGL axes), the
quantity a pinhole's disparity is the inverse of (monocular estimators predict ``s / z + t``).
The volume renderer's ``RenderOutput.depth`` is the distance along the (unit) ray instead:
``ray_to_z`` and ``z_to_ray`` convert. Pixel (row i, column j) covers [j, j+1) x [i, i+1) in
(u, v) pixel units, its centre at (j + 0.5, i + 0.5), as in :class:`gen3d.cameras.Cameras`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gen3d.cameras import Cameras


@dataclass
class PinholeConfig:
    # Horizontal field of view. 60 deg is a normal lens (about 31 mm on full frame) and close to
    # what text-to-image models were trained on; Text2NeRF and Text2Room use about this.
    fov_deg: float = 60.0
    width: int = 512  # Stable Diffusion 2's native 512 px
    height: int = 512

    def __post_init__(self) -> None:
        if not 1.0 <= self.fov_deg <= 170.0:
            raise ValueError(f"fov_deg is the horizontal field of view in degrees, 1 to 170; got {self.fov_deg}")
        if not (8 <= self.width <= 8192 and 8 <= self.height <= 8192):
            raise ValueError(f"width and height are pixels, 8 to 8192; got {self.width} x {self.height}")

    @property
    def focal(self) -> float:
        """Focal length in pixels (square pixels: the same for both axes)."""
        return 0.5 * self.width / math.tan(0.5 * math.radians(self.fov_deg))


def pinhole(c2w: torch.Tensor, config: PinholeConfig | None = None) -> Cameras:
    """Cameras ([N, 4, 4] or one [4, 4] camera-to-world) with the config's intrinsics, principal
    point at the image centre."""
    config = config or PinholeConfig()
    c2w = c2w.reshape(-1, 4, 4).float()
    n = len(c2w)
    f = torch.full((n,), config.focal)
    return Cameras(c2w, f, f.clone(), torch.full((n,), config.width / 2), torch.full((n,), config.height / 2),
                   config.width, config.height)


def single(camera: Cameras, what: str = "camera") -> Cameras:
    """``camera`` as a one-camera batch; one line if it holds several."""
    if len(camera) != 1:
        raise ValueError(f"{what}: expected one camera, got {len(camera)}")
    return camera


def pixel_directions(camera: Cameras) -> torch.Tensor:
    """[H, W, 3] camera-space directions through the pixel centres, scaled to z = -1."""
    cam = single(camera)
    v, u = torch.meshgrid(torch.arange(cam.height, dtype=torch.float32) + 0.5,
                          torch.arange(cam.width, dtype=torch.float32) + 0.5, indexing="ij")
    x = (u - cam.cx[0]) / cam.fx[0]
    y = -(v - cam.cy[0]) / cam.fy[0]  # image v grows downwards, camera y upwards
    return torch.stack([x, y, -torch.ones_like(x)], -1)


def unproject(depth: torch.Tensor, camera: Cameras) -> torch.Tensor:
    """[H, W, 3] world points of the pixel centres at z-depth ``depth`` [H, W]."""
    cam = single(camera)
    local = pixel_directions(cam) * depth[..., None]
    return local @ cam.c2w[0, :3, :3].T + cam.c2w[0, :3, 3]


def project(points: torch.Tensor, camera: Cameras) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points [..., 3] -> (u, v) in pixel units and z-depth (<= 0: behind the camera)."""
    cam = single(camera)
    local = (points - cam.c2w[0, :3, 3]) @ cam.c2w[0, :3, :3]  # rotation transposed: world -> camera
    z = -local[..., 2]
    safe = torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
    u = cam.cx[0] + cam.fx[0] * local[..., 0] / safe
    v = cam.cy[0] - cam.fy[0] * local[..., 1] / safe
    return u, v, z


def depth_at(points: torch.Tensor, depth: torch.Tensor, camera: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """World points [N, 3] -> (their z-depth in ``camera``, the z-depth map [H, W] at the pixel each
    falls in; inf where it falls outside the image or behind the camera)."""
    cam = single(camera)
    u, v, z = project(points, cam)
    col, row = torch.floor(u).long(), torch.floor(v).long()
    inside = (z > 0) & (col >= 0) & (col < cam.width) & (row >= 0) & (row < cam.height)
    surface = torch.full_like(z, math.inf)
    surface[inside] = depth[row[inside], col[inside]].to(z.dtype)
    return z, surface


def ray_to_z(ray_depth: torch.Tensor, camera: Cameras) -> torch.Tensor:
    """Distance along each pixel-centre unit ray [H, W] -> z-depth."""
    return ray_depth / pixel_directions(camera).norm(dim=-1)


def z_to_ray(z: torch.Tensor, camera: Cameras) -> torch.Tensor:
    """z-depth [H, W] -> distance along each pixel-centre unit ray."""
    return z * pixel_directions(camera).norm(dim=-1)
