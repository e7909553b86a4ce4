"""Speed and memory of the image-to-3D recipes with the real model's sizes: seconds a step, peak memory, JSON.

    python benchmarks/bench_zero123_speed.py                      # tiny random Zero-1-to-3 (CPU)
    python benchmarks/bench_zero123_speed.py --real-architecture  # Zero-1-to-3 XL-sized random model (use a GPU)
    python benchmarks/bench_zero123_speed.py --steps 30 -- stages.optimise.views.batch=4   # overrides after --

Runs ``recipes/zero123.yaml`` on the shipped example photo (preprocess, then the image-to-3d
stage) for --steps steps in a fresh process, so peak RSS and VRAM belong to the run. Step times
come from a ``gen3d_on_step`` hook (median after three warm-up steps). With --real-architecture the
UNet (SD 1.x, 8 input channels, 768-wide context), VAE and CLIP ViT-L/14 image encoder are built
from Zero-1-to-3 XL's published configs with random weights and saved in ashawkey's diffusers
layout, then loaded like a download: the figures are time and memory, not quality (quality:
``bench_image_to_3d.py``, with ``view-teacher``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_text_to_3d import make_timer, peak_memory

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "preprocess" / "example.jpg"


def run_case(model: str, steps: int, overrides: list[str]) -> dict:
    import torch

    from gen3d import load_recipe, run_recipe

    timer = make_timer()
    recipe = load_recipe(ROOT / "recipes" / "zero123.yaml", [
        f"image={PHOTO}", f"stages.optimise.guidance.model={model}", f"stages.optimise.steps={steps}",
        f"stages.optimise.checkpoint_every={steps}", "stages.optimise.preview.turntable_frames=0",
        "stages.optimise.export.formats=[ply]", "stages.optimise.export.resolution=128", *overrides])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        metrics = run_recipe(recipe, Path(out), quiet=True)["stages"]["optimise"]
    median = timer.median_step_seconds()
    stage = recipe.stages[1].loop
    report = {"recipe": "zero123.yaml", "steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
              "seconds_per_step_median": round(median, 4) if median else None,
              "steps_per_second": round(1 / median, 3) if median else None,
              "views_per_step": stage.views.batch, "view_size": stage.views.sizes[0],
              "reference_size": stage.reference.size, "renderer": metrics["renderer"], **peak_memory()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--real-architecture", action="store_true", help="Zero-1-to-3 XL-sized random model")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: the run, in a child process
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.case:
        print("GEN3D " + json.dumps(run_case(args.case, args.steps, args.overrides)))
        return

    import torch

    from gen3d.testing import make_tiny_zero123

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_zero123(Path(tmp) / "zero123", architecture="zero123-xl" if args.real_architecture else "tiny")
        extra = [] if args.real_architecture else ["stages.optimise.guidance.image_size=32"]
        proc = subprocess.run([sys.executable, __file__, "--case", str(model), "--steps", str(args.steps), "--",
                               *extra, *args.overrides], capture_output=True, text=True, check=False)
    lines = [line[6:] for line in proc.stdout.splitlines() if line.startswith("GEN3D ")]
    if proc.returncode or not lines:
        sys.exit(f"bench_zero123_speed: the run failed:\n{proc.stderr[-3000:]}")
    print(json.dumps({"benchmark": "image-to-3d speed", "models": "zero123-xl-architecture-random"
                      if args.real_architecture else "tiny-random", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "case": json.loads(lines[0])}, indent=2))


if __name__ == "__main__":
    main()
