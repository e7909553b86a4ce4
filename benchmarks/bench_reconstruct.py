"""Benchmark of the reconstruction recipe: time, memory and quality as JSON.

    python benchmarks/bench_reconstruct.py                         # shipped toy data, default recipe
    python benchmarks/bench_reconstruct.py --data assets/plain --repeat 3
    python benchmarks/bench_reconstruct.py -- steps=300            # any recipe override after --
    python benchmarks/bench_reconstruct.py --keep runs/bench        # keep the run folders (mesh, previews)
    python benchmarks/bench_reconstruct.py --recipe recipes/nerf-two-stage.yaml   # a multi-stage recipe

Reports train seconds, steps/s, field evaluations per ray, peak RSS (and peak VRAM on CUDA), PSNR on the held-out
views at 15 s, 30 s, 60 s of training and at the end (evaluation time excluded), Chamfer
distance of the exported mesh to the data set's ground truth (in units of its bounding radius),
and export seconds. With --repeat N it reports the median of N runs (and every run).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(recipe_path: Path, data: Path, overrides: list[str], keep: Path | None = None) -> dict:
    from gen3d import load_recipe
    from gen3d import run_recipe

    import yaml

    stages = len(yaml.safe_load(recipe_path.read_text()).get("stages") or [])
    if stages:  # a multi-stage recipe: every stage reads the data; the timeline is the last stage's
        where = [f"stages.{i}.data.path={data.resolve()}" for i in range(stages)]
        where.append(f"stages.{stages - 1}.eval_at_seconds=[15, 30, 60]")
    else:
        where = [f"data.path={data.resolve()}", "eval_at_seconds=[15, 30, 60]"]
    recipe = load_recipe(recipe_path, [*where, *overrides])
    if keep is not None:  # a fresh numbered folder per run, kept for a look at the mesh and previews
        out = keep / f"run{len(list(keep.glob('run*')))}"
        m = run_recipe(recipe, out, quiet=True)
    else:
        with tempfile.TemporaryDirectory() as out:
            m = run_recipe(recipe, Path(out), quiet=True)
    at = {f"psnr_{int(e['seconds'])}s": round(e["psnr_test"], 2) for e in m.get("timeline", [])}
    per_stage = m.get("stages", {})
    if per_stage:  # the whole run's training, and each stage's end PSNR
        at.update({f"psnr_{name}": s.get("psnr_test") for name, s in per_stage.items()})
        at.update({f"chamfer_{name}": s["chamfer"] for name, s in per_stage.items() if "chamfer" in s})
        at.update({f"chamfer_start_{name}": s["chamfer_start"] for name, s in per_stage.items() if "chamfer_start" in s})
        m = {**m, "steps": sum(s["steps"] for s in per_stage.values()),
             "train_seconds": round(sum(s["train_seconds"] for s in per_stage.values()), 3)}
    return {
        "data": str(data), "steps": m["steps"], "train_seconds": m["train_seconds"],
        "steps_per_second": round(m["steps"] / m["train_seconds"], 2),
        "samples_per_ray": m.get("samples_per_ray"), **at, "psnr_end": m.get("psnr_test"), "ssim_end": m.get("ssim_test"),
        "chamfer": m.get("chamfer"), "export_seconds": m["export_seconds"], "mesh_faces": m["mesh_faces"],
        "renderer": m["renderer"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **peak_vram(),
    }


def peak_vram() -> dict:
    """Peak GPU memory torch allocated in this process (CUDA runs only)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "assets" / "toy")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "nerf-reconstruct.yaml")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep each run's folder under this folder (run0, run1, ...)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import torch

    runs = [one_run(args.recipe, args.data, args.overrides, args.keep) for _ in range(args.repeat)]
    numeric = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    median = {k: (statistics.median(r[k] for r in runs if r.get(k) is not None) if any(r.get(k) is not None for r in runs)
                  else None) for k in numeric}
    report = {"benchmark": args.recipe.stem, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": "cuda" if torch.cuda.is_available() else "cpu", "median": median}
    if len(runs) > 1:
        report["runs"] = runs
    else:
        report.update(runs[0])
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
