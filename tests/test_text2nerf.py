"""``text2nerf``: the whole loop against scene-teacher at a small size, a run with a wrong depth
scale that the teacher must catch, resume between two views, tiny random models in the
downloaded layouts through the real loading code, and the bad inputs refused in one line."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file

from gen3d import ConfigError, Gen3DError, load_recipe, run_recipe, scene
from gen3d.testing import build_loop
from gen3d.trainer import Interrupted
from test_image_models import one_line

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "text2nerf-teacher.yaml"
SIZE = 48


def true_range(size: int = SIZE) -> tuple[float, float]:
    """The room's nearest and farthest z-depth from the start camera at ``size`` px."""
    room = scene.AnalyticScene.load(ROOT / "assets" / "scene")
    _, z = room.render(room.start_camera(scene.PinholeConfig(60, size, size)), 1)
    return float(z.min()), float(z.max())


def small(*extra: str, far_scale: float = 1.0) -> list[str]:
    """The teacher recipe at SIZE px with a short schedule and light outputs."""
    near, far = true_range()
    return [f"camera.width={SIZE}", f"camera.height={SIZE}", f"first_depth.near={near}",
            f"first_depth.far={far * far_scale}", "steps=330", "schedule.first_steps=90", "schedule.steps_per_view=25",
            "checkpoint_every=1000", "representation.resolutions=[24, 48]", "representation.upsample_at=[40]",
            "render.samples_per_diagonal=128", "render.occupancy_resolution=32", "train.rays_per_step=1024",
            "flythrough.frames_between=2", "flythrough.size=32", "scene_mesh.depth_size=32",
            "scene_mesh.fusion.voxels=64", "scene_mesh.points_per_view=500", "export.target_faces=3000",
            "export.colors=vertex", *extra]


def hole_depth_errors(out: Path) -> list[float]:
    """Each later view's aligned depth on its inpainted pixels against the room's true depth there."""
    room = scene.AnalyticScene.load(ROOT / "assets" / "scene")
    errors = []
    for i in range(1, 9):
        data = load_file(str(out / "views" / f"{i:03d}.safetensors"))
        camera = scene.pinhole(data["0.c2w"], scene.PinholeConfig(60, SIZE, SIZE))
        truth = room.render(camera, 1)[1]
        hole = data["0.train"].bool()
        errors.append(float(((data["0.depth"] - truth).abs() / truth)[hole].median()))
    return errors


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2n") / "room"
    metrics = run_recipe(load_recipe(RECIPE, small()), out, quiet=True)
    return out, metrics


@pytest.mark.slow
def test_the_teacher_run_rebuilds_the_room(teacher_run):
    out, metrics = teacher_run
    assert metrics["views"] == 9 and len(metrics["per_view"]) == 9
    # Every later view had holes to inpaint, and its depth aligned to the field on the known pixels.
    for view in metrics["per_view"][1:]:
        assert 0 < view["inpainted"] < 0.6
        assert view["align_error"] <= 0.02, view
    assert max(hole_depth_errors(out)) <= 0.03
    assert set(metrics["seconds_by_stage"]) >= {"text_to_image", "depth", "render", "holes", "inpaint", "align"}


