"""The image-to-3D recipes end to end on tiny models: one photo in, a cut-out, a mesh, a turntable
and the reference view out; inputs passed from the command line; bad input as one line, early."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen3d import ConfigError, DataError, load_recipe
from gen3d.testing import make_tiny_stable_diffusion, make_tiny_zero123
from gen3d_plugins.image_to_3d import depth_in_cutout, pearson, read_cutout, resize_cutout

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "preprocess" / "example.jpg"

# The shipped recipe, made tiny: a few steps at a small size on a coarse grid.
SMALL = ["stages.optimise.steps=4", "stages.optimise.checkpoint_every=2", "stages.optimise.guidance.image_size=32",
         "stages.optimise.representation.resolutions=[16]", "stages.optimise.representation.upsample_at=[]",
         "stages.optimise.views.sizes=[16]", "stages.optimise.views.size_at=[]", "stages.optimise.reference.size=16",
         "stages.optimise.render.samples_per_diagonal=32", "stages.optimise.render.occupancy_resolution=16",
         "stages.optimise.export.resolution=32", "stages.optimise.preview.turntable_frames=2"]


@pytest.fixture(scope="module")
def tiny_zero123(tmp_path_factory):
    return make_tiny_zero123(tmp_path_factory.mktemp("models") / "zero123")


@pytest.fixture(scope="module")
def tiny_stable(tmp_path_factory):
    return make_tiny_zero123(tmp_path_factory.mktemp("models") / "stable-zero123", naming="community")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["zero123.yaml", "stable-zero123.yaml"])
def test_photo_to_mesh_through_the_cli(recipe, tiny_zero123, tiny_stable, tmp_path):
    model = tiny_stable if recipe.startswith("stable") else tiny_zero123
    out = tmp_path / "chair"
    proc = subprocess.run([sys.executable, "-m", "gen3d", "run", str(ROOT / "recipes" / recipe), f"image={PHOTO}",
                           f"stages.optimise.guidance.model={model}", *SMALL, "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("cutout.png", "mesh.glb", "mesh.obj", "mesh.ply", "turntable.gif", "reference.png", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "stages" / "preprocess" / "rgba.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"]["optimise"]["steps"] == 4
    assert 0 <= metrics["reference_mask_iou"] <= 1
    sheet = np.asarray(Image.open(out / "reference.png"))
    assert sheet.shape == (16, 32, 3)  # given | predicted
    resolved = (out / "recipe.yaml").read_text()
    assert str(PHOTO) in resolved and "variant" in resolved or "stable" not in recipe


def test_image_on_the_command_line_reaches_the_preprocess_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.jpg").write_bytes(PHOTO.read_bytes())
    recipe = load_recipe(ROOT / "recipes" / "zero123.yaml", ["image=photo.jpg"])
    assert recipe.stages[0].loop.image == tmp_path / "photo.jpg"  # relative to the cwd, not the recipe
    assert not hasattr(recipe.stages[1].loop, "image")
    shipped = load_recipe(ROOT / "recipes" / "zero123.yaml")
    assert shipped.stages[0].loop.image == PHOTO  # the recipe's own: relative to the recipe file


def test_a_top_level_key_no_stage_takes_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'imag'. Did you mean 'image'"):
        load_recipe(ROOT / "recipes" / "zero123.yaml", ["imag=photo.jpg"])


def test_stage_overrides_of_paths_resolve_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(ROOT / "recipes" / "zero123.yaml", ["stages.preprocess.image=other.png"])
    assert recipe.stages[0].loop.image == tmp_path / "other.png"


@pytest.mark.parametrize("content, message", [
    (b"not an image at all", "not an image"),
    (None, "no such image file"),
])
def test_bad_reference_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "cutout.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_cutout(path)
    assert "\n" not in str(err.value)


def test_an_opaque_reference_is_refused(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)
    with pytest.raises(DataError, match="no transparent background"):
        read_cutout(path)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gen3d", "run", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.slow
def test_bad_inputs_stop_before_optimising(tiny_zero123, tmp_path):
    sd = make_tiny_stable_diffusion(tmp_path / "sd")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(blank)
    recipe = ROOT / "recipes" / "zero123.yaml"
    cases = [
        ([f"image={PHOTO}", f"stages.optimise.guidance.model={sd}"], "is a StableDiffusionPipeline checkpoint"),
        ([f"image={not_image}", f"stages.optimise.guidance.model={tiny_zero123}"], "notes.jpg"),
        ([f"image={blank}", f"stages.optimise.guidance.model={tiny_zero123}"], "blank.png"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        proc = run_cli(recipe, *overrides, *SMALL, "--out", out, cwd=tmp_path)
        assert proc.returncode != 0
        lines = [line for line in proc.stderr.splitlines() if line.startswith("gen3d: error")]
        assert len(lines) == 1 and message in lines[0], proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr
        assert not (out / "stages" / "optimise" / "checkpoints").exists()


def test_cutout_resize_does_not_bleed_the_hidden_colour():
    rgba = torch.zeros(4, 8, 8)
    rgba[:3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # red under transparent pixels
    rgba[:3, 3:7, 3:7] = 0.5
    rgba[3, 3:7, 3:7] = 1.0
    small = resize_cutout(rgba, 4)
    edge = small[:, 1, 1]  # half covered
    assert float(edge[3]) == pytest.approx(0.25)
    torch.testing.assert_close(edge[:3], torch.full((3,), 0.5))


def test_depth_is_cut_like_the_cutout():
    depth = np.zeros((100, 200), np.float32)
    depth[40:60, 90:110] = 1.0  # the object, a 20 px square in the middle of the photo
    out = depth_in_cutout(depth, [90, 40, 110, 60], 40, 0.5)  # fill 0.5: the square is half the frame
    assert float(out[10:30, 10:30].mean()) == pytest.approx(1.0)
    assert float(out[:8].mean()) == 0.0 and float(out[:, :8].mean()) == 0.0


def test_pearson_sign_for_disparity():
    depth = torch.linspace(1, 2, 50)
    disparity = 1 / depth
    assert float(pearson(depth, -disparity)) > 0.98
