"""``field-teacher`` guidance and ``gen3d.runs``: a reconstructed field teaches a text-to-3D loop.

A small teacher is reconstructed from the 32 px toy; a short ``dreamfusion.yaml`` run guided by
it must move its field towards the teacher, and the same run with a sabotaged teacher (rendered
at a mirrored camera, or in the wrong colour space) must do clearly worse: the check can fail.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh

from conftest import ROOT
from gen3d import Gen3DError, GuidanceInput, chamfer, load_recipe, load_trained_field, run_recipe
from gen3d import psnr as view_psnr
from gen3d.errors import ConfigError
from gen3d.io import load_checkpoint, save_checkpoint
from gen3d.plugins import get_component
from gen3d.testing import guidance_batch
from gen3d_plugins import field_teacher
from gen3d_plugins.nerf_data import NerfDataConfig, load

# A quick teacher: coarse grids, one ray a pixel everywhere (so the loop's held-out renderings are
# exactly what load_trained_field renders), a box tightened early (its box and step are restored).
TEACHER = ["representation.resolutions=[24, 40]", "representation.upsample_at=[40]", "train.rays_per_step=1024",
           "train.tighten_box_at=30", "render.edge_supersample=1", "render.eval_offsets=1", "export.formats=[ply]",
           "export.resolution=48", "preview.turntable_frames=0", "preview.test_images=0", "max_seconds=null",
           "steps=100"]
# The override set that turns dreamfusion.yaml into a distillation of the teacher (see
# benchmarks/bench_teacher.py), here at 32 px with a coarse grid and few steps.
STUDENT = ["guidance={type: field-teacher}", "prompt=the toy", "shading.albedo=1.0", "shading.textureless=0",
           "background.kind=solid", "background.color=[1.0, 1.0, 1.0]", "cameras.elevation=[-15, 70]",
           "cameras.distance=[3.5, 4.5]", "cameras.fov=[35, 45]", "regularisers.orientation=0",
           "representation.lr=0.1", "representation.density_lr=1.0", "guidance.weight=0.001",
           "cameras.sizes=[32]", "cameras.size_at=[]", "representation.resolutions=[24, 32]",
           "representation.upsample_at=[30]", "render.samples_per_diagonal=96", "export.formats=[]",
           "export.resolution=48", "preview.turntable_frames=0", "max_seconds=null", "checkpoint_every=1000",
           "steps=100"]


@pytest.fixture(scope="module")
def teacher(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    rec = load_recipe(ROOT / "recipes" / "nerf-reconstruct.yaml", [f"data.path={small_dataset}", *TEACHER])
    return out, run_recipe(rec, out, quiet=True)


@pytest.fixture(scope="module")
def test_views(small_dataset):
    data = load(NerfDataConfig(path=small_dataset))
    rgba = data.test.images.permute(0, 3, 1, 2)
    return data.test.cameras, rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])  # on white, as the teacher trained


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over views, as the loops' held-out PSNR."""
    return float(np.mean([view_psnr(x.numpy(), y.numpy()) for x, y in zip(a, b)]))


def teacher_guidance(run, **settings):
    component = get_component("guidance", "field-teacher")
    return component.factory(component.config(run=run, **settings), device="cpu")


# --- gen3d.runs ------------------------------------------------------------------------------


def test_loaded_field_reproduces_the_teachers_own_held_out_renderings(teacher, test_views):
    out, metrics = teacher
    loaded = load_trained_field(out)
    cameras, truth = test_views
    assert loaded.step == 100 and loaded.stage.settings.loop == "nerf-reconstruct"
    assert not torch.equal(loaded.field.aabb, torch.tensor([-1.1] * 3 + [1.1] * 3))  # the tightened box
    # The loop's own held-out PSNR (metrics.json) came from the same renderings.
    assert psnr(loaded.render_images(cameras, [1, 1, 1]), truth) == pytest.approx(metrics["psnr_test"], abs=0.01)
    # A checkpoint file names the same run.
    again = load_trained_field(out / "checkpoints" / "last.safetensors")
    torch.testing.assert_close(again.render_images(cameras[:1], [1, 1, 1]), loaded.render_images(cameras[:1], [1, 1, 1]))


