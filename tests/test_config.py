"""Recipe loading and validation: every mistake names the file, the key and what was expected."""

from pathlib import Path

import pytest

from gen3d.errors import ConfigError
from gen3d import load_recipe, parse_override

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "nerf-reconstruct.yaml"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_shipped_recipe_resolves_with_defaults():
    recipe = load_recipe(RECIPE)
    assert recipe.first.loop == "nerf-reconstruct"
    assert recipe.loop.representation.type == "grid-nerf"
    assert recipe.loop.representation.config.resolutions == [48, 80, 128]
    # Paths in the YAML resolve against the recipe's folder.
    assert recipe.loop.data.config.path == (ROOT / "assets" / "toy").resolve()
    data = recipe.to_dict()
    assert data["steps"] == 3000 and data["data"]["type"] == "nerf-synthetic"


def test_overrides_use_dotted_keys_and_yaml_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPE, ["steps=200", "representation.lr=0.05", "data.path=elsewhere",
                                  "export.formats=[glb]", "max_seconds=null"])
    assert recipe.first.steps == 200 and recipe.first.max_seconds is None
    assert recipe.loop.representation.config.lr == 0.05
    assert recipe.first.export.formats == ["glb"]
    # Command-line paths resolve against the working directory.
    assert recipe.loop.data.config.path == (tmp_path / "elsewhere").resolve()


@pytest.mark.parametrize("override, message", [
    (["stpes=3"], "unknown key 'stpes'. Did you mean 'steps'?"),
    (["steps=many"], "steps: expected a whole number, got 'many'"),
    (["steps=0"], "steps must be at least 1"),
    (["representation.lr=fast"], "representation.lr: expected a number, got 'fast'"),
    (["representation.resolushuns=[1]"], "Did you mean 'resolutions'?"),
    (["representation.type=grid-nerv"], "unknown representation 'grid-nerv'. Did you mean 'grid-nerf'?"),
    (["train.random_background=maybe"], "train.random_background: expected true or false"),
    (["device=tpu"], "device: expected one of 'auto', 'cpu', 'cuda'"),
    (["export.formats=[glb, usdz]"], "export.formats: unknown exporter 'usdz'. Known exporters: glb"),
    (["export.options.xyz.precision=3"], "export.options.xyz: options for 'xyz', which is not in export.formats"),
    (["export.options.glb.foo=3"], "export.options.glb: exporter 'glb' takes no settings"),
    (["representation.upsample_at=[10]"], "upsample_at needs 2 steps"),
    (["render.pixel_filter=gauss"], "render.pixel_filter: expected one of 'box', 'blackman-harris'"),
    (["render.pixel_filter_width=0"], "pixel filter width is in pixels, above 0"),
    (["train.opacity_entropy=-1"], "opacity_entropy is a loss weight, 0 or more; got -1"),
    (["render.eval_offsets=0"], "eval_offsets is renderings averaged, 1 to 16; got 0"),
    (["loop=nerf-reconstrukt"], "unknown loop 'nerf-reconstrukt'. Did you mean 'nerf-reconstruct'?"),
])
def test_bad_settings_name_file_key_and_expectation(override, message):
    if message is None:
        load_recipe(RECIPE, override)
        return
    with pytest.raises(ConfigError) as info:
        load_recipe(RECIPE, override)
    assert str(RECIPE) in str(info.value) or "loop" in override[0]
    assert message in str(info.value)


def test_unknown_component_lists_known_names():
    with pytest.raises(ConfigError, match=r"Known representations: grid-nerf"):
        load_recipe(RECIPE, ["representation.type=mesh-sdf"])


def test_bad_yaml_names_line(tmp_path):
    path = write(tmp_path, "loop: nerf-reconstruct\nsteps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"r.yaml: line \d+, column \d+: not valid YAML"):
        load_recipe(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "loop: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="a recipe must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="loop: missing"):
        load_recipe(write(tmp_path, "steps: 3\n"))


def test_missing_required_setting(tmp_path):
    path = write(tmp_path, "loop: nerf-reconstruct\ndata: {type: nerf-synthetic}\n")
    with pytest.raises(ConfigError, match=r"data.path: missing required setting"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override(text)


def test_override_value_with_colon_stays_text():
    assert parse_override("prompt=a cat: sitting") == ("prompt", "a cat: sitting")


def test_exponent_without_dot_is_a_number():
    recipe = load_recipe(RECIPE, ["representation.tv_weight=4e-4"])
    assert recipe.loop.representation.config.tv_weight == 4e-4
