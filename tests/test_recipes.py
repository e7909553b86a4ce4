"""Every shipped recipe validates, and names only components that are installed."""

from __future__ import annotations

import pytest

from conftest import ROOT
from gen3d.errors import ConfigError
from gen3d.plugins import get_component
from gen3d import load_recipe

# Keys a recipe leaves for the command line.
REQUIRED = {"dreamfusion.yaml": ["prompt=a hamburger"], "clip-nerf.yaml": ["prompt=a red ball"]}
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


def test_the_shipped_recipes_are_the_documented_ones():
    readme = (ROOT / "README.md").read_text()
    assert {"nerf-reconstruct.yaml", "nerf-two-stage.yaml", "dreamfusion.yaml", "clip-nerf.yaml",
            "preprocess.yaml"} <= set(RECIPES)
    for name in RECIPES:
        assert f"recipes/{name}" in readme, f"README does not mention recipes/{name}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates(name):
    recipe = load_recipe(ROOT / "recipes" / name, REQUIRED.get(name, []))
    for stage in recipe.stages:
        assert get_component("loop", stage.settings.loop)
        trains = getattr(stage.component.config, "TRAINS", True)
        assert stage.settings.steps >= 1 or not trains
        # The resolved recipe (what a run folder keeps) reads back to the same settings.
        assert "loop: " + stage.settings.loop in recipe.to_yaml()


def test_a_misspelt_key_in_a_text_recipe_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"guidance\.guidance_scal.*Did you mean 'guidance_scale'"):
        load_recipe(ROOT / "recipes" / "dreamfusion.yaml", ["guidance.guidance_scal=7.5"])


def test_a_renamed_key_from_an_older_run_folder_still_loads(tmp_path):
    """Run folders keep the recipe they ran with: export.decimate became export.target_faces."""
    text = (ROOT / "recipes" / "nerf-reconstruct.yaml").read_text()
    old = tmp_path / "recipe.yaml"
    old.write_text(text.replace("export:\n", "export:\n  decimate: null\n", 1)
                   .replace("../assets/toy", str(ROOT / "assets" / "toy")))
    assert load_recipe(old).first.export.target_faces is None
    assert load_recipe(old).first.export.colors == "vertex"  # what such runs exported
    assert load_recipe(old, ["export.decimate=1234"]).first.export.target_faces == 1234
