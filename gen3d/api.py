"""The public API: everything a plugin, in gen3d's own ``plugins/`` or in anyone's package, may use.

Import it from the package: ``from gen3d import hookimpl, Component, ...``. Other modules of
gen3d are internal and may change; what is listed here is kept stable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cameras import Cameras, PixelFilter, focal_from_fov, look_at, orbit, random_views
from .colors import encode_colors, linear_to_srgb, srgb_to_linear
from .config import Choice, Context, choice, from_dict
from .errors import ConfigError, DataError, Gen3DError, PluginError, TrainingDiverged, call_plugin
from .export import (MeshSettings, fill_interior, finish_mesh, keep_large_components, level_from_silhouettes,
                     surface_mesh, up_axis)
from .fields import (CAPABILITIES, DensitySurface, Field, RadianceField, RefittableField, SurfaceField,
                     TrainableField, surface_of)
from .guidance import (Guidance, GuidanceInput, GuidanceOutput, ReferenceView, ViewAngles, Weighting, ZeroVariant,
                       annealed, ddpm_alphas_cumprod, perfect_denoiser_gradient, relative_camera, sample_timesteps,
                       sds_loss, sds_weights, t_range)
from .hookspecs import hookimpl
from .hub import load_pretrained, pick_dtype, resolve
from .io import atomic_path, load_checkpoint, to_uint8, write_gif, write_json, write_text
from .outputs import (HeldOutViews, Orbit, PreviewSettings, Silhouettes, StageOutputs, chamfer, fov_of,
                      plain_view_renderer, psnr, quick_psnr, surface_distances)
from .preprocessing import (PREPROCESSOR_ROLES, DepthEstimator, DepthMap, Detections, Detector, Inpainter,
                            Segmentation, Segmenter, TextToImage, preprocessor_roles)
from .prompts import EmbeddingCache, ViewPrompts, view_prompts
from .recipe import Recipe, StageSettings, apply_override, parse_override
from .render import (RenderOutput, RenderSettings, VolumeRenderer, binary_entropy, cell_max_density,
                     filtered_means, pixel_means)
from .run import Run, StageLoop, TrainingLoop, TrainResult
from .raster import antialias, clip_matrices, edge_neighbors, interpolate, project, rasterize
from .raster import backend as raster_backend
from .runs import TrainedField, load_trained_field
from .specs import Component
from .texture import MeshTexture, texture_of
from .tets import (TetEdges, TetGrid, TetMesh, lattice, laplacian_loss, marching_tets, normal_laplacian_loss,
                   sdf_sign_loss, tet_edges, tet_grid, vertex_normals)
from .training import FieldLoop, FieldTrainer


def registry():
    """The installed plugins' components (entry points, plus any registered in this process)."""
    from .plugins import get_registry

    return get_registry()


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML file with ``key.sub=value`` overrides, validated against the installed plugins."""
    from .recipe import load_recipe as load

    return load(Path(path), list(overrides), registry=registry())


def run_recipe(recipe: Recipe, out_dir: str | Path, resume: bool = False, device: str | None = None,
               quiet: bool = False) -> dict[str, Any]:
    """Run a loaded recipe into ``out_dir``; returns its final metrics."""
    from .trainer import run_recipe as run

    return run(recipe, Path(out_dir), hooks=registry().hooks, resume=resume, device=device, quiet=quiet)


__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations", "Path", "Any")]
