"""How well can one ray per pixel do on a shipped data set? A yardstick for the PSNR targets.

    python benchmarks/edge_ceiling.py [toy|plain]

Renders the held-out views of ``assets/<object>`` again with the *exact* analytic shape and
texture that made them (``assets/make_dataset.py``), but with 1 and then 2x2 rays per pixel
(area averages) instead of the data's 8x8 filtered samples, and prints the PSNR against the shipped images (composited
on white, as the benchmark evaluates). A renderer that traces one ray through each pixel centre
cannot reproduce anti-aliased edges: the first figure is what perfect geometry and colour score
that way, so it tells how much of a reconstruction's error sits on edges.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "assets"))
import make_dataset


def on_white(rgba: np.ndarray) -> np.ndarray:
    rgba = rgba.astype(np.float64) / 255
    return rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "toy"
    root = ROOT / "assets" / name
    meta = json.loads((root / "transforms_test.json").read_text())
    sdf, albedo = getattr(make_dataset, f"{name}_sdf"), getattr(make_dataset, f"{name}_albedo")
    report = {"data": str(root), "views": len(meta["frames"])}
    for rays in (1, 2):
        scores = []
        for frame in meta["frames"]:
            truth = on_white(np.asarray(Image.open(root / f"{frame['file_path']}.png")))
            exact = on_white(make_dataset.render_view(sdf, albedo, np.array(frame["transform_matrix"]),
                                                      meta["camera_angle_x"], truth.shape[0], rays, "box"))
            scores.append(-10 * np.log10(np.mean((exact - truth) ** 2)))
        report[f"psnr_exact_{rays}x{rays}_rays"] = round(float(np.mean(scores)), 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
