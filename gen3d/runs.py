"""Trained fields from run folders: rebuild what ``gen3d run ... --out DIR`` trained, to render it.

A run folder holds ``recipe.yaml`` (the resolved recipe) and ``checkpoints/last.safetensors``
(a multi-stage run: ``stages/NAME/checkpoints/last.safetensors`` per stage). :func:`load_trained_field` builds the representation the recipe names, loads the field's state
(``state["loop"]["field"]``; a field whose box a loop tightened restores that box from its state)
and the renderer's occupancy (``state["loop"]["renderer"]``), and gives them back ready to render:
a teacher for distillation (``field-teacher`` guidance), a student to evaluate, any run to
inspect. Nothing else of the loop that trained it is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import fields
from .cameras import Cameras
from .config import Choice
from .errors import ConfigError, Gen3DError
from .io import load_checkpoint
from .plugins import get_registry
from .recipe import Recipe, Stage, load_recipe
from .render import RenderSettings, VolumeRenderer
from .trainer import CHECKPOINT


@dataclass
class TrainedField:
    """A field rebuilt from a run, its renderer (with the saved occupancy) and the run's recipe."""

    field: torch.nn.Module
    renderer: VolumeRenderer
    recipe: Recipe
    stage: Stage  # the recipe's stage that trained it
    checkpoint: Path
    step: int  # the training step the checkpoint was saved at

    @torch.no_grad()
    def render_images(self, cameras: Cameras, background, offsets: int = 1) -> torch.Tensor:
        """[N, 3, H, W] renderings, one ray through each pixel centre, on a solid ``background``
        (3 numbers in 0..1, or [N, 3]: one colour a view); ``offsets`` > 1 averages renderings at
        shifted samples (``RenderSettings.eval_offsets``)."""
        device = self.renderer.aabb.device
        cameras = cameras.to(device)
        bg = torch.as_tensor(background, dtype=torch.float32).to(device)
        bg = bg.expand(len(cameras), 3) if bg.dim() == 1 else bg
        h, w = cameras.height, cameras.width
        images = []
        for i in range(len(cameras)):
            origins, dirs = cameras.image_rays(i)
            out = self.renderer.render_chunked(self.field, origins, dirs, bg[i], offsets=offsets)
            images.append(out.rgb.clamp(0, 1).view(h, w, 3).permute(2, 0, 1))
        return torch.stack(images)


def locate(path: Path) -> tuple[Path, str | None, Path | None]:
    """The run folder that ``path`` names, the stage it points into (None: not said) and the
    checkpoint file when ``path`` is one. ``path``: a run folder, a stage's folder
    (``RUN/stages/NAME``), or a checkpoint file inside either."""
    path = Path(path).expanduser()
    if not path.exists():
        raise Gen3DError(f"no run folder or checkpoint at {path} (train one first, e.g. "
                         f"gen3d run recipes/nerf-reconstruct.yaml --out {path})")
    checkpoint = path if path.is_file() else None
    folder = path.parent if path.is_file() else path
    if checkpoint is not None and folder.name == "checkpoints":
        folder = folder.parent
    if folder.parent.name == "stages" and (folder.parent.parent / "recipe.yaml").is_file():
        return folder.parent.parent, folder.name, checkpoint
    return folder, None, checkpoint


def load_trained_field(path: Path | str, device: torch.device | str = "cpu", stage: str | None = None) -> TrainedField:
    """Rebuild the field a run trained, from its run folder or a checkpoint file inside it;
    of a multi-stage run, ``stage``'s (default: the stage ``path`` points into, else the last)."""
    run_dir, pointed, checkpoint = locate(Path(path))
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise ConfigError(f"{run_dir}: no recipe.yaml, so not a gen3d run folder (gen3d run ... --out DIR writes one)")
    recipe = load_recipe(recipe_file, registry=get_registry())
    chosen = pick_stage(recipe, stage or pointed, recipe_file)
    if checkpoint is None:
        folder = run_dir / "stages" / chosen.settings.name if recipe.staged else run_dir
        checkpoint = folder / CHECKPOINT
    if not checkpoint.is_file():
        raise Gen3DError(f"{run_dir}: no checkpoint at {checkpoint} (the run saved none yet)")
    representation = getattr(chosen.loop, "representation", None)
    if not isinstance(representation, Choice):
        raise ConfigError(f"{recipe_file}: loop {chosen.settings.loop!r} names no representation: "
                          "it trains no field to load")
    state = load_checkpoint(checkpoint)
    loop_state = state.get("loop") if isinstance(state.get("loop"), dict) else {}
    field_state, renderer_state = loop_state.get("field"), loop_state.get("renderer") or {}
    if not isinstance(field_state, dict):
        raise Gen3DError(f"{checkpoint}: holds no field state (loop.field); not a checkpoint of a field-training run")

    device = torch.device(device)
    settings = getattr(chosen.loop, "render", None)
    settings = settings if isinstance(settings, RenderSettings) else RenderSettings()
    aabb = field_state.get("aabb")  # a field's box is part of its state (a buffer, or state_dict_plain's)
    if not torch.is_tensor(aabb):
        raise Gen3DError(f"{checkpoint}: the field's state holds no box (aabb), so it cannot be placed")
    aabb = aabb.float().to(device)
    step_size = renderer_state.get("step_size")
    if not isinstance(step_size, float):
        step_size = fallback_step_size(aabb, settings)
    field = fields.build(representation, aabb, step_size, ("radiance",), "a trained field's renderer")
    fields.load_state(field, {k: v.to(device) if torch.is_tensor(v) else v for k, v in field_state.items()})
    if isinstance(field, torch.nn.Module):
        field.eval().requires_grad_(False)
    renderer = VolumeRenderer(field.aabb, settings, step_size=step_size)
    if not load_occupancy(renderer, renderer_state):
        renderer.update_occupancy(field, 0)  # saved on another path (CPU grid vs nerfacc): recompute
    return TrainedField(field, renderer, recipe, chosen, checkpoint, int(state.get("step", 0)))


def pick_stage(recipe: Recipe, name: str | None, source: Path) -> Stage:
    if name is None:
        return recipe.stages[-1]
    for candidate in recipe.stages:
        if candidate.settings.name == name:
            return candidate
    raise ConfigError(f"{source}: no stage {name!r}; its stages: {', '.join(s.settings.name for s in recipe.stages)}")


def load_occupancy(renderer: VolumeRenderer, state: dict) -> bool:
    """Load a saved occupancy structure if it was written by the same render path and size."""
    if renderer.packed and "estimator" in state:
        renderer.load_state_dict(state)
        return True
    occupied = state.get("occupied")
    if not renderer.packed and torch.is_tensor(occupied) and occupied.shape == renderer.occupancy.occupied.shape:
        renderer.load_state_dict(state)
        return True
    return False


def fallback_step_size(aabb: torch.Tensor, settings: RenderSettings) -> float:
    """The marching step of a checkpoint written before renderers saved theirs: the field's box's
    diagonal over ``samples_per_diagonal``. A loop that shrank its box kept the step of the box it
    started in, so this one is a little shorter: the shipped toy's teacher renders within 52 dB
    of itself at its own step (0.08 dB apart against the held-out photos)."""
    return float((aabb[3:] - aabb[:3]).norm()) / settings.samples_per_diagonal
