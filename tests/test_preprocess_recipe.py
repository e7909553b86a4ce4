"""The ``preprocess`` recipe loop: ``gen3d run recipes/preprocess.yaml`` writes what ``gen3d preprocess`` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from gen3d import ConfigError, load_recipe
from gen3d.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "preprocess.yaml"
EXAMPLE = ROOT / "assets" / "preprocess" / "example.jpg"
OUTPUTS = ["detections.json", "mask.png", "overview.png", "rgba.png"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_recipe_writes_the_same_outputs_as_the_command(tmp_path, capsys):
    run, command = tmp_path / "run", tmp_path / "command"
    assert main(["run", str(RECIPE), "--out", str(run), "--quiet"]) == 0
    assert main(["preprocess", str(EXAMPLE), "--out", str(command)]) == 0
    names = sorted(p.name for p in run.iterdir())
    assert names == sorted([*OUTPUTS, "metrics.json", "recipe.yaml", "report.html"])  # no training: no checkpoints
    for name in ("rgba.png", "mask.png"):
        assert np.array_equal(pixels(run / name), pixels(command / name)), name
    info = json.loads((run / "detections.json").read_text())
    assert info["input"] == str(EXAMPLE) and info["input_size"] == list(Image.open(EXAMPLE).size)
    assert info["chosen"] == json.loads((command / "detections.json").read_text())["chosen"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "steps" not in metrics and metrics["object"] == "object" and metrics["unsure"] is False
    assert metrics["object_box"] == info["object_box"]
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["loop"] == "preprocess" and resolved["image"] == str(EXAMPLE)


def test_image_on_the_command_line_is_relative_to_the_cwd(tmp_path, monkeypatch):
    shutil.copy(EXAMPLE, tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    loop = load_recipe(RECIPE, ["image=photo.jpg", "prompt=a toy", "size=64", "detector.iterations=2"]).stages[0].loop
    assert loop.image == tmp_path / "photo.jpg" and loop.prompts == ["a toy"]
    assert loop.size == 64 and loop.detector.config.iterations == 2
    assert main(["run", str(RECIPE), "image=photo.jpg", "size=64", "--out", "out", "--quiet"]) == 0
    assert Image.open(tmp_path / "out" / "rgba.png").size == (64, 64)
    assert json.loads((tmp_path / "out" / "detections.json").read_text())["input"] == str(tmp_path / "photo.jpg")


def test_recipe_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown key 'sise'. Did you mean 'size'"):
        load_recipe(RECIPE, ["sise=64"])
    with pytest.raises(ConfigError, match="depth.type: unknown preprocessor 'depth-anythin'"):
        load_recipe(RECIPE, ["depth=depth-anythin"])
    bare = tmp_path / "bare.yaml"
    bare.write_text("loop: preprocess\n")
    with pytest.raises(ConfigError, match="bare.yaml: image: missing required setting"):
        load_recipe(bare)
    assert main(["run", str(RECIPE), f"image={tmp_path / 'nowhere.jpg'}", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert main(["run", str(RECIPE), f"image={tmp_path}", "--out", str(tmp_path / "p"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].endswith("nowhere.jpg: no such image file") and "is a folder, not an image file" in err[1]
    assert len(err) == 2
