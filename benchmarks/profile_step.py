"""Where a training step's time goes: profile N steps after training to step S, per phase, as JSON.

    python benchmarks/profile_step.py --at 400 --steps 20          # in the 128^3 stage
    python benchmarks/profile_step.py --at 100 -- train.rays_per_step=8192

Phases are the ``gen3d.*`` record_function labels of the reconstruct loop and the renderer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "assets" / "toy")
    parser.add_argument("--at", type=int, default=400, help="train this many steps first")
    parser.add_argument("--steps", type=int, default=20, help="then profile this many")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from gen3d import load_recipe
    from gen3d.testing import build_loop
    from gen3d.trainer import pick_device

    recipe = load_recipe(ROOT / "recipes" / "nerf-reconstruct.yaml", [f"data.path={args.data.resolve()}", *args.overrides])
    torch.manual_seed(recipe.settings.seed)
    with tempfile.TemporaryDirectory() as out:
        loop = build_loop(recipe, Path(out), str(pick_device(recipe.settings.device)))
        for step in range(args.at):
            loop.step(step)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(args.at, args.at + args.steps):
                metrics = loop.step(step)
    phases = {e.key: round(e.cpu_time_total / 1000 / args.steps, 2) for e in prof.key_averages()
              if e.key.startswith("gen3d.")}
    top_ops = sorted((e for e in prof.key_averages() if not e.key.startswith("gen3d.")),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    print(json.dumps({"at_step": args.at, "profiled_steps": args.steps, "resolution": loop.field.resolution,
                      "samples_per_ray": round(metrics["samples_per_ray"], 2), "ms_per_step": phases,
                      "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / args.steps, 2)
                                              for e in top_ops}}, indent=2))


if __name__ == "__main__":
    main()
