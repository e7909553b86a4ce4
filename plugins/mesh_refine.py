"""``mesh-refine``: refine an earlier stage's surface as a mesh against posed images (DMTet, as in
Magic3D's second stage).

The stage starts from the field of an earlier stage (``init_from``), any representation: its
signed surface (``gen3d.fields.surface_of``; a density field's at the level that stage exported,
read from its ``metrics.json``) is sampled on a cube grid, and a band of cells around the zero
crossing becomes a deformable tetrahedral grid (gen3d.tets) whose vertices hold SDF values
(redistanced to the start surface, so steps mean the same everywhere) and offsets bounded to a
fraction of a cell. Colour lives in a voxel grid over the box, started from the earlier field's
colour (``albedo(x)``, else its colour seen along the inward normal).

Each step: marching tetrahedra -> mesh; the mesh is rasterised (gen3d.raster: nvdiffrast on CUDA
when installed, our torch rasteriser elsewhere); the colour grid is read at each pixel's surface
point; silhouette edges are antialiased so the loss reaches the outline's vertices. The stage's
objective is one of, or both:

- posed images (``data``, reconstruction): a few training views a step, RGB on a random
  background + mask, each view rasterised ``supersample`` times finer and filtered down by the
  images' own pixel filter;
- a guidance (``guidance``, text- and image-to-3D as in Magic3D's second stage): random views
  around the object, shaded as text-to-3d shades them (albedo, Lambertian under a light near the
  camera, or textureless: white albedo, so only geometry can satisfy the guidance), scored by the
  guidance with view-dependent prompts. ``reference`` adds image-to-3D's reference view: the
  guidance is conditioned on it and its colour and mask are fitted at its camera.

Regularisers: a Laplacian on the mesh and nvdiffrec's SDF sign regulariser on the crossed edges.
At the end the core scores the rasterised mesh on the held-out views (when there are images) and
exports it (decimated, coloured and baked by ``gen3d.export.finish_mesh``).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from scipy import ndimage
from torch import nn

from gen3d import (Choice, Component, ConfigError, Gen3DError, GuidanceInput, HeldOutViews, Orbit, PixelFilter,
                   ReferenceView, RenderSettings, StageOutputs, SurfaceField, TetMesh, ViewAngles, ViewPrompts,
                   VolumeRenderer, antialias, chamfer, choice, clip_matrices, edge_neighbors, fill_interior,
                   finish_mesh, fov_of, hookimpl, interpolate, keep_large_components, lattice, laplacian_loss,
                   level_from_silhouettes, linear_to_srgb, load_trained_field, marching_tets, normal_laplacian_loss,
                   project, quick_psnr, random_views, raster_backend, rasterize, sdf_sign_loss, srgb_to_linear,
                   surface_distances, surface_mesh, surface_of, tet_edges, tet_grid, vertex_normals, view_prompts)
from gen3d_plugins.image_to_3d import ReferenceSettings, camera_at, read_cutout, resize_cutout
from gen3d_plugins.text_to_3d import CameraSampling, Shading

@dataclass
class TetSettings:
    resolution: int = 80  # cube cells along the box's longest side (six tetrahedra each)
    # Cells on each side of the start surface that the grid covers: how far the surface may
    # move. Cells beyond are never built, which keeps a step's marching to the band.
    band: int = 3
    max_deform: float = 0.25  # vertex offsets are bounded to this fraction of a cell (tanh)

    def __post_init__(self) -> None:
        if not 8 <= self.resolution <= 256:
            raise ValueError(f"resolution must be between 8 and 256 cells, got {self.resolution}")
        if not 1 <= self.band <= 16:
            raise ValueError(f"band must be 1..16 cells, got {self.band}")
        if not 0 <= self.max_deform < 0.5:
            raise ValueError(f"max_deform is a fraction of a cell in [0, 0.5) (more lets tetrahedra fold), "
                             f"got {self.max_deform}")


@dataclass
class RefineTrain:
    views_per_step: int = 4  # whole training images rendered a step
    # The posed images' loss weight. 0: the data only scores the stage (held-out PSNR, Chamfer
    # against its mesh) while a guidance shapes it: a teacher check of guided refinement.
    image_weight: float = 1.0
    sdf_lr: float = 0.05  # Adam step of the SDF values, in cells
    deform_lr: float = 0.02  # Adam step of the offsets' tanh arguments
    color_lr: float = 0.02
    mask_weight: float = 1.0  # the antialiased coverage against the images' alpha: the outline
    laplacian_weight: float = 0.1  # smoothness of the mesh (offsets in cells, squared)
    # What laplacian_weight weighs: "laplacian", each vertex's whole offset from its neighbours'
    # mean; "normal-laplacian", only the offset's part along the vertex normal (bumps). Marching
    # tetrahedra space vertices unevenly, and the whole offset's pull to even them out moves the
    # surface as well: against images it held the mesh away from where they put it. A guidance's
    # noisier pull needs the whole term (the teacher check in tests/test_guided_refine.py).
    # "auto": normal-laplacian when images are the only objective, else laplacian.
    smoothing: Literal["auto", "laplacian", "normal-laplacian"] = "auto"
    sdf_weight: float = 0.01  # nvdiffrec's SDF sign regulariser on the crossed edges
    # Colour differences move the surface too (through where each pixel reads the colour grid);
    # false: only the outline and the regularisers shape it.
    photometric_geometry: bool = True
    # A random background colour per view (images with alpha): the colour grid cannot paint the
    # background onto the surface, and the outline must come from coverage.
    random_background: bool = True
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # evaluation and previews

    def __post_init__(self) -> None:
        if self.views_per_step < 1:
            raise ValueError(f"views_per_step must be at least 1, got {self.views_per_step}")
        for name in ("image_weight", "sdf_lr", "deform_lr", "color_lr", "mask_weight", "laplacian_weight", "sdf_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if len(self.background) != 3:
            raise ValueError(f"background must be 3 numbers (RGB in 0..1), got {self.background}")


@dataclass
class GuidedBackground:
    # random: one random colour a view (the guidance cannot ask for a painted backdrop, and the
    # outline must come from coverage); solid: always `color`, which the previews use either way.
    kind: Literal["random", "solid"] = "random"
    color: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    def __post_init__(self) -> None:
        if len(self.color) != 3 or not all(0 <= c <= 1 for c in self.color):
            raise ValueError(f"color must be 3 numbers in 0..1 (RGB), got {self.color}")


@dataclass
class GuidedSettings:
    """How the guided objective draws its views. ``cameras.distance`` is in units of half the
    earlier field's box, as text-to-3d's: copy the earlier stage's section."""

    view_prompts: ViewPrompts = field(default_factory=ViewPrompts)
    cameras: CameraSampling = field(default_factory=lambda: CameraSampling(sizes=[128]))
    shading: Shading = field(default_factory=lambda: Shading(albedo_only_steps=0))
    background: GuidedBackground = field(default_factory=GuidedBackground)
    # image-to-3D's reference view (reference.image or reference.from_stage): the guidance is
    # conditioned on it, and its colour and mask are fitted at its camera each step.
    reference: ReferenceSettings | None = None
    # The reference view's colour and mask losses (mean squared errors) against the guidance's
    # (times its own weight): image-to-3d's losses.rgb and losses.mask.
    reference_rgb: float = 1.0
    reference_mask: float = 1.0

    def __post_init__(self) -> None:
        if self.reference_rgb < 0 or self.reference_mask < 0:
            raise ValueError("reference_rgb and reference_mask must be 0 or more")


