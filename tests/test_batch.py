"""``gen3d batch``: inputs and names, a local batch cut by SIGINT and continued, the same batch on Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen3d import ConfigError, Gen3DError
from gen3d.batch import (BatchConfig, Manifest, RayEngine, plan_runs, read_inputs, run_batch, run_name, size_pool,
                         split_values, sweep_grid, unique_names, validate)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "nerf-reconstruct.yaml"
STEPS = 150


def tiny(data: Path) -> list[str]:
    """The reconstruction recipe made tiny (as tests/test_stages.py's small()), long enough to cut."""
    return [f"data.path={data}", f"steps={STEPS}", "checkpoint_every=10", "max_seconds=null",
            "representation.resolutions=[12, 16]", "representation.upsample_at=[3]",
            "render.samples_per_diagonal=48", "render.occupancy_resolution=16", "render.edge_supersample=1",
            "render.eval_offsets=1", "train={rays_per_step: 256, tighten_box_at: null}",
            "export={resolution: 32, formats: [glb]}", "preview={turntable_frames: 2, test_images: 1}"]


@pytest.fixture(scope="module")
def batch_inputs(small_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """The 32 px toy without its ground-truth mesh (no Chamfer: a second less a run), and an inputs
    file of three runs, one with a data folder that does not exist, plus one that does not validate."""
    root = tmp_path_factory.mktemp("batch")
    data = root / "toy32"
    shutil.copytree(small_dataset, data, ignore=shutil.ignore_patterns("mesh.ply"))
    inputs = root / "runs.yaml"
    inputs.write_text("- {seed: 0}\n- {seed: 1}\n- {seed: 2, data.path: /nonexistent/gen3d-data}\n"
                      "- {seed: 3, representation.lr: fast}\n")
    return data, inputs


GOOD, MISSING, INVALID = ("seed-0", "seed-1"), "seed-2_path-nonexistent-gen3d-data", "seed-3_lr-fast"


def by_name(manifest: dict) -> dict[str, dict]:
    return {r["name"]: r for r in manifest["runs"]}


# --- inputs, sweeps, names -------------------------------------------------------------------------

def test_inputs_from_yaml_and_csv(tmp_path):
    yaml_file = tmp_path / "runs.yaml"
    yaml_file.write_text('- {seed: 0, prompt: a red chair}\n- seed=1 prompt="a blue cup"\n'
                         '- [seed=2, "representation.resolutions=[12, 16]"]\n- {prompt: "yes", lr: [1, 2]}\n')
    assert read_inputs(yaml_file) == [["seed=0", "prompt=a red chair"], ["seed=1", "prompt=a blue cup"],
                                      ["seed=2", "representation.resolutions=[12, 16]"],
                                      ['prompt="yes"', "lr=[1, 2]"]]  # "yes" stays a string
    csv_file = tmp_path / "runs.csv"
    csv_file.write_text("seed,data.path\n0,/data/lego\n1,\n")  # an empty cell sets nothing
    assert read_inputs(csv_file) == [["seed=0", "data.path=/data/lego"], ["seed=1"]]


def test_bad_inputs_get_one_line(tmp_path):
    cases = {"runs.yaml": ("seed: 0\n", "expected a list of runs"),
             "bad.yaml": ("- {seed: 0}\n- nokey\n", "run 2: override 'nokey' must look like key.sub=value"),
             "runs.csv": ("seed\n0,1\n", "line 2: more cells than the header has keys")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message) as info:
            read_inputs(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="--inputs: file not found"):
        read_inputs(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="--sweep 'seed': expected key=v1,v2"):
        sweep_grid(["seed"])


def test_sweeps_make_a_product():
    assert split_values("[12, 16],[24],'a, b',{x: 1}") == ["[12, 16]", "[24]", "'a, b'", "{x: 1}"]
    assert sweep_grid(["seed=0,1", "representation.lr=0.1,0.2"]) == [
        ["seed=0", "representation.lr=0.1"], ["seed=0", "representation.lr=0.2"],
        ["seed=1", "representation.lr=0.1"], ["seed=1", "representation.lr=0.2"]]
    config = BatchConfig(recipe=RECIPE, out=Path("x"), sweeps=["seed=0,1"], overrides=["max_seconds=20"])
    runs = plan_runs(config)
    assert [(r["name"], r["overrides"]) for r in runs] == [("seed-0", ["max_seconds=20", "seed=0"]),
                                                          ("seed-1", ["max_seconds=20", "seed=1"])]
    with pytest.raises(ConfigError, match="no runs: give them with --inputs"):
        plan_runs(BatchConfig(recipe=RECIPE, out=Path("x")))


def test_run_names_are_short_safe_unique_and_stable():
    assert run_name(["seed=0"]) == "seed-0"
    assert run_name(["prompt=A red chair!"]) == "prompt-a-red-chair"
    assert run_name(["data.path=../data/Lego Set", "seed=1"]) == "path-data-lego-set_seed-1"
    assert run_name([]) == "run"
    long = run_name(["prompt=" + "a very long prompt about a chair " * 4])
    assert len(long) <= 48 and long == run_name(["prompt=" + "a very long prompt about a chair " * 4])
    # "a/b" and "a b" make the same slug: both get a hash of their own inputs
    names = unique_names([["prompt=a/b"], ["prompt=a b"], ["seed=0"]])
    assert names[0] != names[1] and names[0].startswith("prompt-a-b-") and names[2] == "seed-0"
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_.") for n in names)
    with pytest.raises(ConfigError, match="runs 1 and 2 have the same inputs"):
        unique_names([["seed=0"], ["seed=0"]])


def test_pool_sizing_never_oversubscribes():
    assert size_pool(4, None, None, cores=2, gpus=0) == (2, 1)  # DEFAULT_THREADS = 1: a run per core
    assert size_pool(1, None, None, cores=2, gpus=0) == (1, 2)  # one run left: it gets both cores
    assert size_pool(9, None, 2, cores=8, gpus=0) == (4, 2)
    assert size_pool(9, 3, None, cores=8, gpus=0) == (3, 2)
    assert size_pool(9, None, None, cores=16, gpus=2) == (2, 8)  # a worker per GPU
    assert size_pool(9, None, None, cores=16, gpus=0, memory_slots=3) == (3, 5)  # no more than memory holds


def test_validation_and_manifest_checks(tmp_path, batch_inputs):
    data, inputs = batch_inputs
    runs = plan_runs(BatchConfig(recipe=RECIPE, out=tmp_path, inputs=inputs, overrides=tiny(data)))
    validate(RECIPE, runs)
    assert [r["state"] for r in runs] == ["queued", "queued", "queued", "failed"]  # the missing folder: at run time
    assert runs[3]["error"].endswith("representation.lr: expected a number, got 'fast' (str)")
    Manifest.open(tmp_path, "r.yaml", "local", runs)
    again = plan_runs(BatchConfig(recipe=RECIPE, out=tmp_path, inputs=inputs, overrides=["steps=9"]))
    with pytest.raises(ConfigError, match="run 'seed-0' was made with other overrides"):
        Manifest.open(tmp_path, "r.yaml", "local", again)
    with pytest.raises(ConfigError, match="holds a batch of r.yaml, not other.yaml"):
        Manifest.open(tmp_path, "other.yaml", "local", runs)


def test_ray_engine_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(Gen3DError, match=r"pip install 'gen3d\[ray\]'"):
        RayEngine(None, None, None, 2.0, pending=1, want_gpu=False)


# --- whole batches ---------------------------------------------------------------------------------

def gen3d_batch(out: Path, inputs: Path, data: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gen3d", "batch", str(RECIPE), "--inputs", str(inputs),
                             "--out", str(out), "--quiet", *tiny(data)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def attempts(folder: Path) -> int:
    return (folder / "batch.log").read_text().count("\n--- ") + 1


def layout(out: Path) -> dict[str, list[str]]:
    return {d.name: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
            for d in sorted(out.iterdir()) if d.is_dir()}


@pytest.fixture(scope="module")
def local_batch(batch_inputs, tmp_path_factory) -> dict:
    """The batch run locally, cut by SIGINT while both good runs train, then run again to the end."""
    data, inputs = batch_inputs
    out = tmp_path_factory.mktemp("local") / "batch"
    proc = gen3d_batch(out, inputs, data)
    checkpoints = [out / name / "checkpoints" / "last.safetensors" for name in GOOD]
    deadline = time.monotonic() + 60
    while not all(c.is_file() for c in checkpoints) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    cut_output = proc.communicate(timeout=60)[0]
    cut = {"code": proc.returncode, "output": cut_output, "manifest": json.loads((out / "batch.json").read_text()),
           "metrics": [(out / name / "metrics.json").is_file() for name in GOOD]}
    proc = gen3d_batch(out, inputs, data)  # continues: resumes the two, runs the third
    output = proc.communicate(timeout=120)[0]
    return {"out": out, "cut": cut, "code": proc.returncode, "output": output,
            "manifest": json.loads((out / "batch.json").read_text())}


@pytest.mark.slow
def test_local_batch_cut_by_sigint_then_rerun_does_each_run_once(local_batch, batch_inputs):
    out, cut = local_batch["out"], local_batch["cut"]
    assert cut["code"] == 130, cut["output"]
    states = {name: r["state"] for name, r in by_name(cut["manifest"]).items()}
    assert states == {GOOD[0]: "queued", GOOD[1]: "queued", MISSING: "queued", INVALID: "failed"}, cut["output"]
    assert cut["metrics"] == [False, False]  # cut mid-way: not finished

    manifest, output = local_batch["manifest"], local_batch["output"]
    assert local_batch["code"] == 1, output  # some runs failed
    assert set(manifest) == {"recipe", "engine", "runs"} and manifest["engine"] == "local"
    runs = by_name(manifest)
    assert list(runs) == [*GOOD, MISSING, INVALID]
    for name in GOOD:
        run = runs[name]
        assert run["state"] == "done" and run["error"] is None and run["folder"] == name
        assert run["metrics"]["steps"] == STEPS and run["metrics"]["psnr_test"] > 15 and run["seconds"] > 0
        assert attempts(out / name) == 2 and "resumed from" in (out / name / "batch.log").read_text()
    assert runs[MISSING]["state"] == "failed" and runs[MISSING]["error"].startswith("data set folder not found")
    assert runs[INVALID]["state"] == "failed" and "representation.lr" in runs[INVALID]["error"]
    assert "representation.lr" in output and "data set folder not found" in output
    assert [p for p in out.rglob(".*") if p.name != ".batch.lock"] == []  # no temporary file left behind
    if (ROOT / "gen3d" / "report.py").is_file():
        assert (out / "index.html").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "batch.json"}
    data, inputs = batch_inputs  # the same batch again, in this process (nothing to start: no subprocess)
    again = run_batch(BatchConfig(recipe=RECIPE, out=out, inputs=inputs, overrides=tiny(data), quiet=True))
    assert again == manifest == json.loads((out / "batch.json").read_text())
    assert [p for p, t in stamps.items() if p.stat().st_mtime_ns != t and p.name != "index.html"] == []
    assert attempts(out / MISSING) == 1  # a failed run is not retried unless --retry-failed


@pytest.fixture
def local_ray(monkeypatch):
    """A Ray on this machine for the test, on loopback only (no node address on the network)."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: node IP 127.0.0.1
    if os.environ.get("CI") and importlib.util.find_spec("ray") is None:
        pytest.fail("ray is not installed in CI: pip install -e '.[test]'")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_batch_gives_the_local_results_and_layout(tmp_path, batch_inputs, local_ray, local_batch):
    data, inputs = batch_inputs
    assert "node:127.0.0.1" in local_ray.cluster_resources()  # loopback only
    config = BatchConfig(recipe=RECIPE, out=tmp_path / "ray", inputs=inputs, overrides=tiny(data), engine="ray",
                         quiet=True)
    manifest = run_batch(config)
    assert manifest["engine"] == "ray"
    runs, local = by_name(manifest), by_name(local_batch["manifest"])
    assert [runs[n]["state"] for n in runs] == [local[n]["state"] for n in local] == ["done", "done", "failed", "failed"]
    for name in runs:  # the same runs, errors and files
        assert runs[name]["overrides"] == local[name]["overrides"] and runs[name]["error"] == local[name]["error"]
    for name in GOOD:  # the same results (the local runs were cut by Ctrl-C and resumed at a step boundary)
        assert runs[name]["metrics"]["steps"] == local[name]["metrics"]["steps"] == STEPS
        assert runs[name]["metrics"]["psnr_test"] == pytest.approx(local[name]["metrics"]["psnr_test"], abs=0.5)
    assert layout(config.out) == layout(local_batch["out"])

    stamps = {p: p.stat().st_mtime_ns for p in config.out.rglob("*") if p.is_file()}
    again = run_batch(config)  # a re-run redoes nothing
    assert again["runs"] == manifest["runs"]
    assert [p for p, t in stamps.items() if p.stat().st_mtime_ns != t and p.name not in ("batch.json", "index.html")] == []
