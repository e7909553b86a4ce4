"""Runs a recipe: its stages in order, each loop with progress, wall-clock budget, checkpoints,
resume, NaN and Ctrl-C handling, then the core's end of stage (gen3d.outputs).

Every loop gets this for free (the protocols are in gen3d.run). A one-stage run writes into the
run folder itself; a multi-stage run gives each stage ``stages/NAME/`` and copies the last
stage's exports and previews to the top. ``--resume`` skips finished stages (those with a
``metrics.json``) and continues the first unfinished one from its checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .errors import Gen3DError, TrainingDiverged, call_plugin
from .io import inside, load_checkpoint, save_checkpoint, write_json, write_text
from .outputs import finish_stage
from .recipe import Recipe, Stage
from .report import write_run_report
from .run import Run, StageLoop, TrainingLoop, TrainResult


class Interrupted(Gen3DError):
    """Ctrl-C: a checkpoint was saved; ``--resume`` continues."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise Gen3DError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


CHECKPOINT = "checkpoints/last.safetensors"
CURVE_POINTS = 256  # a stage's curves.json keeps 256 to 511 points, whatever its budget
# A staged run's top folder gets these of its last stage's files (mesh.png: the texture the OBJ's
# MTL names beside it).
FINAL_FILES = ("mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "mesh.ply", "turntable.gif", "test_views.png",
               "reference.png", "cutout.png")


def stage_dir(recipe: Recipe, out_dir: Path, stage: Stage) -> Path:
    return inside(out_dir, f"stages/{stage.settings.name}") if recipe.staged else out_dir


def run_recipe(recipe: Recipe, out_dir: Path, *, hooks, resume: bool = False, device: str | None = None,
               quiet: bool = False) -> dict[str, Any]:
    """Run every stage (resuming if asked); returns the last stage's metrics (with every stage's
    under ``stages`` for a multi-stage run). ``hooks`` is the plugin manager's hook relay."""
    out_dir = Path(out_dir)
    started = [s for s in recipe.stages if _started(stage_dir(recipe, out_dir, s))]
    if resume and not started:
        raise Gen3DError(f"--resume: no checkpoint at {inside(out_dir, CHECKPOINT) if not recipe.staged else out_dir / 'stages'}; "
                         "start without --resume")
    if not resume and started:
        raise Gen3DError(f"{out_dir} already holds a run; pass --resume to continue it or pick another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "recipe.yaml", recipe.to_yaml())
    device_ = pick_device(device or recipe.settings.device)
    fields_cache: dict[str, Any] = {}

    def field_of(name: str):
        if name not in fields_cache:  # a stage finished before --resume: rebuild it from its checkpoint
            earlier = recipe.stage(name)
            run = Run(stage_dir(recipe, out_dir, earlier), recipe, earlier.settings, device_, hooks, True, field_of)
            loop = call_plugin(earlier.component, "building it", earlier.component.factory, earlier.loop, run=run)
            state = load_checkpoint(run.path(CHECKPOINT))
            loop.load_state_dict(state["loop"])
            fields_cache[name] = loop.outputs(TrainResult(state["step"], state["seconds"])).field
        return fields_cache[name]

    all_metrics: dict[str, Any] = {}
    for stage in recipe.stages:
        folder = stage_dir(recipe, out_dir, stage)
        if recipe.staged and (folder / "metrics.json").is_file():
            continue  # finished before --resume; its field is rebuilt only if a later stage needs it
        torch.manual_seed(recipe.settings.seed)
        run = Run(folder, recipe, stage.settings, device_, hooks, quiet, field_of)
        if recipe.staged:
            run.log(f"stage {stage.settings.name} ({stage.settings.loop})")
        loop = call_plugin(stage.component, "building it", stage.component.factory, stage.loop, run=run)
        metrics, outputs = run_stage(run, stage, loop, resume=resume and _started(folder))
        all_metrics[stage.settings.name] = metrics
        if outputs is not None:
            fields_cache[stage.settings.name] = outputs.field
    final = recipe.stages[-1]
    if not recipe.staged:
        _report(out_dir)
        return all_metrics.get(final.settings.name, {})
    last = _read_json(stage_dir(recipe, out_dir, final) / "metrics.json")
    for name in FINAL_FILES:  # the last stage's files are the run's
        produced = stage_dir(recipe, out_dir, final) / name
        if produced.is_file():
            shutil.copyfile(produced, out_dir / f".{name}.tmp")
            (out_dir / f".{name}.tmp").replace(out_dir / name)
    summary = {**last, "stages": {s.settings.name: _read_json(stage_dir(recipe, out_dir, s) / "metrics.json")
                                  for s in recipe.stages}}
    write_json(out_dir / "metrics.json", summary)
    _report(out_dir)
    return summary


def _report(out_dir: Path) -> None:
    # The page is for looking at the run; the run's files are its result, so a page that cannot
    # be written costs a warning, never the run.
    try:
        write_run_report(out_dir)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"{out_dir / 'report.html'} was not written: {exc}", stacklevel=2)


def run_stage(run: Run, stage: Stage, loop: Any, resume: bool) -> tuple[dict[str, Any], Any]:
    """Train one stage's loop (or run a stage that does not train) and finish it: its metrics, and
    the StageOutputs of a training loop (None for a stage that does not train)."""
    if isinstance(loop, StageLoop) and not isinstance(loop, TrainingLoop):
        metrics = call_plugin(stage.component, "running its stage", loop.run_stage)
        write_json(run.out_dir / "metrics.json", metrics)
        return metrics, None
    if not isinstance(loop, TrainingLoop):
        raise Gen3DError(f"loop {stage.component.name!r} from plugin {stage.component.plugin or '?'} is neither a "
                         "training loop (step, state_dict, load_state_dict, evaluate, outputs) nor a stage (run_stage)")
    result = train(run, loop, resume=resume)
    outputs = call_plugin(stage.component, "handing over its outputs", loop.outputs, result)
    metrics = {"steps": result.steps, "train_seconds": round(result.seconds, 3),
               **finish_stage(run, outputs, stage.settings.export, stage.settings.preview)}
    if result.timeline:
        metrics["timeline"] = result.timeline
    write_json(run.out_dir / "metrics.json", metrics)
    return metrics, outputs