@dataclass
class MeshRefineConfig:
    # Posed images to fit (reconstruction); null when a guidance is the objective.
    data: Choice | None = choice("dataset", "nerf-synthetic")
    # A guidance (stable-diffusion, zero123, clip, field-teacher, ...) scoring random views: the
    # objective of text- and image-to-3D. With data as well, both losses are added.
    guidance: Choice | None = choice("guidance", None)
    guided: GuidedSettings = field(default_factory=GuidedSettings)
    # What a text guidance is asked for (view suffixes added as guided.view_prompts says). A
    # recipe's top-level prompt reaches this stage and the text-to-3d stage before it alike.
    prompt: str = ""
    tets: TetSettings = field(default_factory=TetSettings)
    color_resolution: int = 128  # colour grid vertices along each side of the box
    # Gaussian blur (its sigma, in cells) of the start SDF: a reconstructed density's surface
    # carries bumps where its colour changes, finer than the grid and not in the object.
    smooth_start: float = 0.75
    # The lattice the start surface is drawn on (marching cubes of the earlier field, as its export
    # draws it); the tetrahedra's SDF values are the distances to it. None: export.resolution.
    start_resolution: int | None = None
    # Before training, the colour grid is fitted to the training images on the start mesh for
    # this many steps (all views at once): the images' colours, not the field's, from step 0.
    color_fit_steps: int = 50
    train: RefineTrain = field(default_factory=RefineTrain)
    # A finished run (its folder, a stage's folder or a checkpoint) to start from instead of an
    # earlier stage of this recipe (init_from): refine any reconstruction after the fact.
    source: Path | None = None
    # The earlier density field's surface level; None: the level its stage exported at (its
    # metrics.json), else the level that draws this data's silhouettes.
    level: float | None = None
    # Each training and held-out view is rasterised this many times finer along each side and
    # filtered down by pixel_filter, as the images were made (Blender: Blackman-Harris 1.5 px):
    # one sample a pixel compares sharp, aliased texture and outlines with filtered ones.
    supersample: int = 1
    pixel_filter: str = "box"
    pixel_filter_width: float = 1.0
    # What the filter averages: "linear" light (Blender's Cycles, a camera's sensor, the shipped
    # data sets: an edge between two colours is brighter than the mean of their sRGB numbers)
    # or "srgb" numbers (images filtered after encoding, as some renderers and resizers do).
    filter_space: Literal["linear", "srgb"] = "linear"
    turntable_elevation: float = 25.0  # degrees; preview.elevation overrides it
    eval_views: int = 8  # held-out views for the quick evaluations during training

    def __post_init__(self) -> None:
        if self.smooth_start < 0 or self.color_fit_steps < 0:
            raise ValueError(f"smooth_start and color_fit_steps must be 0 or more, got {self.smooth_start}, "
                             f"{self.color_fit_steps}")
        if not 2 <= self.color_resolution <= 512:
            raise ValueError(f"color_resolution must be 2..512, got {self.color_resolution}")
        if self.start_resolution is not None and not 16 <= self.start_resolution <= 1024:
            raise ValueError(f"start_resolution must be 16..1024 lattice points (or null), got {self.start_resolution}")
        if not 1 <= self.supersample <= 4:
            raise ValueError(f"supersample must be 1..4 samples a pixel side, got {self.supersample}")
        PixelFilter(self.pixel_filter, self.pixel_filter_width)  # its own checks name the bad value
        if self.level is not None and not self.level > 0:
            raise ValueError(f"level must be positive, got {self.level}")


