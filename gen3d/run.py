"""What a loop sees of the run it is part of, and what the core asks of a loop.

A loop (kind ``loop``) is built as ``factory(config, run=run)``. A *training* loop
(:class:`TrainingLoop`) is stepped by the core, which owns the budget, progress, checkpoints,
resume, NaN and Ctrl-C handling; when it has trained, ``outputs()`` hands the core what it made
and the core writes the evaluation, exports and previews (gen3d.outputs). A stage that does not
train (preprocessing) is a :class:`StageLoop`: the core calls ``run_stage()`` once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from tqdm import tqdm

from .errors import ConfigError
from .io import inside
from .recipe import Recipe, StageSettings


@dataclass
class Run:
    """One stage of a run, as its loop sees it."""

    out_dir: Path  # this stage's folder: the run folder, or runs/X/stages/NAME in a multi-stage run
    recipe: Recipe
    stage: StageSettings  # this stage's settings: steps, max_seconds, export, preview, init_from ...
    device: torch.device
    hooks: Any  # the plugin manager's hook relay: run.hooks.gen3d_on_step(...)
    quiet: bool = False
    # Earlier stages' fields, by stage name (set by the core; ``init_from`` reads it).
    stage_fields: Callable[[str], Any] | None = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return self.recipe.settings.seed

    @property
    def steps(self) -> int:
        return self.stage.steps

    def path(self, relative: str) -> Path:
        """A path inside this stage's folder (never outside it)."""
        return inside(self.out_dir, relative)

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def earlier_stage_path(self, stage: str, relative: str) -> Path:
        """A file in an earlier stage's folder of this run (``RUN/stages/NAME/relative``), e.g. the
        cut-out a preprocessing stage wrote; a ConfigError names the stage when there is none."""
        names = [s.settings.name for s in self.recipe.stages]
        earlier = names[:names.index(self.stage.name)] if self.stage.name in names else []
        if not self.recipe.staged or stage not in earlier:
            raise ConfigError(f"{self.recipe.source}: stage {self.stage.name!r} reads from stage {stage!r}, "
                              f"which is not an earlier stage of this recipe (earlier: {', '.join(earlier) or 'none'})")
        return inside(self.out_dir.parent, f"{stage}/{relative}")

    def field_of(self, stage: str) -> Any:
        """The trained field of an earlier stage of this run."""
        if self.stage_fields is None:
            raise KeyError(stage)
        return self.stage_fields(stage)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    timeline: list[dict[str, float]] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class TrainingLoop(Protocol):
    def step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns its metrics, which must include ``loss``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where it is (tensors, numbers, nested dicts)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def evaluate(self) -> dict[str, float]:
        """Quick held-out metrics for the timeline (untimed); ``{}`` when there is nothing to score."""
        ...

    def outputs(self, train: TrainResult) -> Any:
        """A gen3d.outputs.StageOutputs: what the core evaluates, exports and previews."""
        ...


@runtime_checkable
class StageLoop(Protocol):
    def run_stage(self) -> dict[str, Any]:
        """Do the stage's work (writing its files through ``run.path``); returns its metrics."""
        ...
