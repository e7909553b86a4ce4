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

import argparse
from pathlib import Path
from typing import Callable, Iterable

import pluggy

from .run import Run
from .specs import Component

hookspec = pluggy.HookspecMarker("gen3d")
hookimpl = pluggy.HookimplMarker("gen3d")


# --- components -------------------------------------------------------------------
#
# Each returns an iterable of Component(name, factory, config, description, provides, needs).
# ``config`` is a dataclass of the component's settings: the core validates the recipe's section
# into an instance of it (its defaults where the recipe says nothing) and passes that instance
# to ``factory`` as its first argument; ``None`` for a component without settings.


@hookspec
def gen3d_representations() -> Iterable[Component]:
    """3D representations a recipe can optimise (radiance, occupancy, SDF fields).

    :return: Components whose ``factory(config, *, aabb, step_size)`` builds a ``torch.nn.Module``
        field. ``aabb`` is the [6] scene box tensor (on the run's device), ``step_size`` the
        renderer's marching step in world units (to scale initial densities). Declare the
        field's capabilities in ``provides`` (see :mod:`gen3d.fields`).
    """


@hookspec
def gen3d_guidance() -> Iterable[Component]:
    """Guidance that scores rendered views (score distillation, CLIP, view-conditioned models).

    :return: Components whose ``factory(config, *, device)`` returns a callable
        ``guidance(batch: GuidanceInput) -> GuidanceOutput``; ``device`` is the run's
        ``torch.device``. The loss's gradient with respect to ``batch.images`` is the guidance.
    """


@hookspec
def gen3d_preprocessors() -> Iterable[Component]:
    """Image preprocessing: detection, segmentation, depth.

    :return: Components whose ``factory(config, *, role)`` returns an object with
        ``detect(image, prompts) -> Detections`` (role ``detector``), ``segment(image, box,
        points) -> Segmentation`` (``segmenter``) or ``estimate_depth(image) -> DepthMap``
        (``depth``); images are HxWx3 uint8 RGB arrays. See :mod:`gen3d.preprocessing`.
    """


@hookspec
def gen3d_datasets() -> Iterable[Component]:
    """Multi-view data sets.

    :return: Components whose ``factory(config)`` returns an object with ``train`` and ``test``
        views (``cameras``, ``images`` [N,H,W,4] RGBA in 0..1, ``names``), ``aabb`` ([6] box),
        ``has_alpha`` and ``ground_truth_mesh`` (a path or None).
    """


@hookspec
def gen3d_exporters() -> Iterable[Component]:
    """Mesh exporters, one file format each (the component's name is the format).

    :return: Components whose ``factory(config)`` returns ``write(mesh, path)``: ``mesh`` is a
        ``trimesh.Trimesh`` with vertex colours in sRGB (convert with ``gen3d.encode_colors``
        where the format defines another space), Z up as gen3d's world unless the writer is
        marked ``@gen3d.up_axis("Y")``; ``path`` is the file to write (inside a scratch folder;
        files beside it, such as a material, are moved with it). Settings come from the
        recipe's ``export.options.<format>``. With ``export.colors: texture`` (the default) the
        mesh also carries a baked texture: ``gen3d.texture_of(mesh)`` returns a
        ``gen3d.MeshTexture`` (None without one, kept in ``mesh.metadata["gen3d_texture"]``)
        with ``uv`` [N, 2] float32, one per vertex, in 0..1, origin at the image's top-left
        corner and v down (glTF's convention; OBJ's v points up: write 1 - v), and ``image``
        [H, W, 3] uint8 sRGB, row 0 at the top. Its vertices are then split along the atlas'
        seams (exact copies of a position, with the same colour and normal); the vertex
        colours stay, for formats without textures.
    """


@hookspec
def gen3d_loops() -> Iterable[Component]:
    """Loops: what a recipe's (or a stage's) ``loop:`` names.

    :return: Components whose ``factory(config, *, run)`` returns a training loop
        (:class:`gen3d.TrainingLoop`: ``step``, ``state_dict``, ``load_state_dict``, ``evaluate``,
        ``outputs``) or a stage that does not train (:class:`gen3d.StageLoop`: ``run_stage``).
        ``run`` is the :class:`gen3d.Run` of its stage. List in ``needs`` the capabilities the
        loop's ``representation`` must have.
    """


@hookspec
def gen3d_commands() -> Iterable[tuple[str, str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]]:
    """Subcommands of the ``gen3d`` command line.

    :return: ``(name, help, setup)`` triples. ``setup(parser)`` adds the command's arguments to
        its ``argparse`` sub-parser and returns the function that runs it: ``run(args) -> int``,
        the exit status. A ``Gen3DError`` it raises is shown as one line.
    """


# --- lifecycle (observers; return values are ignored) -----------------------------


@hookspec
def gen3d_on_step(run: Run, step: int, metrics: dict[str, float]) -> None:
    """Called after every optimisation step.

    :param run: the stage's :class:`gen3d.Run` (its folder, recipe, stage settings, device).
    :param step: the number of steps done so far in this stage (1 after the first).
    :param metrics: what the loop's ``step`` returned (``loss`` and its own, e.g. ``psnr``).
    """


@hookspec
def gen3d_on_checkpoint(run: Run, step: int, path: Path) -> None:
    """Called after a checkpoint was written (atomically).

    :param run: the stage's :class:`gen3d.Run`.
    :param step: the step the checkpoint continues from.
    :param path: the checkpoint file (``checkpoints/last.safetensors`` in the stage's folder).
    """


@hookspec
def gen3d_on_export(run: Run, paths: list[Path]) -> None:
    """Called once a stage's assets are written (by the core, for every loop).

    :param run: the stage's :class:`gen3d.Run`.
    :param paths: the files written: meshes, material files and previews.
    """
