"""Benchmark of the text-to-3D recipes: seconds per step and peak memory, as JSON.

    python benchmarks/bench_text_to_3d.py                      # CPU: tiny random SD and CLIP, batch 1 and 4
    python benchmarks/bench_text_to_3d.py --real-architecture  # SD 2.1-base-sized random models (use a GPU)
    python benchmarks/bench_text_to_3d.py --steps 50 -- cameras.sizes=[128]   # recipe overrides after --

Each case runs the recipe (rendering, guidance, backward, optimiser) for --steps steps in a
fresh process, so peak RSS and peak VRAM belong to that case alone. Step times come from a
``gen3d_on_step`` hook: the median after three warm-up steps (and the plain mean). The models are random:
the figures are about time and memory, not quality. With --real-architecture the UNet, VAE
and text encoder are built from Stable Diffusion 2.1-base's published configs (64x64 latents,
512 px VAE input) and saved in the diffusers layout, then loaded like a downloaded checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Stable Diffusion 2.1-base, from its published unet/vae/text_encoder config.json files.
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                 attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=512)


def make_real_architecture(folder: Path) -> Path:
    """SD 2.1-base-shaped random models in the diffusers layout (fp16 on disk to save space)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from gen3d.testing import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(folder / "tokenizer")
    n = len(tokenizer)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
                                        **SD21_TEXT))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD21_VAE), text_encoder=text, tokenizer=tokenizer, unet=UNet2DConditionModel(**SD21_UNET),
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)
    return folder


class StepTimer:
    """A plugin registered for the benchmark only: the wall-clock time at the end of every step."""

    def __init__(self):
        self.times: list[float] = []

    def median_step_seconds(self, warmup: int = 3) -> float | None:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])][warmup:]
        return statistics.median(gaps) if gaps else None


def make_timer() -> StepTimer:
    from gen3d import hookimpl

    timer = StepTimer()

    class Hooks:
        @hookimpl
        def gen3d_on_step(self, run, step, metrics):
            timer.times.append(time.perf_counter())

    from gen3d.plugins import register

    register(Hooks())
    return timer


def run_case(recipe: str, model: str, batch: int, steps: int, overrides: list[str]) -> dict:
    import torch

    from gen3d import load_recipe
    from gen3d import run_recipe

    timer = make_timer()

    rec = load_recipe(ROOT / "recipes" / recipe, [
        f"guidance.model={model}", f"steps={steps}", f"cameras.batch={batch}", "prompt=a hamburger",
        "max_seconds=null", f"checkpoint_every={steps}", "preview.turntable_frames=0", "export.formats=[ply]",
        "export.resolution=128", *overrides])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        m = run_recipe(rec, Path(out), quiet=True)
    report = {"recipe": recipe, "batch": batch, "steps": m["steps"], "train_seconds": m["train_seconds"],
              "seconds_per_step_mean": round(m["train_seconds"] / m["steps"], 4)}
    median = timer.median_step_seconds()
    report.update({"seconds_per_step_median": round(median, 4) if median else None,
                   "steps_per_second": round(1 / median, 3) if median else None,
                   "image_size": rec.loop.cameras.sizes[0], "renderer": m["renderer"], **peak_memory()})
    return report


def peak_memory() -> dict:
    """This process's peak RSS, and its peak VRAM and the GPU's name where there is one."""
    import torch

    report = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        report["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        report["gpu"] = torch.cuda.get_device_name()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--real-architecture", action="store_true", help="SD 2.1-base-sized random models")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case in a child process
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.case:
        recipe, model, batch = args.case.split("|")
        print("GEN3D " + json.dumps(run_case(recipe, model, int(batch), args.steps, args.overrides)))
        return

    import torch

    from gen3d.testing import make_tiny_clip, make_tiny_stable_diffusion

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.real_architecture:
            models = [("dreamfusion.yaml", make_real_architecture(tmp / "sd21-random"))]
        else:
            models = [("dreamfusion.yaml", make_tiny_stable_diffusion(tmp / "sd")),
                      ("clip-nerf.yaml", make_tiny_clip(tmp / "clip"))]
        cases = []
        for recipe, model in models:
            for batch in args.batches:
                proc = subprocess.run([sys.executable, __file__, "--case", f"{recipe}|{model}|{batch}",
                                       "--steps", str(args.steps), "--", *args.overrides],
                                      capture_output=True, text=True, check=False)
                lines = [line[6:] for line in proc.stdout.splitlines() if line.startswith("GEN3D ")]
                if proc.returncode or not lines:
                    sys.exit(f"case {recipe} batch {batch} failed:\n{proc.stderr[-3000:]}")
                cases.append(json.loads(lines[0]))
    print(json.dumps({"benchmark": "text-to-3d", "models": "sd21-architecture-random" if args.real_architecture
                      else "tiny-random", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
