"""Runs a recipe's loop: progress, wall-clock budget, checkpoints, resume, NaN and Ctrl-C handling.

Every loop plugin gets this for free. A loop object implements::

    step(step: int) -> dict[str, float]      # one optimisation step; must report "loss"
    state_dict() -> dict / load_state_dict(state)
    evaluate() -> dict[str, float]           # quick held-out metrics (untimed)
    finish(train: TrainResult) -> dict       # final evaluation, exports, previews -> metrics
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from .errors import Gen3DError, TrainingDiverged
from .io import inside, load_checkpoint, save_checkpoint, write_json, write_text
from .plugins import get_component, get_registry
from .recipe import Recipe


class Loop(Protocol):
    def step(self, step: int) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def evaluate(self) -> dict[str, float]: ...
    def finish(self, train: "TrainResult") -> dict[str, Any]: ...


class Interrupted(Gen3DError):
    """Ctrl-C: a checkpoint was saved; ``--resume`` continues."""


@dataclass
class Run:
    """What a loop knows about the run it is part of."""

    out_dir: Path
    recipe: Recipe
    device: torch.device
    quiet: bool = False

    def path(self, relative: str) -> Path:
        """A path inside the run folder (never outside it)."""
        return inside(self.out_dir, relative)

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    @property
    def hooks(self):
        return get_registry().pm.hook


@dataclass
class TrainResult:
    steps: int
    seconds: float
    timeline: list[dict[str, float]] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise Gen3DError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


CHECKPOINT = "checkpoints/last.safetensors"


def run_recipe(recipe: Recipe, out_dir: Path, resume: bool = False, device: str | None = None,
               quiet: bool = False) -> dict[str, Any]:
    """Build the loop, train it (resuming if asked), finish it; returns the final metrics."""
    settings = recipe.settings
    out_dir = Path(out_dir)
    checkpoint = inside(out_dir, CHECKPOINT)
    if resume and not checkpoint.is_file():
        raise Gen3DError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
    if not resume and checkpoint.is_file():
        raise Gen3DError(f"{out_dir} already holds a run; pass --resume to continue it or pick another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "recipe.yaml", recipe.to_yaml())

    torch.manual_seed(settings.seed)
    run = Run(out_dir=out_dir, recipe=recipe, device=pick_device(device or settings.device), quiet=quiet)
    component = get_component("loop", settings.loop)
    loop: Loop = component.factory(recipe.loop, run=run)

    result = train(run, loop, resume=resume)
    metrics = {"steps": result.steps, "train_seconds": round(result.seconds, 3),
               **loop.finish(result)}
    if result.timeline:
        metrics["timeline"] = result.timeline
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def train(run: Run, loop: Loop, resume: bool = False) -> TrainResult:
    settings = run.recipe.settings
    checkpoint = run.path(CHECKPOINT)
    start, elapsed, timeline = 0, 0.0, []
    if resume:
        state = load_checkpoint(checkpoint)
        loop.load_state_dict(state["loop"])
        start, elapsed, timeline = state["step"], state["seconds"], state["timeline"]
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and run.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), run.device)
        run.log(f"resumed from {checkpoint} at step {start} ({elapsed:.1f} s of training)")

    def save(step: int) -> None:
        rng = {"rng": torch.get_rng_state()}
        if run.device.type == "cuda":  # stratified sampling draws on the GPU's generator
            rng["cuda_rng"] = torch.cuda.get_rng_state(run.device)
        save_checkpoint(checkpoint, {"loop": loop.state_dict(), "step": step, "seconds": elapsed,
                                     "timeline": timeline, **rng})
        run.hooks.gen3d_on_checkpoint(run=run, step=step, path=checkpoint)

    marks = [m for m in sorted(settings.eval_at_seconds) if m > elapsed]
    bar = tqdm(total=settings.steps, initial=start, unit="step", dynamic_ncols=True, disable=run.quiet,
               mininterval=0.5 if sys.stderr.isatty() else 15.0, file=sys.stderr)
    step, metrics = start, {}
    try:
        while step < settings.steps:
            if settings.max_seconds is not None and elapsed >= settings.max_seconds:
                run.log(f"stopping at step {step}: max_seconds={settings.max_seconds} reached")
                break
            began = time.perf_counter()
            metrics = loop.step(step)
            loss = float(metrics["loss"])
            elapsed += time.perf_counter() - began
            if not math.isfinite(loss):
                kept = f"the last good checkpoint is {checkpoint}" if checkpoint.is_file() else "no checkpoint was written yet"
                raise TrainingDiverged(f"the loss became {loss} at step {step}; stopping. {kept} "
                                       f"(try a lower learning rate, then --resume)")
            step += 1
            run.hooks.gen3d_on_step(run=run, step=step, metrics=metrics)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            while marks and elapsed >= marks[0]:
                timeline.append({"seconds": marks.pop(0), "step": step, **loop.evaluate()})
                run.log(f"t={timeline[-1]['seconds']:g}s step {step}: {_fmt(timeline[-1])}")
            if step % settings.checkpoint_every == 0:
                save(step)
    except KeyboardInterrupt:
        save(step)
        bar.close()
        raise Interrupted(f"interrupted at step {step}; checkpoint saved to {checkpoint}. "
                          f"Continue with the same command and --resume") from None
    bar.close()
    save(step)
    return TrainResult(steps=step, seconds=elapsed, timeline=timeline, last_metrics=metrics)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("seconds", "step"))
