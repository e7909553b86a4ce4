"""Geometry of progressive scene generation (Text2NeRF-style): pinhole cameras, trajectories,
depth-image-based warping and hole masks, depth alignment, and the analytic scene the
``scene-teacher`` serves. Pure torch, fast on a CPU."""

from .align import AlignConfig, Alignment, align_depth
from .analytic import AnalyticScene
from . import scoring
from .fusion import FusedVolume, FusionConfig, fuse_depths
from .pinhole import PinholeConfig, depth_at, pinhole, project, ray_to_z, unproject, z_to_ray
from .scoring import held_out_poses, seen_chamfer
from .trajectory import TrajectoryConfig, check_pose, circle_poses, forward_poses, load_poses, trajectory
from .warp import SplatConfig, Warped, coverage, fragments, holes, warp, zbuffer

__all__ = ["AlignConfig", "Alignment", "align_depth", "AnalyticScene", "FusedVolume", "FusionConfig", "fuse_depths",
           "PinholeConfig", "depth_at", "pinhole", "project", "ray_to_z", "unproject", "z_to_ray",
           "TrajectoryConfig", "check_pose", "circle_poses", "forward_poses", "load_poses", "trajectory", "SplatConfig", "Warped", "coverage", "fragments", "holes", "warp", "zbuffer",
           "scoring", "held_out_poses", "seen_chamfer"]
