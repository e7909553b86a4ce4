"""Multi-stage recipes: stages in order, init_from, one run folder, --resume mid-stage to the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gen3d import ConfigError, load_recipe, run_recipe
from gen3d.io import load_checkpoint
from gen3d.trainer import Interrupted

ROOT = Path(__file__).resolve().parents[1]


def two_stage(small_dataset, *overrides):
    return load_recipe(ROOT / "recipes" / "nerf-two-stage.yaml", [
        f"stages.0.data.path={small_dataset}", f"stages.1.data.path={small_dataset}", *overrides])


def small(small_dataset, tmp_path, fine_steps=8):
    """The shipped two-stage recipe, made tiny: a few steps of each stage on the 32 px toy."""
    text = (ROOT / "recipes" / "nerf-two-stage.yaml").read_text()
    import yaml

    data = yaml.safe_load(text)
    for stage, steps in zip(data["stages"], (6, fine_steps)):
        stage.update(steps=steps, checkpoint_every=2, max_seconds=None)
        stage["data"]["path"] = str(small_dataset)
        stage["representation"]["resolutions"] = [12, 16] if stage["name"] == "coarse" else [24]
        stage["representation"]["upsample_at"] = [3] if stage["name"] == "coarse" else []
        stage["render"].update(samples_per_diagonal=48, occupancy_resolution=16, edge_supersample=1, eval_offsets=1)
        stage["train"] = {"rays_per_step": 256, "tighten_box_at": None}
        stage["export"] = {"resolution": 32, "formats": ["glb", "obj"], "texture_size": 64}
        stage["preview"] = {"turntable_frames": 2, "test_images": 1}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_shipped_two_stage_recipe_validates(small_dataset):
    recipe = two_stage(small_dataset)
    assert [s.settings.name for s in recipe.stages] == ["coarse", "fine"]
    assert recipe.stages[1].settings.init_from == "coarse"
    assert "stages:" in recipe.to_yaml()


def test_two_stages_run_resume_mid_second_stage_to_the_same_result(small_dataset, tmp_path, monkeypatch):
    recipe = small(small_dataset, tmp_path)
    straight = run_recipe(recipe, tmp_path / "a", quiet=True)
    for stage in ("coarse", "fine"):  # both stages' outputs, and the final ones at the top
        assert (tmp_path / "a" / "stages" / stage / "mesh.glb").is_file()
        assert (tmp_path / "a" / "stages" / stage / "metrics.json").is_file()
    assert (tmp_path / "a" / "mesh.glb").is_file() and (tmp_path / "a" / "turntable.gif").is_file()
    texture = [line.split()[1] for line in (tmp_path / "a" / "mesh.mtl").read_text().splitlines()
               if line.startswith("map_Kd")]
    assert texture and (tmp_path / "a" / texture[0]).is_file(), texture  # the OBJ's texture came along
    top = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(top["stages"]) == {"coarse", "fine"} and top["steps"] == 8
    assert straight["psnr_test"] == top["psnr_test"]

    from gen3d_plugins.reconstruct import Reconstruct

    original = Reconstruct.step

    def interrupt(self, step):
        if self.run.stage.name == "fine" and step == 5:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Reconstruct, "step", interrupt)
    with pytest.raises(Interrupted, match="interrupted at step 5"):
        run_recipe(recipe, tmp_path / "b", quiet=True)
    assert (tmp_path / "b" / "stages" / "coarse" / "metrics.json").is_file()
    assert not (tmp_path / "b" / "stages" / "fine" / "metrics.json").exists()
    monkeypatch.setattr(Reconstruct, "step", original)
    resumed = run_recipe(recipe, tmp_path / "b", resume=True, quiet=True)
    a = load_checkpoint(tmp_path / "a" / "stages" / "fine" / "checkpoints" / "last.safetensors")["loop"]["field"]
    b = load_checkpoint(tmp_path / "b" / "stages" / "fine" / "checkpoints" / "last.safetensors")["loop"]["field"]
    assert torch.equal(a["aabb"], b["aabb"])
    assert torch.allclose(a["table"], b["table"], atol=1e-6)
    assert resumed["psnr_test"] == pytest.approx(straight["psnr_test"], abs=1e-3)


def test_fine_stage_starts_from_the_coarse_field(small_dataset, tmp_path):
    recipe = small(small_dataset, tmp_path, fine_steps=1)
    metrics = run_recipe(recipe, tmp_path / "a", quiet=True)
    coarse = metrics["stages"]["coarse"]["psnr_test"]
    # One step at a finer resolution keeps what the coarse stage learnt (a fresh grid scores far less).
    assert metrics["psnr_test"] > coarse - 1.0, (metrics["psnr_test"], coarse)


def test_stage_errors_name_the_key(small_dataset, tmp_path):
    bad = tmp_path / "bad.yaml"
    stage = "loop: nerf-reconstruct, data: {path: somewhere}"
    bad.write_text(f"stages:\n  - {{name: a, {stage}}}\n  - {{name: b, {stage}, init_from: c}}\n")
    with pytest.raises(ConfigError, match=r"stages\[1\].init_from: 'c' is not an earlier stage; earlier stages: a"):
        load_recipe(bad)
    bad.write_text(f"stages:\n  - {{name: a, {stage}}}\n  - {{name: a, {stage}}}\n")
    with pytest.raises(ConfigError, match=r"stages\[1\].name: stage name 'a' is used twice"):
        load_recipe(bad)
    bad.write_text(f"steps: 3\nstages:\n  - {{name: a, {stage}}}\n")
    with pytest.raises(ConfigError, match="steps: unknown key 'steps'"):
        load_recipe(bad)