def test_checkpoints_without_a_saved_step_still_render_the_field(teacher, test_views, tmp_path):
    """Older checkpoints do not hold the renderer's marching step: the field's own box's step is
    taken, a little shorter than the step a run that tightened its box kept, and the renderings
    hardly differ."""
    out, _ = teacher
    cameras, _ = test_views
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "recipe.yaml").write_text((out / "recipe.yaml").read_text())
    state = load_checkpoint(out / "checkpoints" / "last.safetensors")
    saved = state["loop"]["renderer"].pop("step_size")
    save_checkpoint(old / "checkpoints" / "last.safetensors", state)
    loaded, current = load_trained_field(old), load_trained_field(out)
    box = loaded.field.aabb
    assert current.renderer.step_size == saved
    assert loaded.renderer.step_size == pytest.approx(float((box[3:] - box[:3]).norm()) / 160)
    assert loaded.renderer.step_size < saved  # the box was tightened: the step it kept was longer
    assert psnr(loaded.render_images(cameras, [1, 1, 1]), current.render_images(cameras, [1, 1, 1])) > 40


def test_missing_runs_and_checkpoints_are_one_line_errors(teacher, tmp_path):
    with pytest.raises(Gen3DError, match="no run folder or checkpoint at"):
        load_trained_field(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no recipe.yaml"):
        load_trained_field(tmp_path)
    (tmp_path / "recipe.yaml").write_text((teacher[0] / "recipe.yaml").read_text())
    with pytest.raises(Gen3DError, match="no checkpoint at"):
        load_trained_field(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gen3d", "run", str(ROOT / "recipes" / "dreamfusion.yaml"),
                           "guidance={type: field-teacher}", "guidance.run=no-such-run", "prompt=x", "--out", "x"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "no run folder or checkpoint at" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


# --- the guidance ----------------------------------------------------------------------------


def test_noise_schedule_is_stable_diffusions():
    from diffusers import DDPMScheduler

    sd = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    config = field_teacher.FieldTeacherConfig(run=ROOT)
    torch.testing.assert_close(field_teacher.alphas_cumprod(config), sd.alphas_cumprod)


def test_gradient_is_a_perfect_denoisers(teacher):
    """grad = w(t) (eps_hat - eps) = w(t) sqrt(abar) / sqrt(1 - abar) (x - x_teacher): the noise cancels."""
    out, _ = teacher
    guidance = teacher_guidance(out)
    images = torch.rand(2, 3, 24, 24, requires_grad=True)
    batch = guidance_batch(images, ["a", "b"], 3, 10, generator=torch.Generator().manual_seed(7), distance=4.0)
    x_teacher = guidance.render_teacher(batch)
    assert x_teacher.shape == images.shape and 0.2 < float(x_teacher.mean()) < 1  # the object on white

    t = torch.tensor([100, 700])
    abar = guidance.alphas[t].view(-1, 1, 1, 1)
    expected = (1 - abar) * abar.sqrt() / (1 - abar).sqrt() * (images.detach() - x_teacher)
    torch.testing.assert_close(guidance.gradient(images, x_teacher, t, torch.randn(images.shape)), expected,
                               rtol=1e-4, atol=1e-5)

    # Through __call__: the same timesteps the generator draws, the gradient reaches the images.
    result = guidance(batch)
    t = field_teacher.sample_timesteps(0.02, 0.98, 1000, 2, torch.Generator().manual_seed(7))
    abar = guidance.alphas[t].view(-1, 1, 1, 1)
    result.loss.backward()
    expected = (1 - abar) * abar.sqrt() / (1 - abar).sqrt() * (images.detach() - x_teacher)
    torch.testing.assert_close(images.grad * len(images), expected, rtol=1e-4, atol=1e-5)
    assert result.metrics["teacher_psnr"] == pytest.approx(psnr(images.detach(), x_teacher), abs=0.5)


def test_the_teacher_renders_on_each_views_background(teacher):
    """Where the loop says what colour each view was composited on, the teacher uses it."""
    guidance = teacher_guidance(teacher[0])
    images = torch.rand(2, 3, 16, 16)
    batch = guidance_batch(images, ["a", "b"], distance=4.0)
    batch.background = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    corners = guidance.render_teacher(batch)[:, :, 0, 0]  # empty space
    torch.testing.assert_close(corners, batch.background, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="background must be"):
        GuidanceInput(images, ["a", "b"], batch.cameras, batch.angles, background=torch.ones(3))


def test_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="guidance.run: missing required setting"):
        load_recipe(ROOT / "recipes" / "dreamfusion.yaml", ["guidance={type: field-teacher}", "prompt=x"])
    with pytest.raises(ConfigError, match="t_max_end must lie in"):
        load_recipe(ROOT / "recipes" / "dreamfusion.yaml",
                    ["guidance={type: field-teacher}", f"guidance.run={tmp_path}", "guidance.t_max_end=0.99"])


# --- distillation end to end -------------------------------------------------------------------


def distil(teacher_dir, out, *extra):
    rec = load_recipe(ROOT / "recipes" / "dreamfusion.yaml", [*STUDENT, f"guidance.run={teacher_dir}", *extra])
    return run_recipe(rec, out, quiet=True)


def student_psnr(student_dir, teacher_dir, cameras) -> float:
    student, teacher = load_trained_field(student_dir), load_trained_field(teacher_dir)
    return psnr(student.render_images(cameras, [1, 1, 1]), teacher.render_images(cameras, [1, 1, 1]))


def mirrored(render_teacher):
    """The teacher rendered at each camera mirrored left-right (camera x axis flipped)."""
    return lambda self, batch: render_teacher(self, batch).flip(-1)


def linear_light(render_teacher):
    """The teacher's sRGB renderings taken for linear light and encoded again (a colour-space slip)."""
    return lambda self, batch: render_teacher(self, batch) ** (1 / 2.2)


@pytest.fixture(scope="module")
def distilled(teacher, test_views, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    metrics = distil(teacher[0], out, "export.formats=[ply]")
    return out, metrics, student_psnr(out, teacher[0], test_views[0])


@pytest.mark.slow
def test_distillation_rebuilds_the_teacher(distilled, teacher, test_views, small_dataset, tmp_path):
    out, metrics, score = distilled
    assert metrics["steps"] == 100
    blob = student_psnr_of_untrained(teacher[0], test_views[0], tmp_path)
    assert score > 25 and score > blob + 8, (score, blob)
    # Its export lies on the object (PLY is written in the world's Z-up frame).
    assert chamfer(trimesh.load(out / "mesh.ply", process=False), small_dataset / "mesh.ply") < 0.05


def student_psnr_of_untrained(teacher_dir, cameras, tmp_path) -> float:
    distil(teacher_dir, tmp_path / "start", "steps=1", "guidance.weight=0", "regularisers.entropy=0")
    return student_psnr(tmp_path / "start", teacher_dir, cameras)


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", [mirrored, linear_light])
def test_a_sabotaged_teacher_fails_the_check(sabotage, distilled, teacher, test_views, tmp_path, monkeypatch):
    monkeypatch.setattr(field_teacher.FieldTeacher, "render_teacher",
                        sabotage(field_teacher.FieldTeacher.render_teacher))
    distil(teacher[0], tmp_path / "bad")
    bad = student_psnr(tmp_path / "bad", teacher[0], test_views[0])
    assert bad < 23 and bad < distilled[2] - 4, (bad, distilled[2])


# --- view-teacher: the same teacher behind Zero-1-to-3's interface ---------------------------------


def view_teacher_batch(teacher_dir, mirror=False, reference_azimuth=0.0):
    from gen3d import ReferenceView, ViewAngles, random_views
    from gen3d_plugins import view_teacher

    config = view_teacher.ViewTeacherConfig(run=teacher_dir, mirror_azimuth=mirror,
                                            reference=view_teacher.TeacherCamera(0.0, reference_azimuth, 4.0, 40.0))
    guide = view_teacher.build(config)
    views = random_views(4, 32, (10, 40), (30, 150), (4.0, 4.0), (40, 40), torch.Generator().manual_seed(2))
    reference_cam = view_teacher.cameras_from_relative(torch.tensor([[0.0, 0.0, 1.0, 0.0]]),
                                                       view_teacher.camera_position(0, 0, 4.0), "zero123", 40.0, 32)
    own = guide.teacher.render_images(views.cameras, [1.0, 1.0, 1.0])
    reference = ReferenceView(guide.teacher.render_images(reference_cam, [1.0, 1.0, 1.0])[0], reference_cam,
                              ViewAngles.of(reference_cam))
    batch = GuidanceInput(own.clone().requires_grad_(True), [""] * 4, views.cameras, ViewAngles.of(views.cameras),
                          step=500, total_steps=1000, reference=reference, generator=torch.Generator().manual_seed(0))
    return guide, batch


def test_view_teacher_renders_the_view_t_describes(teacher):
    guide, batch = view_teacher_batch(teacher[0])
    out = guide(batch)
    assert out.metrics["teacher_psnr"] > 60  # the target is the teacher at the loop's own cameras
    assert out.metrics["reference_psnr"] > 60  # and the reference it got is the teacher's own view
    out.loss.backward()
    assert batch.images.grad.abs().max() < 1e-4  # renderings equal to the target: (almost) no gradient


def test_view_teacher_catches_a_mirrored_azimuth(teacher):
    guide, batch = view_teacher_batch(teacher[0], mirror=True)
    assert guide(batch).metrics["teacher_psnr"] < 25  # the toy from the other side: another picture


def test_view_teacher_elsewhere_turns_the_target(teacher):
    guide, batch = view_teacher_batch(teacher[0], reference_azimuth=90.0)
    assert guide(batch).metrics["teacher_psnr"] < 25  # the teacher's world is turned by 90 degrees
