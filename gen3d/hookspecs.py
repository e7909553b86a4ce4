"""The hooks a gen3d plugin can implement.

Component hooks return a list (or any iterable) of :class:`gen3d.specs.Component`.
The hook name says the *kind* of component, so the core can list, validate and
reject duplicate names per kind. Lifecycle hooks let a plugin observe a run.

A plugin module is registered through the ``gen3d`` entry-point group::

    [project.entry-points.gen3d]
    my-plugin = "my_package.gen3d_plugin"

and implements any of these with ``@gen3d.hookimpl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import pluggy

if TYPE_CHECKING:
    from .specs import Component
    from .trainer import Run

hookspec = pluggy.HookspecMarker("gen3d")


# --- components -------------------------------------------------------------------


@hookspec
def gen3d_representations() -> Iterable["Component"]:
    """3D representations (radiance field, occupancy field, SDF) a recipe can optimise."""


@hookspec
def gen3d_guidance() -> Iterable["Component"]:
    """Guidance that scores rendered views (score distillation, CLIP, ...)."""


@hookspec
def gen3d_preprocessors() -> Iterable["Component"]:
    """Image preprocessing: detection, segmentation, depth."""


@hookspec
def gen3d_datasets() -> Iterable["Component"]:
    """Multi-view data set loaders."""


@hookspec
def gen3d_exporters() -> Iterable["Component"]:
    """Mesh exporters: a factory returns ``write(mesh, path)`` for one file format."""


@hookspec
def gen3d_loops() -> Iterable["Component"]:
    """Recipe loops: the optimisation a recipe's ``loop:`` key names."""


# --- lifecycle (observers; return values are ignored) -----------------------------


@hookspec
def gen3d_on_step(run: "Run", step: int, metrics: dict[str, float]) -> None:
    """Called after every optimisation step with the step's metrics."""


@hookspec
def gen3d_on_checkpoint(run: "Run", step: int, path: Any) -> None:
    """Called after a checkpoint was written (atomically) to ``path``."""


@hookspec
def gen3d_on_export(run: "Run", paths: list) -> None:
    """Called once the run's assets are written, with their paths."""