class ColorGrid(nn.Module):
    """RGB on a dense voxel grid over a box, read trilinearly (eight-corner ``F.embedding_bag``)."""

    def __init__(self, aabb: torch.Tensor, resolution: int):
        super().__init__()
        self.register_buffer("aabb", aabb.clone().float())
        self.resolution = resolution
        self.table = nn.Parameter(torch.full((resolution ** 3, 3), 0.5, device=aabb.device))
        r = resolution
        self.register_buffer("offsets", torch.tensor([(a * r + b) * r + c for a in (0, 1) for b in (0, 1)
                                                      for c in (0, 1)], device=aabb.device), persistent=False)

    def points(self) -> torch.Tensor:
        axes = [torch.linspace(float(self.aabb[i]), float(self.aabb[i + 3]), self.resolution,
                               device=self.aabb.device) for i in range(3)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    def corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The eight table rows around each point [N, 8] and their trilinear weights [N, 8]."""
        r = self.resolution
        g = ((x - self.aabb[:3]) / (self.aabb[3:] - self.aabb[:3])).clamp(0, 1) * (r - 1)
        i0 = g.detach().floor().clamp(max=r - 2)
        f = g - i0
        i0 = i0.long()
        idx = ((i0[:, 0] * r + i0[:, 1]) * r + i0[:, 2])[:, None] + self.offsets[None]
        wx, wy, wz = (torch.stack([1 - f[:, k], f[:, k]], dim=1) for k in range(3))
        return idx, (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(-1, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.corners(x)
        return F.embedding_bag(idx, self.table, per_sample_weights=w, mode="sum").clamp(0, 1)

    @torch.no_grad()
    def fit(self, points: torch.Tensor, colors: torch.Tensor, iterations: int, lr: float = 0.05) -> None:
        """Fit the table to colours seen at surface points: a trilinear splat (each vertex the
        weighted mean of the points around it; vertices no point reaches keep their value), then
        Adam on the squared error over all points at once."""
        idx, w = self.corners(points)
        total = torch.zeros(len(self.table), device=points.device).index_add_(0, idx.reshape(-1), w.reshape(-1))
        summed = torch.zeros_like(self.table).index_add_(0, idx.reshape(-1), (w[..., None] * colors[:, None]).reshape(-1, 3))
        seen = total > 1e-3
        self.table[seen] = summed[seen] / total[seen, None]
        optimizer = torch.optim.Adam([self.table], lr=lr)
        for _ in range(iterations):
            with torch.enable_grad():
                loss = ((F.embedding_bag(idx, self.table, per_sample_weights=w, mode="sum") - colors) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()


class RefinedSurface(nn.Module):
    """The stage's field: a band of deformable tetrahedra with SDF values, and a colour grid."""

    def __init__(self, base: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor, frozen: torch.Tensor,
                 cell: float, max_deform: float, colors: ColorGrid):
        super().__init__()
        self.cell, self.max_deform = cell, max_deform
        self.register_buffer("base", base)
        self.register_buffer("tets", tets)
        self.register_buffer("frozen", frozen)  # the band's outer vertices keep their SDF: the surface stays inside it
        self.register_buffer("sdf0", sdf.clone())
        self.sdf = nn.Parameter(sdf.clone())
        self.deform = nn.Parameter(torch.zeros_like(base))
        self.colors = colors
        self.register_buffer("aabb", colors.aabb.clone())

    def positions(self) -> torch.Tensor:
        return self.base + self.max_deform * self.cell * torch.tanh(self.deform)

    def signed(self) -> torch.Tensor:
        return torch.where(self.frozen, self.sdf0, self.sdf)

    def extract(self) -> TetMesh:
        if getattr(self, "_edges", None) is None or self._edges.of_tet.shape[0] != len(self.tets):
            self._edges = tet_edges(self.tets, len(self.base))
        return marching_tets(self.positions(), self.signed(), self.tets, self._edges)

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        return self.colors(x)

    def plain_state(self) -> dict:
        return {name: t for name, t in self.state_dict().items()}

    def load_plain_state(self, state: dict) -> None:
        """Load a saved state whose band may hold a different number of vertices than this one's."""
        for name, value in state.items():
            module, _, leaf = name.rpartition(".")
            owner = self.get_submodule(module) if module else self
            value = value.to(self.base.device)
            if isinstance(getattr(owner, leaf), nn.Parameter):
                setattr(owner, leaf, nn.Parameter(value))
            else:
                setattr(owner, leaf, value)
        self._edges = None


class RasterRenderer:
    """What the core's end of stage reads of a renderer: which rasteriser drew the views."""

    def __init__(self, device: torch.device):
        self.path = f"raster-{raster_backend(device)}"


class MeshRefine:
    def __init__(self, config: MeshRefineConfig, run):
        self.config, self.run = config, run
        if not run.stage.init_from and config.source is None:
            raise ConfigError(f"{run.recipe.source}: loop 'mesh-refine' refines an earlier stage's surface: "
                              "set init_from to that stage's name (or source to a finished run)")
        if config.guidance is None and (config.data is None or config.train.image_weight == 0):
            raise ConfigError(f"{run.recipe.source}: loop 'mesh-refine' needs an objective: data (posed images) "
                              "with train.image_weight above 0, or guidance (text- or image-to-3D), or both")
        if config.guidance is not None and config.guided.reference is None and not config.prompt.strip():
            raise ConfigError(f"{run.recipe.source}: prompt is missing: add prompt=\"a hamburger\" on the command "
                              "line or a prompt: key to the recipe (a guided mesh-refine asks its guidance for it)")
        if config.guided.reference is not None and config.guidance is None:
            raise ConfigError(f"{run.recipe.source}: guided.reference is image-to-3D's reference view: it needs "
                              "a guidance (zero123, ...)")
        device = self.device = run.device
        self.data = config.data.build() if config.data is not None else None
        self.fit_images = self.data is not None and config.train.image_weight > 0
        if self.data is not None:
            self.train_views = self.data.train.cameras.to(device)
            self.images = self.data.train.images.to(device)
            self.random_background = config.train.random_background and self.data.has_alpha
        self.background = torch.tensor(config.train.background, device=device)
        self.generator = torch.Generator(device=device).manual_seed(run.seed)
        # The guided views' draws (cameras, shading, the guidance's timesteps and noise) come from a
        # CPU generator, as text-to-3d's: reproducible on any device, and checkpointed.
        self.guide_generator = torch.Generator().manual_seed(run.seed + 1)
        self.guidance = config.guidance.build(device=device) if config.guidance is not None else None
        self.reference = self.load_reference(run) if config.guided.reference is not None else None
        if run.stage.init_from:
            source, self.source_metrics, self.source_name = (run.field_of(run.stage.init_from), run.earlier_stage_path(
                run.stage.init_from, "metrics.json"), f"stage {run.stage.init_from!r}")
        else:
            trained = load_trained_field(config.source, device)
            source, self.source_metrics = trained.field, trained.checkpoint.parent.parent / "metrics.json"
            self.source_name = str(config.source)
        self.model, self.start_metrics = self.build_model(source)
        box = self.model.aabb
        self.center, self.half_size = (box[:3] + box[3:]) / 2, float((box[3:] - box[:3]).max()) / 2
        self.new_optimizer()
        self._eval_mesh: TetMesh | None = None
        run.log(f"mesh-refine: {len(self.model.tets)} tetrahedra around the surface of {self.source_name}; "
                f"rasteriser: {raster_backend(device)}")

    # --- the start ---------------------------------------------------------------------

    def source_level(self, source) -> float | None:
        if isinstance(source, SurfaceField):
            return None
        if self.config.level is not None:
            return self.config.level
        saved = self.source_metrics
        if saved.is_file() and "export_level" in json.loads(saved.read_text()):
            return float(json.loads(saved.read_text())["export_level"])
        if self.data is None:
            raise ConfigError(f"{self.run.recipe.source}: mesh-refine: {self.source_name} saved no export level and "
                              "there are no images to choose one by: set level")
        return self.level_from_data(source)

    @torch.no_grad()
    def level_from_data(self, source, rays: int = 32768) -> float:
        """The density level that draws this data's silhouettes (as nerf-reconstruct chooses it)."""
        pixels = self.images.reshape(-1, 4)
        pick = torch.randint(len(pixels), (min(rays, len(pixels)),), device=pixels.device,
                             generator=torch.Generator(device=pixels.device).manual_seed(0))
        h, w = self.images.shape[1:3]
        origins, dirs = self.train_views.pixel_rays(pick // (h * w), pick % (h * w))
        level = level_from_silhouettes(VolumeRenderer(source.aabb, RenderSettings()), source, origins, dirs,
                                       pixels[pick, 3] > 0.5)
        if level is None:
            raise Gen3DError("mesh-refine: cannot choose the earlier field's surface level from these views; set level")
        return level

    @torch.no_grad()
    def build_model(self, source) -> tuple[RefinedSurface, dict]:
        tets, export = self.config.tets, self.run.stage.export
        level = self.source_level(source)
        surface = surface_of(source, level, export.fill_fraction)
        box = source.aabb.float()
        points, cell = lattice(box, tets.resolution)
        values = torch.cat([surface.surface(p) for p in points.split(1 << 18)])
        outside = ((points < box[:3]) | (points > box[3:])).any(dim=1)
        values[outside] = values.max()  # beyond the field's box is empty, not the box's border repeated
        r = tets.resolution + 1
        volume = values.reshape(r, r, r).cpu().numpy()
        if export.fill_fraction > 0:  # no inner shells: the same interior filling as the export's
            volume = fill_interior(volume, getattr(surface, "empty_above", 0.0), getattr(surface, "inside_value", None),
                                   export.fill_band)
        inside = drop_small_pieces(volume < 0, export.min_component)
        volume = np.where(volume < 0, np.where(inside, volume, -volume), volume)  # dropped pieces turn outside
        if not inside.any() or inside.all():
            raise Gen3DError(f"mesh-refine: the surface of {self.source_name} does not cross its level inside "
                             "its box; nothing to refine")
        band = ndimage.binary_dilation(crossed_cells(inside), iterations=tets.band)
        grid = tet_grid(box, tets.resolution, torch.from_numpy(band).to(box.device))
        # The distances come from the surface the export would draw (marching cubes on a finer
        # lattice), not from marching the coarse values: a density is far from linear across its
        # surface, so the coarse values' own zero crossing sits up to a fraction of a cell off.
        fine = surface_mesh(source, replace(export, level=level,
                                            resolution=self.config.start_resolution or export.resolution))
        sdf = signed_distances(grid.positions, fine)
        if self.config.smooth_start > 0:
            sdf = smoothed(sdf, volume, grid.grid_index, self.config.smooth_start, (tets.band + 1) * cell)
        frozen = ~torch.from_numpy(inner_vertices(band).reshape(-1)).to(box.device)[grid.grid_index]
        colors = ColorGrid(box, self.config.color_resolution)
        colors.table.copy_(source_colors(source, surface, colors.points()))
        model = RefinedSurface(grid.positions, grid.tets, sdf, frozen, cell, tets.max_deform, colors)
        start = model.extract()  # what the first step draws
        if self.config.color_fit_steps > 0 and self.fit_images:
            colors.fit(*self.seen_colors(start), self.config.color_fit_steps)
        metrics = {"start_faces": len(start.faces)}
        if self.data is not None and self.data.ground_truth_mesh is not None:
            start_mesh = trimesh.Trimesh(start.verts.cpu().numpy(), start.faces.cpu().numpy(), process=False)
            metrics["chamfer_start"] = round(chamfer(start_mesh, self.data.ground_truth_mesh), 5)
        return model, metrics

    @torch.no_grad()
    def seen_colors(self, mesh: TetMesh, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Surface points of ``mesh`` under every training pixel its rasterisation covers where the
        image is the object's (alpha over 0.5), and those pixels' colours."""
        points, colors = [], []
        for start in range(0, len(self.train_views), chunk):
            pick = torch.arange(start, min(start + chunk, len(self.train_views)), device=self.images.device)
            cameras = self.train_views[pick]
            clip = project(mesh.verts, clip_matrices(cameras))
            rast = rasterize(clip, mesh.faces, (cameras.height, cameras.width))
            use = (rast[..., 3] > 0) & (self.images[pick][..., 3] > 0.5)
            points.append(interpolate(mesh.verts, rast, mesh.faces)[use])
            colors.append(self.images[pick][..., :3][use])
        return torch.cat(points), torch.cat(colors)

    def new_optimizer(self) -> None:
        t = self.config.train
        self.optimizer = torch.optim.Adam([
            {"params": [self.model.sdf], "lr": t.sdf_lr * self.model.cell},
            {"params": [self.model.deform], "lr": t.deform_lr},
            {"params": [self.model.colors.table], "lr": t.color_lr}], betas=(0.9, 0.99))

    # --- training ----------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        # On a CPU with several threads, the accumulating index_put/index_add in the rasteriser's
        # and colour grid's backward sum in whatever order the threads finish: a resumed run would
        # then drift from a straight one. torch's deterministic variants sort first instead.
        with deterministic_on_cpu(self.device):
            return self._step(step)

    def _step(self, step: int) -> dict[str, float]:
        t = self.config.train
        self._eval_mesh = None
        mesh = self.model.extract()
        smooth = self.smoothness(mesh)
        sign = sdf_sign_loss(self.model.signed(), mesh.edges, self.model.cell)
        loss = t.laplacian_weight * smooth + t.sdf_weight * sign
        metrics = {"faces": float(len(mesh.faces))}
        if self.fit_images:
            image_loss, image_metrics = self.image_loss(mesh)
            loss, metrics = loss + t.image_weight * image_loss, {**metrics, **image_metrics}
        if self.guidance is not None:
            guided_loss, guided_metrics = self.guided_loss(mesh, step)
            loss, metrics = loss + guided_loss, {**metrics, **guided_metrics}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), **metrics}

    def smoothness(self, mesh: TetMesh) -> torch.Tensor:
        kind = self.config.train.smoothing
        if kind == "auto":
            kind = "laplacian" if self.guidance is not None else "normal-laplacian"
        offsets = normal_laplacian_loss if kind == "normal-laplacian" else laplacian_loss
        return offsets(mesh.verts, mesh.faces) / self.model.cell ** 2

    def image_loss(self, mesh: TetMesh) -> tuple[torch.Tensor, dict[str, float]]:
        """A few training views: RGB on a random background, and the coverage against the alpha."""
        t = self.config.train
        pick = torch.randint(len(self.train_views), (t.views_per_step,), generator=self.generator,
                             device=self.device)
        cameras = self.train_views[pick]
        if self.random_background:
            background = torch.rand(len(pick), 3, generator=self.generator, device=self.device)
        else:
            background = self.background.expand(len(pick), 3)
        image = self.draw_filtered(mesh, cameras, background)
        target = self.images[pick]
        mse, mask = self.fit_losses(image, target, background)
        return mse + t.mask_weight * mask, {"psnr": -10 * math.log10(max(mse.item(), 1e-10)), "mask": mask.item()}

    @staticmethod
    def fit_losses(image: torch.Tensor, target: torch.Tensor, background: torch.Tensor):
        """Colour MSE of ``image`` [B,H,W,4] against straight-alpha ``target`` composited on
        ``background`` [B,3], and the coverage's MSE against the alpha."""
        alpha = target[..., 3:]
        rgb = target[..., :3] * alpha + background[:, None, None] * (1 - alpha)
        return ((image[..., :3] - rgb) ** 2).mean(), ((image[..., 3:] - alpha) ** 2).mean()

    def guided_loss(self, mesh: TetMesh, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Random views around the object, shaded, scored by the guidance (plus the reference
        view's fit, for image-to-3D)."""
        g = self.config.guided
        views = self.guided_views(step)
        cameras = views.cameras.to(self.device)
        n = len(cameras)
        if g.background.kind == "random":
            background = torch.rand(n, 3, generator=self.guide_generator)
        else:
            background = torch.tensor(g.background.color).expand(n, 3)
        mode = self.shading_mode(step)
        light = light_near(cameras.c2w[:, :3, 3].cpu() - self.center.cpu(), g.shading.light_jitter,
                           self.guide_generator).to(self.device)
        image = self.draw(mesh, cameras, background.to(self.device), shading=(mode, light, g.shading.ambient))
        images = image[..., :3].permute(0, 3, 1, 2)
        prompts = view_prompts(self.config.prompt, views.azimuth, views.elevation, g.view_prompts)
        angles = ViewAngles(views.elevation, views.azimuth, views.distance)
        reference = self.reference[0] if self.reference is not None else None
        out = self.guidance(GuidanceInput(images, prompts, views.cameras, angles, step, self.run.steps,
                                          reference=reference, generator=self.guide_generator,
                                          background=background))
        loss = out.loss
        metrics = {"guided_loss": out.loss.item(), **out.metrics}
        if self.reference is not None:
            view, target = self.reference
            ref_background = torch.tensor(g.background.color, device=self.device)[None]
            ref_image = self.draw(mesh, view.camera.to(self.device), ref_background)
            rgb, mask = self.fit_losses(ref_image, target[None], ref_background)
            loss = loss + g.reference_rgb * rgb + g.reference_mask * mask
            metrics.update(ref_rgb=rgb.item(), ref_mask=mask.item())
        return loss, metrics

    def guided_views(self, step: int):
        c, g = self.config.guided.cameras, self.config.guided
        size = c.size_at_step(step)
        if g.reference is not None:  # as image-to-3d: the reference's distance and field of view
            r = g.reference
            return random_views(c.batch, size, tuple(c.elevation), tuple(c.azimuth), (r.distance, r.distance),
                                (r.fov, r.fov), self.guide_generator)
        half = self.half_size
        return random_views(c.batch, size, tuple(c.elevation), tuple(c.azimuth),
                            (c.distance[0] * half, c.distance[1] * half), tuple(c.fov), self.guide_generator,
                            center=tuple(self.center.tolist()))

    def shading_mode(self, step: int) -> str:
        s = self.config.guided.shading
        if step < s.albedo_only_steps:
            return "albedo"
        u = float(torch.rand(1, generator=self.guide_generator))
        if u < s.albedo:
            return "albedo"
        return "textureless" if u < s.albedo + s.textureless else "lambertian"

    def load_reference(self, run) -> tuple[ReferenceView, torch.Tensor]:
        """image-to-3D's reference view and its cut-out at the reference size [H, W, 4]."""
        ref = self.config.guided.reference
        if ref.image is not None:
            path = ref.image
        elif ref.from_stage is not None:
            path = run.earlier_stage_path(ref.from_stage, "rgba.png")
        else:
            raise ConfigError(f"{run.recipe.source}: guided.reference needs image (a cut-out) or from_stage "
                              "(a preprocess stage)")
        cutout = read_cutout(path)
        camera = camera_at(ref.elevation, ref.azimuth, ref.distance, ref.fov, ref.size)
        target = resize_cutout(cutout, ref.size).permute(1, 2, 0).to(self.device)
        return ReferenceView(cutout, camera, ViewAngles.of(camera)), target

    def draw(self, mesh: TetMesh, cameras, background: torch.Tensor,
             shading: tuple[str, torch.Tensor, float] | None = None) -> torch.Tensor:
        """[B, H, W, 4]: the mesh's colour over ``background`` [B, 3] and its coverage, antialiased.
        ``shading``: (mode, a unit light direction a view [B, 3], ambient share), text-to-3d's
        modes: albedo, lambertian (albedo times the light), textureless (white times the light)."""
        h, w = cameras.height, cameras.width
        clip = project(mesh.verts, clip_matrices(cameras))
        rast = rasterize(clip, mesh.faces, (h, w))
        covered = rast[..., 3] > 0
        points = interpolate(mesh.verts, rast, mesh.faces)[covered]
        if not self.config.train.photometric_geometry:
            points = points.detach()
        albedo = self.model.albedo(points)
        if shading is not None and shading[0] != "albedo":
            mode, light, ambient = shading
            normals = F.normalize(interpolate(vertex_normals(mesh.verts, mesh.faces), rast, mesh.faces)[covered], dim=-1)
            view = covered.nonzero()[:, 0]
            shade = ambient + (1 - ambient) * (normals * light[view]).sum(-1).clamp_min(0)
            albedo = (albedo if mode == "lambertian" else torch.ones_like(albedo)) * shade[:, None]
        color = torch.zeros(*covered.shape, 3, device=clip.device).index_put((covered,), albedo)
        image = torch.where(covered[..., None], color, background[:, None, None].expand_as(color))
        image = torch.cat([image, covered[..., None].float()], dim=-1)
        return antialias(image, rast, clip, mesh.faces, edge_neighbors(mesh.faces))

    def draw_filtered(self, mesh: TetMesh, cameras, background: torch.Tensor) -> torch.Tensor:
        """:meth:`draw` of posed views as their images were made: ``supersample`` times finer,
        weighed down to each pixel by the pixel filter."""
        c = self.config
        s = c.supersample
        if s == 1 and c.pixel_filter == "box" and c.pixel_filter_width == 1.0:
            return self.draw(mesh, cameras, background)
        pixel_filter = PixelFilter(c.pixel_filter, c.pixel_filter_width)
        rows = pixel_filter.matrix(cameras.height, s, background.device)
        cols = pixel_filter.matrix(cameras.width, s, background.device)
        if c.filter_space == "srgb":
            image = self.draw(mesh, cameras.finer(s), background)
            return torch.einsum("ik,bklc,jl->bijc", rows, image, cols)
        # Linear light, as straight-alpha images are made: the mesh's colour premultiplied by its
        # coverage and the coverage are filtered, the colour is then un-premultiplied and encoded,
        # and only the finished image goes over the background (as the data loader puts the
        # images over it).
        fine = self.draw(mesh, cameras.finer(s), torch.zeros_like(background))
        coverage = fine[..., 3:]
        color = fine[..., :3] / coverage.clamp_min(1e-6)  # drawn over black: colour x coverage
        premultiplied = torch.cat([srgb_to_linear(color.clamp(0, 1)) * coverage, coverage], dim=-1)
        filtered = torch.einsum("ik,bklc,jl->bijc", rows, premultiplied, cols)
        alpha = filtered[..., 3:].clamp(0, 1)
        color = linear_to_srgb((filtered[..., :3] / alpha.clamp_min(1e-6)).clamp(0, 1))
        return torch.cat([color * alpha + background[:, None, None] * (1 - alpha), alpha], dim=-1)

    # --- state -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"field": self.model.plain_state(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "guide_generator": self.guide_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_plain_state(state["field"])
        self.new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if "guide_generator" in state:  # checkpoints from before guided refinement have none
            self.guide_generator.set_state(state["guide_generator"])
        self._eval_mesh = None

    # --- evaluation and outputs --------------------------------------------------------

    @torch.no_grad()
    def render_view(self, cameras, index: int) -> np.ndarray:
        if self._eval_mesh is None:
            self._eval_mesh = self.model.extract()
        image = self.draw_filtered(self._eval_mesh, cameras[index], self.background[None])
        return image[0, ..., :3].clamp(0, 1).cpu().numpy()

    def evaluate(self) -> dict[str, float]:
        return quick_psnr(self.run, self.outputs(None), self.config.eval_views)

    @torch.no_grad()
    def finished_mesh(self, settings) -> trimesh.Trimesh:
        """The refined surface, cleaned up, decimated and coloured (and baked) for export."""
        mesh = self.model.extract()
        out = trimesh.Trimesh(mesh.verts.cpu().numpy(), mesh.faces.cpu().numpy(), process=False)
        out = keep_large_components(out, settings.min_component)
        device = self.model.aabb.device
        return finish_mesh(out, lambda points, normals: self.model.albedo(points.to(device)).cpu(), settings)

    def outputs(self, train) -> StageOutputs:
        self._eval_mesh = None
        metrics = dict(self.start_metrics)
        if train is not None:
            metrics["refined_faces"] = int(train.last_metrics.get("faces", 0))
        if self.guidance is not None and self.config.prompt:
            metrics["prompt"] = self.config.prompt
        held_out, truth = None, None
        if self.data is not None:
            test = self.data.test
            held_out = HeldOutViews(test.cameras, test.images, self.config.train.background) if len(test.names) else None
            truth = self.data.ground_truth_mesh
        return StageOutputs(field=self.model, renderer=RasterRenderer(self.device), render_view=self.render_view,
                            orbit=self.orbit(), held_out=held_out, ground_truth_mesh=truth, metrics=metrics,
                            mesh=self.finished_mesh)

    def orbit(self) -> Orbit:
        """Turntable cameras: around the training views' distance, else the guided views'."""
        if self.data is not None:
            views = self.data.train.cameras
            radius = float(views.c2w[:, :3, 3].norm(dim=-1).mean())
            center = tuple(((self.data.aabb[:3] + self.data.aabb[3:]) / 2).tolist())
            return Orbit(radius, fov_of(views), max(views.width, 64), self.config.turntable_elevation, center)
        c, ref = self.config.guided.cameras, self.config.guided.reference
        if ref is not None:
            radius, fov = ref.distance, ref.fov
        else:
            radius, fov = self.half_size * sum(c.distance) / 2, sum(c.fov) / 2
        return Orbit(radius, math.radians(fov), max(c.sizes[-1], 64), self.config.turntable_elevation,
                     tuple(self.center.tolist()))


def light_near(offsets: torch.Tensor, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """Unit directions towards a light near each camera (``offsets``: camera minus look-at point),
    jittered as DreamFusion samples its light."""
    light = F.normalize(offsets, dim=-1) + jitter * torch.randn(offsets.shape, generator=generator)
    return F.normalize(light, dim=-1)


# --- the start surface ---------------------------------------------------------------------


def crossed_cells(inside: np.ndarray) -> np.ndarray:
    """[r, r, r] cells of an (r+1)^3 lattice whose corners are not all on one side."""
    corners = [inside[a:a + inside.shape[0] - 1, b:b + inside.shape[1] - 1, c:c + inside.shape[2] - 1]
               for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    return np.logical_or.reduce(corners) & ~np.logical_and.reduce(corners)


def inner_vertices(cells: np.ndarray) -> np.ndarray:
    """[(r+1)^3] lattice vertices all of whose eight cells are marked."""
    padded = np.pad(cells, 1)
    r = cells.shape[0] + 1
    around = [padded[a:a + r, b:b + r, c:c + r] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    return np.logical_and.reduce(around)


def drop_small_pieces(inside: np.ndarray, min_fraction: float) -> np.ndarray:
    """``inside`` without its connected pieces smaller than ``min_fraction`` of the largest
    (floaters), as the export drops small mesh components."""
    labels, count = ndimage.label(inside)
    if count <= 1:
        return inside
    sizes = np.bincount(labels.ravel())[1:]
    keep = 1 + np.nonzero(sizes >= min_fraction * sizes.max())[0]
    return np.isin(labels, keep)


def smoothed(sdf: torch.Tensor, volume: np.ndarray, index: torch.Tensor, sigma: float, far: float) -> torch.Tensor:
    """``sdf`` at the band's vertices blurred over the lattice (cells beyond the band at +-``far``
    by the side ``volume`` puts them on)."""
    full = np.where(volume < 0, -far, far).astype(np.float32).reshape(-1)
    flat_index = index.cpu().numpy()
    full[flat_index] = sdf.cpu().numpy()
    blurred = ndimage.gaussian_filter(full.reshape(volume.shape), sigma).reshape(-1)
    return torch.from_numpy(blurred[flat_index]).to(sdf.device)


def signed_distances(positions: torch.Tensor, surface: trimesh.Trimesh) -> torch.Tensor:
    """SDF values at the grid vertices: the exact distance to ``surface`` (the start mesh),
    negative where its winding number says inside. The coarse lattice's own values do not give
    the side: near the surface they disagree with the finer mesh, and the filled interior and
    dropped pieces are the mesh's, not theirs (signing by them cost 0.001 of Chamfer on the toy)."""
    import igl

    points = positions.detach().cpu().double().numpy()
    distance = surface_distances(points, surface)
    winding = igl.fast_winding_number(np.asarray(surface.vertices, dtype=np.float64),
                                      np.asarray(surface.faces, dtype=np.int64), points)
    signed = np.where(winding > 0.5, -1.0, 1.0) * np.maximum(distance, 1e-6)
    return torch.from_numpy(signed).float().to(positions.device)


@torch.no_grad()
def source_colors(source, surface, points: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """The earlier field's colour at ``points``: its albedo, else its colour looking along the
    inward normal of its surface (finite differences of the surface function)."""
    out = []
    for p in points.split(1 << 17):
        if hasattr(source, "albedo"):
            out.append(source.albedo(p))
            continue
        grad = torch.stack([surface.surface(p + eps * e) - surface.surface(p - eps * e)
                            for e in torch.eye(3, device=p.device)], dim=1)
        out.append(source(p, -F.normalize(grad, dim=1))[1])
    return torch.cat(out).clamp(0, 1)


def build(config: MeshRefineConfig, *, run) -> MeshRefine:
    return MeshRefine(config, run)


@hookimpl
def gen3d_loops():
    return [Component("mesh-refine", build, MeshRefineConfig,
                      "refine an earlier stage's surface as a mesh (DMTet) against posed images; "
                      "rasterised held-out PSNR; mesh export")]


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device):
    """torch's deterministic algorithms for the duration, on the CPU only (on CUDA some ops have
    none, and nvdiffrast's own kernels are what they are)."""
    if torch.device(device).type != "cpu" or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)