@pytest.mark.slow
def test_the_outputs_are_what_a_user_opens(teacher_run):
    out, metrics = teacher_run
    sheet = iio.imread(out / "views.png")
    assert sheet.shape == (2 * SIZE, 9 * SIZE, 3)
    frames = np.stack(imageio.mimread(out / "flythrough.mp4", format="FFMPEG", memtest=False))  # imageio-ffmpeg
    assert len(frames) == 10 * 2 + 1 and frames[0].shape[:2] == (32, 32)
    assert frames.std() > 5  # a scene, not a blank video
    cloud = trimesh.load(out / "scene_points.ply")
    assert len(cloud.vertices) > 1000
    mesh = trimesh.load(out / "mesh.ply", force="mesh")
    room = scene.AnalyticScene.load(ROOT / "assets" / "scene")
    low, high = np.array(room.room["min"]), np.array(room.room["max"])
    # Z up, inside the room (what the views see of it), and close to the room's own surfaces.
    assert (mesh.vertices > low - 0.3).all() and (mesh.vertices < high + 0.3).all()
    truth = trimesh.load(ROOT / "assets" / "scene" / "mesh.ply", force="mesh")
    cameras = [scene.pinhole(p, scene.PinholeConfig(60, SIZE, SIZE))
               for p in scene.trajectory(scene.TrajectoryConfig(translation=0.15, rotation_deg=10),
                                         room.start_camera().c2w[0])]
    depths = [room.render(c, 1)[1] for c in cameras]
    assert scene.seen_chamfer(mesh, truth, depths, cameras, room.size, samples=20_000)["chamfer"] < 0.02
    for name in ("mesh.glb", "mesh.obj", "metrics.json", "report.html", "views/views.json"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert 'alt="views.png"' in page and 'href="flythrough.mp4"' in page  # the results page shows the views


@pytest.mark.slow
def test_a_wrong_depth_scale_shows_against_the_teacher(tmp_path, teacher_run):
    """The check can fail: a first view read 30 % too deep puts every later view's depth off."""
    metrics = run_recipe(load_recipe(RECIPE, small("export.formats=[]", far_scale=1.3)), tmp_path / "wrong",
                         quiet=True)
    good = max(hole_depth_errors(teacher_run[0]))
    wrong = max(hole_depth_errors(tmp_path / "wrong"))
    assert wrong > 0.08 > good
    assert metrics["views"] == 9


@pytest.mark.slow
def test_resume_after_an_interrupt_between_two_views_makes_no_view_twice(tmp_path, monkeypatch, teacher_run):
    from gen3d_plugins.text2nerf import Text2NeRF

    original = Text2NeRF.step
    stop_at = 90 + 25 * 3 + 5  # after view 4 was made, before view 5

    def sigint_at(self, step):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    monkeypatch.setattr(Text2NeRF, "step", sigint_at)
    recipe = load_recipe(RECIPE, small("export.formats=[]"))
    with pytest.raises(Interrupted):
        run_recipe(recipe, tmp_path / "cut", quiet=True)
    assert sorted(p.name for p in (tmp_path / "cut" / "views").glob("*.safetensors"))[-1] == "004.safetensors"
    monkeypatch.setattr(Text2NeRF, "step", original)
    metrics = run_recipe(recipe, tmp_path / "cut", resume=True, quiet=True)
    assert metrics["views_made_by_this_process"] == 4  # views 5 to 8; 0 to 4 were read back
    straight = teacher_run[0]
    for i in range(9):
        a = load_file(str(tmp_path / "cut" / "views" / f"{i:03d}.safetensors"))
        b = load_file(str(straight / "views" / f"{i:03d}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)


def test_a_view_file_left_by_a_killed_run_is_read_back_not_made_again(tmp_path):
    recipe = load_recipe(RECIPE, small())
    loop = build_loop(recipe, tmp_path)
    loop.add_views(0, 0)
    assert loop.made_views == 1
    again = build_loop(recipe, tmp_path)
    again.add_views(0, 0)
    assert again.made_views == 0
    assert torch.equal(again.views[0].image, loop.views[0].image) and torch.equal(again.views[0].depth, loop.views[0].depth)
    assert len(again.views) == 1 + 4  # the first view and its support set
    assert torch.equal(again.field.aabb, loop.field.aabb)


def test_the_first_view_depth_is_exact_with_the_true_range_and_the_support_set_warps_it(tmp_path):
    loop = build_loop(load_recipe(RECIPE, small()), tmp_path)
    loop.add_views(0, 0)
    room = scene.AnalyticScene.load(ROOT / "assets" / "scene")
    first = loop.views[0]
    truth = room.render(first.camera, 1)[1]
    assert float(((first.depth - truth).abs() / truth).max()) < 1e-4
    for support in loop.views[1:]:
        assert support.kind == "support"
        seen = support.train
        assert 0.7 < float(seen.float().mean()) < 1.0  # a small move: most pixels known, a few holes
        true_z = room.render(support.camera, 1)[1]
        # A warped point keeps its own depth in the pixel it lands in (up to half a pixel off its centre).
        assert float(((support.depth - true_z).abs() / true_z)[seen].median()) < 0.01
    # The box holds the first view's points and every trajectory camera.
    box = loop.field.aabb
    points = scene.unproject(first.depth, first.camera).reshape(-1, 3)
    assert ((points >= box[:3]) & (points <= box[3:])).all()


def test_a_later_view_past_the_box_grows_it_and_the_new_space_starts_empty(tmp_path):
    loop = build_loop(load_recipe(RECIPE, small()), tmp_path)
    loop.add_views(0, 0)
    old = loop.field.aabb.clone()
    view = loop.views[0]
    moved = type(view)(view.camera, view.image, view.depth * 1.5, view.train, "generated")
    grown = loop.grown_box(moved)
    assert grown is not None and (grown[3:] >= old[3:]).all() and (grown[:3] <= old[:3]).all()
    assert loop.trainer.refit(grown, 0)
    beyond = torch.tensor([[float(grown[0]) + 1e-3, float(grown[1]) + 1e-3, float(grown[2]) + 1e-3]])
    assert not ((beyond >= old[:3]) & (beyond <= old[3:])).all()
    sigma = loop.field.density(beyond)
    alpha = 1 - torch.exp(-sigma * loop.renderer.step_size)
    assert float(alpha) < 0.02  # the clear start, not the old box's edge values smeared outward
    assert loop.grown_box(view) is None  # what the box holds already grows nothing


# --- bad input: one line, before any work ------------------------------------------------------


def test_an_empty_prompt_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_loop(load_recipe(RECIPE, small("prompt=  ")), tmp_path)
    assert "prompt is missing" in one_line(caught)
    assert not (tmp_path / "views").exists()


def test_a_malformed_pose_in_a_trajectory_file_is_one_line_naming_it(tmp_path):
    poses = tmp_path / "poses.json"
    good = torch.eye(4).tolist()
    poses.write_text(json.dumps([good, [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]]))
    with pytest.raises(Gen3DError) as caught:
        build_loop(load_recipe(RECIPE, small("trajectory.kind=file", f"trajectory.path={poses}")), tmp_path)
    assert f"{poses}: pose 1: the rotation is not orthonormal" in one_line(caught)


def test_too_few_steps_for_the_trajectory_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_loop(load_recipe(RECIPE, small("steps=200")), tmp_path)
    assert "steps: 200 ends before the last of the trajectory's 9 views" in one_line(caught)


def test_a_component_that_cannot_play_a_role_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_loop(load_recipe(RECIPE, small("inpainter=grabcut")), tmp_path)
    assert "inpainter: 'grabcut' cannot play the inpainter role (it is a detector and segmenter)" in one_line(caught)


# --- tiny random models in the downloaded layouts ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from gen3d.testing import make_tiny_sd

    from test_preprocess_models import make_depth

    root = tmp_path_factory.mktemp("tiny-t2n")
    torch.manual_seed(0)
    return {"sd": make_tiny_sd(root / "sd"), "inpainting": make_tiny_sd(root / "inpainting", inpainting=True),
            "depth": make_depth(root / "depth")}


def model_overrides(models, **swap) -> list[str]:
    folders = {**models, **swap}
    ranked = f", candidates: 2, clip_model: {folders['clip']}" if "clip" in folders else ", candidates: 1"
    return [f"text_to_image={{type: sd-text-to-image, model: {folders['sd']}, size: 32, steps: 2, device: cpu}}",
            f"inpainter={{type: sd-inpainter, model: {folders['inpainting']}, size: 32, steps: 2{ranked}, device: cpu}}",
            f"depth={{type: depth-anything, model: {folders['depth']}, device: cpu}}"]


@pytest.mark.slow
def test_tiny_random_models_run_the_whole_recipe(tmp_path, tiny_models, tmp_path_factory):
    from gen3d.testing import make_tiny_clip

    models = {**tiny_models, "clip": make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")}
    recipe = load_recipe(ROOT / "recipes" / "text2nerf.yaml",
                         [*model_overrides(models), "prompt=a cosy living room", *small(), "steps=140",
                          "schedule.first_steps=20", "schedule.steps_per_view=10"])
    metrics = run_recipe(recipe, tmp_path / "tiny", quiet=True)
    assert metrics["views"] == 9
    assert all(view["candidates"] == 2 for view in metrics["per_view"][1:])
    assert (tmp_path / "tiny" / "mesh.glb").is_file() and (tmp_path / "tiny" / "flythrough.mp4").is_file()


def test_a_text_to_image_folder_given_as_inpainter_is_refused_before_any_work(tmp_path, tiny_models):
    recipe = load_recipe(ROOT / "recipes" / "text2nerf.yaml",
                         [*model_overrides(tiny_models, inpainting=tiny_models["sd"]), "prompt=a room", *small()])
    with pytest.raises(ConfigError) as caught:
        build_loop(recipe, tmp_path)
    assert "inpainter.model" in one_line(caught)
    assert not (tmp_path / "views").exists()


def test_a_metric_depth_model_is_refused_before_any_work(tmp_path, tiny_models):
    metric = tmp_path / "metric"
    metric.mkdir()
    data = json.loads((tiny_models["depth"] / "config.json").read_text())
    (metric / "config.json").write_text(json.dumps({**data, "depth_estimation_type": "metric", "max_depth": 20}))
    recipe = load_recipe(ROOT / "recipes" / "text2nerf.yaml",
                         [*model_overrides(tiny_models, depth=metric), "prompt=a room", *small()])
    with pytest.raises(ConfigError) as caught:
        build_loop(recipe, tmp_path)
    assert "depth.model" in one_line(caught) and "metric" in one_line(caught)
