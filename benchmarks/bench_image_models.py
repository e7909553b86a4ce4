"""Seconds per Text2NeRF view and peak VRAM of the image models, with SD-2.x-sized random weights.

    python benchmarks/bench_image_models.py [--architecture sd2|tiny] [--device cuda|cpu] [--size 512] [--steps 50] [--candidates 4]

One "view" = one inpainting call with N candidates + CLIP ranking of them; the first view is one
text-to-image call. Random weights: the images are noise, the cost is a real checkpoint's.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gen3d.testing import make_tiny_clip, make_tiny_sd
from gen3d_plugins.preprocess_stage import build


def timed(call, device: str, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", default="sd2", choices=["sd2", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="d2-bench-"))
    start = time.perf_counter()
    sd = make_tiny_sd(root / "sd", architecture=args.architecture)
    inpainting = make_tiny_sd(root / "inpainting", inpainting=True, architecture=args.architecture)
    clip = make_tiny_clip(root / "clip")  # ranking cost is negligible next to the UNet
    build_s = time.perf_counter() - start
    common = {"device": args.device, "size": args.size, "steps": args.steps}
    t2i = build("text-to-image", {"type": "sd-text-to-image", "model": str(sd), "candidates": 1, **common})
    inpainter = build("inpainter", {"type": "sd-inpainter", "model": str(inpainting), "clip_model": str(clip),
                                    "candidates": args.candidates, **common})
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t2i.generate("warm up", 0)
    first_s, first = timed(lambda: t2i.generate("a cosy living room", 1), args.device, args.repeats)
    mask = np.zeros(first.shape[:2], bool)
    mask[:, : first.shape[1] // 3] = True  # a third of the view is a hole, as after a sideways step
    view_s, best = timed(lambda: inpainter.rank_candidates(
        inpainter.inpaint_candidates(first, mask, "a cosy living room", 2), first), args.device, args.repeats)
    result = {
        "architecture": args.architecture, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": str(inpainter.pipe.unet.dtype), "size": args.size, "steps": args.steps,
        "candidates": args.candidates, "unet_parameters": sum(p.numel() for p in inpainter.pipe.unet.parameters()),
        "first_view_s_median": statistics.median(first_s), "view_s_median": statistics.median(view_s),
        "view_s_all": [round(t, 3) for t in view_s], "build_folders_s": round(build_s, 1), "best": best,
        "peak_vram_gib": (torch.cuda.max_memory_allocated() / 2**30) if args.device == "cuda" else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
