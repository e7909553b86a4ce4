"""How well a trained reconstruction's silhouettes match the data: rendered opacity against the
images' alpha, on training and held-out views, as JSON.

    python benchmarks/bench_reconstruct.py --data DIR --keep runs/bench   # keeps runs/bench/run0
    python benchmarks/silhouette_fit.py runs/bench/run0 [--views 8] [--rays 2]

Per split: the alpha PSNR over whole images, the RMS opacity error on partially covered pixels
(0.01 < alpha < 0.99: the silhouette) and elsewhere, and the share of the squared error that
sits on the silhouette. Opacity is rendered the way evaluation renders (the recipe's pixel filter
and ``render.eval_offsets``), with ``--rays`` x ``--rays`` rays a pixel (2: what training gives
silhouette pixels). Training views that fit no better than held-out ones point at the field or
the rendering model, not at generalisation between views.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def opacities(loop, views, count: int, rays: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, H, W] rendered opacity and the images' alpha, for the first ``count`` views."""
    from gen3d.render import pixel_means

    cameras = views.cameras.to(loop.run.device)
    h, w = cameras.height, cameras.width
    rendered, alphas = [], []
    for i in range(min(count, len(views.names))):
        origins, dirs = cameras.image_rays(i, rays, loop.config.render.filter)
        out = loop.renderer.render_chunked(loop.field, origins, dirs, loop.background,
                                           offsets=loop.config.render.eval_offsets)
        opacity = pixel_means(out.opacity[:, None], h * w).reshape(h, w).cpu().numpy()
        rendered.append(opacity)
        alphas.append(views.images[i, ..., 3].numpy())
    return np.stack(rendered), np.stack(alphas)


def summary(opacity: np.ndarray, alphas: np.ndarray) -> dict:
    from gen3d import psnr

    partial = (alphas > 0.01) & (alphas < 0.99)
    errors = opacity - alphas
    squared = errors ** 2
    return {
        "alpha_psnr": round(psnr(opacity, alphas), 2),
        "partial_pixel_share": round(float(partial.mean()), 4),
        "rms_partial": round(float(np.sqrt(squared[partial].mean())), 4),
        "mean_error_partial": round(float(errors[partial].mean()), 4),  # > 0: silhouettes too wide
        "rms_elsewhere": round(float(np.sqrt(squared[~partial].mean())), 4),
        "squared_error_share_partial": round(float(squared[partial].sum() / max(squared.sum(), 1e-12)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder of the nerf-reconstruct recipe (with checkpoints/)")
    parser.add_argument("--views", type=int, default=8, help="views per split")
    parser.add_argument("--rays", type=int, default=2, help="rays a pixel along each axis")
    args = parser.parse_args()

    from gen3d.io import load_checkpoint
    from gen3d import load_recipe
    from gen3d.testing import build_loop
    from gen3d.trainer import CHECKPOINT

    recipe = load_recipe(args.run_dir / "recipe.yaml", [])
    with tempfile.TemporaryDirectory() as scratch:
        loop = build_loop(recipe, Path(scratch))
        loop.load_state_dict(load_checkpoint(args.run_dir / CHECKPOINT)["loop"])
        if not loop.data.has_alpha:
            raise SystemExit(f"{loop.data.root}: images have no alpha, so there are no silhouettes to compare")
        report = {"run": str(args.run_dir), "rays_per_pixel": args.rays ** 2}
        for split in ("train", "test"):
            report[split] = summary(*opacities(loop, getattr(loop.data, split), args.views, args.rays))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
