"""Plugins: entry-point discovery of a third-party package, listing, clear errors for bad plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gen3d
from gen3d import plugins
from gen3d.errors import Gen3DError
from gen3d.specs import Component

HERE = Path(__file__).resolve().parent


def install_fake_distribution(site: Path, module_source: Path, name="gen3d-example-plugin", version="1.2.3"):
    """Make ``site`` look like a folder pip installed a package into: module + dist-info with entry points."""
    site.mkdir(parents=True, exist_ok=True)
    (site / module_source.name).write_text(module_source.read_text())
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[gen3d]\nexample = {module_source.stem}\n")
    return site


def gen3d_cli(args, site: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "gen3d", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture
def site(tmp_path):
    return install_fake_distribution(tmp_path / "site", HERE / "thirdparty" / "gen3d_example_plugin.py")


def test_third_party_plugin_is_listed_with_version(site, tmp_path):
    proc = gen3d_cli(["plugins", "--json"], site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    listing = {p["name"]: p for p in json.loads(proc.stdout)}
    assert listing["example"]["version"] == "1.2.3"
    provided = {(c["kind"], c["name"]) for c in listing["example"]["provides"]}
    assert provided == {("loop", "fit-sphere"), ("representation", "ball"), ("exporter", "xyz")}
    assert ("loop", "nerf-reconstruct") in {(c["kind"], c["name"]) for c in listing["nerf-reconstruct"]["provides"]}


def test_recipe_runs_a_third_party_component(site, tmp_path):
    recipe = tmp_path / "sphere.yaml"
    recipe.write_text("loop: fit-sphere\nsteps: 60\nrepresentation: {type: ball, radius: 0.3}\n"
                      "export: {resolution: 32, level: 50, formats: [xyz, glb], options: {xyz: {precision: 3}}}\n"
                      "preview: {turntable_frames: 2}\n")
    proc = gen3d_cli(["run", str(recipe), "--out", "run", "--quiet", "lr=0.05"], site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 60
    assert metrics["radius"] > 0.4  # it moved towards the 0.6 target
    # The loop wrote nothing itself: the core exported, previewed and measured the mesh.
    assert metrics["mesh_faces"] > 100 and metrics["export_seconds"] >= 0
    first = (tmp_path / "run" / "mesh.xyz").read_text().splitlines()[0]
    assert all(len(value.split(".")[1]) == 3 for value in first.split())  # the exporter got its config
    assert (tmp_path / "run" / "mesh.glb").stat().st_size > 0
    assert (tmp_path / "run" / "turntable.gif").stat().st_size > 0
    resolved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "lr: 0.05" in resolved and "type: ball" in resolved
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()


def test_unknown_loop_error_lists_known_names_from_cli(site, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loop: fit-spere\n")
    proc = gen3d_cli(["run", str(recipe)], site, tmp_path)
    assert proc.returncode == 2
    assert "unknown loop 'fit-spere'. Did you mean 'fit-sphere'?" in proc.stderr
    known = proc.stderr.split("Known loops: ")[1]
    assert "fit-sphere" in known and "nerf-reconstruct" in known
    assert "Traceback" not in proc.stderr


def test_duplicate_component_names_are_rejected(register):
    class Dup:
        @gen3d.hookimpl
        def gen3d_exporters(self):
            return [Component("glb", lambda config: None, None, "another glb")]

    register(Dup())
    with pytest.raises(Gen3DError, match="two plugins provide the exporter 'glb'"):
        plugins.get_registry()


def test_misspelt_hook_is_reported(register):
    class Typo:
        @gen3d.hookimpl
        def gen3d_representation(self):  # missing the final 's'
            return []

    register(Typo())
    with pytest.raises(Gen3DError, match="unknown hook.*gen3d_representation"):
        plugins.get_registry()


def test_bad_component_names_are_refused():
    with pytest.raises(ValueError, match="must be lower-case"):
        Component("My Field", lambda c: None)
    with pytest.raises(TypeError, match="config must be a dataclass"):
        Component("x", lambda c: None, config=dict)


def test_broken_third_party_plugin_is_named(tmp_path):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("raise ImportError('needs libfoo')\n")
    site = install_fake_distribution(tmp_path / "site", bad, name="broken-plugin")
    proc = gen3d_cli(["plugins"], site, tmp_path)
    assert proc.returncode == 2
    assert "could not load gen3d plugin 'example'" in proc.stderr and "needs libfoo" in proc.stderr


def test_a_failing_plugin_is_one_line_naming_it(site, tmp_path):
    recipe = tmp_path / "sphere.yaml"
    recipe.write_text("loop: fit-sphere\nsteps: 2\nexport: {resolution: 16, level: 50, formats: [xyz]}\n"
                      "preview: {turntable_frames: 0}\n")
    broken = site / "gen3d_example_plugin.py"
    broken.write_text(broken.read_text().replace('f.write(" ".join(', 'f.write(undefined_name.join('))
    proc = gen3d_cli(["run", str(recipe), "--out", "run", "--quiet"], site, tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert ("exporter 'xyz' from plugin example (package gen3d-example-plugin 1.2.3) failed while writing "
            "mesh.xyz: NameError") in last, proc.stderr
    assert "--debug" in last and "Traceback" not in proc.stderr
    proc = gen3d_cli(["run", str(recipe), "--out", "run2", "--quiet", "--debug"], site, tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "undefined_name" in proc.stderr


def test_exporter_settings_are_checked_before_training(site, tmp_path):
    recipe = tmp_path / "sphere.yaml"
    recipe.write_text("loop: fit-sphere\nsteps: 2\nexport: {formats: [xyz], options: {xyz: {precision: 12}}}\n")
    proc = gen3d_cli(["run", str(recipe), "--out", "run", "--quiet"], site, tmp_path)
    assert proc.returncode == 2
    assert "export.options.xyz: precision must be 0..9 decimals, got 12" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_representation_without_what_the_loop_needs_is_refused_at_validation(site, tmp_path):
    class Opaque:
        @gen3d.hookimpl
        def gen3d_representations(self):
            return [Component("occupancy-only", lambda config, **kw: None, None, "no radiance", provides=("surface",))]

    recipe = tmp_path / "r.yaml"
    recipe.write_text("loop: fit-sphere\nrepresentation: occupancy-only\n")
    sys.path.insert(0, str(site))  # the example package's dist-info: its entry point is found
    plugins.register(Opaque())
    try:
        with pytest.raises(Gen3DError, match="representation.type: representation 'occupancy-only' cannot be used "
                                             "by loop 'fit-sphere': it lacks radiance"):
            gen3d.load_recipe(recipe)
    finally:
        sys.path.remove(str(site))
        plugins.unregister_all_extra()
