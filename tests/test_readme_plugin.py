"""The README's "Writing a plugin" example, as a new user would use it: copied from the README into
its own package, installed with pip, listed by `gen3d plugins` and run in a recipe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### A complete example: an `xyz` exporter", 1)[1].split("\n## ", 1)[0]
    blocks = dict(re.findall(r"```(python|toml)\n(.*?)```", section, flags=re.S))
    assert set(blocks) == {"python", "toml"}, "the README's plugin example lost a code block"
    return {"gen3d_xyz.py": blocks["python"], "pyproject.toml": blocks["toml"]}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    package = tmp_path_factory.mktemp("gen3d-xyz")
    for name, text in readme_example().items():
        (package / name).write_text(text)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True, capture_output=True, timeout=300)
    return target


def gen3d(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "gen3d", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_readme_plugin_is_listed(site, tmp_path):
    proc = gen3d(site, tmp_path, "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "xyz 0.1.0 (gen3d_xyz)" in proc.stdout
    assert re.search(r"exporter\s+xyz\s+vertex positions", proc.stdout)


@pytest.mark.slow
def test_readme_plugin_exports_with_its_settings(site, tmp_path, small_dataset):
    recipe = str(ROOT / "recipes" / "nerf-reconstruct.yaml")
    small = [f"data.path={small_dataset}", "steps=30", "max_seconds=null", "export.resolution=48",
             "preview.turntable_frames=0", "representation.resolutions=[16, 24, 32]"]
    proc = gen3d(site, tmp_path, "run", recipe, "export.formats=[glb, xyz]", "export.options.xyz.precision=3",
                 *small, "--out", "run", "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "run" / "mesh.xyz").read_text().splitlines()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(lines) == metrics["mesh_vertices"]
    assert all(len(v.split(".")[1]) == 3 for v in lines[0].split())
    bad = gen3d(site, tmp_path, "run", recipe, "export.formats=[xyz]", "export.options.xyz.precision=12",
                *small, "--out", "bad")
    assert bad.returncode == 2 and "export.options.xyz: precision must be 0..9 decimals, got 12" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before any work
