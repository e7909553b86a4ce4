"""Runs lose nothing: checkpoints, --resume to the same result, NaN stops cleanly, Ctrl-C saves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from gen3d import plugins
from gen3d.errors import Gen3DError, TrainingDiverged
from gen3d.io import load_checkpoint
from gen3d import load_recipe
from gen3d import run_recipe
from gen3d.trainer import Interrupted

sys.path.insert(0, str(Path(__file__).resolve().parent / "thirdparty"))
import gen3d_example_plugin as example  # noqa: E402


@pytest.fixture(autouse=True)
def example_plugin():
    plugins.register(example)
    yield
    plugins.unregister_all_extra()


def recipe(tmp_path, *overrides):
    path = tmp_path / "r.yaml"
    path.write_text("loop: fit-sphere\nsteps: 40\ncheckpoint_every: 10\nexport: {resolution: 32, level: 50.0, formats: [xyz]}\n")
    return load_recipe(path, list(overrides))


def test_resume_continues_to_the_same_result(tmp_path):
    straight = run_recipe(recipe(tmp_path), tmp_path / "a", quiet=True)
    run_recipe(recipe(tmp_path, "steps=20"), tmp_path / "b", quiet=True)
    resumed = run_recipe(recipe(tmp_path), tmp_path / "b", resume=True, quiet=True)
    assert resumed["steps"] == 40
    assert resumed["radius"] == pytest.approx(straight["radius"], abs=1e-6)
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert state["step"] == 40


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    run_recipe(recipe(tmp_path, "steps=5"), tmp_path / "a", quiet=True)
    with pytest.raises(Gen3DError, match="already holds a run; pass --resume"):
        run_recipe(recipe(tmp_path, "steps=5"), tmp_path / "a", quiet=True)
    with pytest.raises(Gen3DError, match="no checkpoint"):
        run_recipe(recipe(tmp_path), tmp_path / "empty", resume=True, quiet=True)


def test_nan_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 25.*last good checkpoint"):
        run_recipe(recipe(tmp_path, "nan_at_step=25"), tmp_path / "a", quiet=True)
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")
    assert state["step"] == 20
    assert torch.isfinite(state["loop"]["field"]["radius"])


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    original = example.FitSphere.step

    def interrupt_at_13(self, step):
        if step == 13:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(example.FitSphere, "step", interrupt_at_13)
    with pytest.raises(Interrupted, match="interrupted at step 13; checkpoint saved"):
        run_recipe(recipe(tmp_path), tmp_path / "a", quiet=True)
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")["step"] == 13
    monkeypatch.setattr(example.FitSphere, "step", original)
    metrics = run_recipe(recipe(tmp_path), tmp_path / "a", resume=True, quiet=True)
    assert metrics["steps"] == 40
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["steps"] == 40


def test_a_real_ctrl_c_mid_step_stops_after_that_step_and_resume_is_exact(tmp_path, monkeypatch):
    """SIGINT lands in the middle of step 13 (before its update): the step still finishes, the
    checkpoint holds 14 whole steps, and the resumed run ends exactly where a straight one does."""
    import os
    import signal

    straight = run_recipe(recipe(tmp_path), tmp_path / "straight", quiet=True)
    original = example.FitSphere.step

    def sigint_inside_step_13(self, step):
        if step == 13:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    monkeypatch.setattr(example.FitSphere, "step", sigint_inside_step_13)
    with pytest.raises(Interrupted, match="interrupted at step 14; checkpoint saved"):
        run_recipe(recipe(tmp_path), tmp_path / "a", quiet=True)
    monkeypatch.setattr(example.FitSphere, "step", original)
    resumed = run_recipe(recipe(tmp_path), tmp_path / "a", resume=True, quiet=True)
    assert resumed["radius"] == straight["radius"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back


def test_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch):
    import os
    import signal

    original = example.FitSphere.step

    def two_sigints_inside_step_13(self, step):
        if step == 13:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    monkeypatch.setattr(example.FitSphere, "step", two_sigints_inside_step_13)
    with pytest.raises(Interrupted, match="interrupted at step 13; checkpoint saved"):
        run_recipe(recipe(tmp_path), tmp_path / "a", quiet=True)


def test_max_seconds_and_timed_evaluations(tmp_path):
    metrics = run_recipe(recipe(tmp_path, "steps=100000", "max_seconds=0.5", "eval_at_seconds=[0.1, 0.2]"),
                         tmp_path / "a", quiet=True)
    assert metrics["steps"] < 100000
    assert [m["seconds"] for m in metrics["timeline"]] == [0.1, 0.2]
    assert "radius_error" in metrics["timeline"][0]


def test_lifecycle_hooks_see_every_step(tmp_path):
    example.STEPS_SEEN.clear()
    run_recipe(recipe(tmp_path, "steps=7"), tmp_path / "a", quiet=True)
    assert example.STEPS_SEEN == list(range(1, 8))