def _started(folder: Path) -> bool:
    return (folder / CHECKPOINT).is_file() or (folder / "metrics.json").is_file()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def train(run: Run, loop: TrainingLoop, resume: bool = False) -> TrainResult:
    settings = run.stage
    checkpoint = run.path(CHECKPOINT)
    start, elapsed, timeline, curve = 0, 0.0, [], Curve()
    if resume:
        state = load_checkpoint(checkpoint)
        loop.load_state_dict(state["loop"])
        start, elapsed, timeline = state["step"], state["seconds"], state["timeline"]
        curve = Curve(state.get("curve"))  # checkpoints from before curves were kept have none
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and run.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), run.device)
        run.log(f"resumed from {checkpoint} at step {start} ({elapsed:.1f} s of training)")

    def save(step: int) -> None:
        rng = {"rng": torch.get_rng_state()}
        if run.device.type == "cuda":  # stratified sampling draws on the GPU's generator
            rng["cuda_rng"] = torch.cuda.get_rng_state(run.device)
        save_checkpoint(checkpoint, {"loop": loop.state_dict(), "step": step, "seconds": elapsed,
                                     "timeline": timeline, "curve": curve.state(), **rng})
        run.hooks.gen3d_on_checkpoint(run=run, step=step, path=checkpoint)

    marks = [m for m in sorted(settings.eval_at_seconds) if m > elapsed]
    bar = tqdm(total=settings.steps, initial=start, unit="step", dynamic_ncols=True, disable=run.quiet,
               mininterval=0.5 if sys.stderr.isatty() else 15.0, file=sys.stderr)
    step, metrics = start, {}
    with StepBoundaryInterrupts(run) as interrupts:
        try:
            while step < settings.steps:
                if interrupts.requested():
                    raise KeyboardInterrupt
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
                curve.add(step, elapsed, metrics)
                run.hooks.gen3d_on_step(run=run, step=step, metrics=metrics)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
                while marks and elapsed >= marks[0]:
                    timeline.append({"seconds": marks.pop(0), "step": step, **loop.evaluate()})
                    run.log(f"t={timeline[-1]['seconds']:g}s step {step}: {_fmt(timeline[-1])}")
                if step % settings.checkpoint_every == 0:
                    save(step)
        except KeyboardInterrupt:
            interrupts.hold()  # no further Ctrl-C while the checkpoint is written
            save(step)
            bar.close()
            raise Interrupted(f"interrupted at step {step}; checkpoint saved to {checkpoint}. "
                              f"Continue with the same command and --resume") from None
    bar.close()
    curve.flush(step, elapsed)
    save(step)
    write_json(run.path("curves.json"), curve.state())
    return TrainResult(steps=step, seconds=elapsed, timeline=timeline, last_metrics=metrics)


class StepBoundaryInterrupts:
    """Ctrl-C during training stops at the end of the current step, so the checkpoint then saved
    holds whole steps and ``--resume`` continues exactly as if never stopped. A second Ctrl-C
    stops at once (the checkpoint then holds a partly done step: close to, not equal to, an
    uninterrupted run). Signals reach only the main thread, so elsewhere (a Ray worker's thread)
    Ctrl-C is left as it is."""

    def __init__(self, run: Run):
        self.run, self.asked, self.previous = run, False, None
        self.active = threading.current_thread() is threading.main_thread()

    def requested(self) -> bool:
        return self.asked

    def hold(self) -> None:
        """Ignore Ctrl-C from now on (while the last checkpoint is written; gen3d batch sends its
        SIGINT again after a few seconds to runs that have not stopped yet)."""
        if self.active:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_sigint(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        self.run.log("Ctrl-C: stopping after this step (Ctrl-C again to stop at once)")

    def __enter__(self) -> "StepBoundaryInterrupts":
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)



class Curve:
    """The training curves of a stage: the mean of each number a step reports over windows of
    ``every`` steps. When the points reach twice CURVE_POINTS, neighbours merge and the window
    doubles, so a long run's curve stays small and every point covers the same number of steps."""

    def __init__(self, state: dict | None = None):
        self.every = int(state["every"]) if state else 1
        self.points: list[dict[str, float]] = list(state["points"]) if state else []
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, step: int, seconds: float, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1
        if step % self.every == 0:
            self.flush(step, seconds)

    def flush(self, step: int, seconds: float) -> None:
        if not self.counts:
            return
        self.points.append({"step": step, "seconds": round(seconds, 3),
                            **{k: _sig(self.sums[k] / n) for k, n in self.counts.items()}})
        self.sums, self.counts = {}, {}
        if len(self.points) >= 2 * CURVE_POINTS:
            self.points = [{**a, **b, **{k: _sig((a[k] + b[k]) / 2) for k in a.keys() & b.keys()
                                         if k not in ("step", "seconds")}}
                           for a, b in zip(self.points[::2], self.points[1::2])]
            self.every *= 2

    def state(self) -> dict[str, Any]:
        return {"every": self.every, "points": self.points}


def _sig(x: float) -> float:
    return float(f"{x:.6g}")  # six significant digits: losses span decades


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("seconds", "step"))
