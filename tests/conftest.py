"""Shared fixtures: real tools (Blender, the glTF validator) and a small rendered data set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VALIDATOR_DIR = ROOT / ".ci" / "node"


def _need(tool: str, how: str):
    # Locally a missing tool skips its check; in CI (which installs them) it is a failure.
    if os.environ.get("CI"):
        pytest.fail(f"{tool} is not installed in CI: {how}")
    pytest.skip(f"{tool} not installed ({how})")


@pytest.fixture(scope="session")
def blender() -> str:
    path = shutil.which("blender")
    if not path:
        _need("blender", "apt-get install blender python3-numpy")
    return path


@pytest.fixture(scope="session")
def gltf_validator() -> Path:
    if not shutil.which("node") or not (VALIDATOR_DIR / "node_modules" / "gltf-validator").is_dir():
        _need("gltf-validator", "npm install --prefix .ci/node gltf-validator")
    return VALIDATOR_DIR


def validate_gltf(files: list[Path]) -> list[dict]:
    env = {**os.environ, "NODE_PATH": str(VALIDATOR_DIR / "node_modules")}
    proc = subprocess.run(["node", str(ROOT / "tests" / "tools" / "validate_gltf.js"), *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=120)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert reports, proc.stderr
    return reports


def blender_import(blender: str, files: list[Path]) -> list[dict]:
    proc = subprocess.run([blender, "-b", "--factory-startup", "--python",
                           str(ROOT / "tests" / "tools" / "blender_import.py"), "--", *map(str, files)],
                          capture_output=True, text=True, timeout=300)
    reports = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("GEN3D ")]
    assert len(reports) == len(files), proc.stdout[-3000:] + proc.stderr[-3000:]
    return reports


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A 32 px rendering of the toy object (few views), made by the same script as the shipped one."""
    out = tmp_path_factory.mktemp("data") / "toy32"
    subprocess.run([sys.executable, str(ROOT / "assets" / "make_dataset.py"), "--object", "toy", "--out", str(out),
                    "--size", "32", "--train", "24", "--val", "2", "--test", "4"], check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.fixture
def register():
    """Register plugin objects in this process for one test."""
    from gen3d import plugins

    yield plugins.register
    plugins.unregister_all_extra()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion folder (diffusers layout), loaded like any hub checkpoint."""
    from gen3d.testing import make_tiny_stable_diffusion

    return make_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP folder (transformers layout: model, tokenizer, image processor)."""
    from gen3d.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
