"""Seconds per image for the embedded ``grabcut`` preprocessing at 1024 px and 4000 px inputs.

    .venv/bin/python benchmarks/bench_preprocess.py [--repeat 5] [--sizes 1024 4000]

Each input is a JPEG photo-sized composite (a shipped rendering on a plain gradient background,
so the true mask is known); the time is one per-image ``preprocess_file`` call with the stage built
once beforehand (as for many photos): decoding, shrinking, GrabCut, the full-size mask, the centred
crop and writing every output. Prints JSON: the median and all runs per size, the time per stage of
the median run, and the mask IoU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gen3d_plugins.preprocess_stage import Preprocessor, load_settings, preprocess_file


def make_photo(long_side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 4:3 photo: the toy rendering (scaled to ~45% of the height) on a lit grey-blue gradient."""
    rng = np.random.default_rng(seed)
    width, height = long_side, long_side * 3 // 4
    obj = np.asarray(Image.open(ROOT / "assets" / "toy" / "train" / "r_3.png").convert("RGBA")).astype(np.float32) / 255
    rows, cols = np.nonzero(obj[..., 3] > 0.01)
    obj = obj[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = 0.45 * height / obj.shape[0]
    obj = cv2.resize(obj, (round(obj.shape[1] * scale), round(obj.shape[0] * scale)), interpolation=cv2.INTER_CUBIC)
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    photo = np.array([0.62, 0.66, 0.72], np.float32) * (1.1 - 0.3 * yy) * np.ones((1, width, 1), np.float32)
    photo += rng.normal(0, 0.01, photo.shape).astype(np.float32)
    y, x = height // 2 - obj.shape[0] // 2, width // 3
    alpha = obj[..., 3:]
    region = photo[y:y + obj.shape[0], x:x + obj.shape[1]]
    region[:] = obj[..., :3] * alpha + region * (1 - alpha)
    mask = np.zeros((height, width), bool)
    mask[y:y + obj.shape[0], x:x + obj.shape[1]] = obj[..., 3] >= 0.5
    return (np.clip(photo, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4000])
    args = parser.parse_args()
    settings = load_settings({})
    stage = Preprocessor(settings)
    report = {"preprocessor": "grabcut", "settings": {"max_side": settings.max_side, "size": settings.size},
              "sizes": {}}
    with tempfile.TemporaryDirectory() as folder:
        for side in args.sizes:
            rgb, truth = make_photo(side)
            path = Path(folder) / f"photo{side}.jpg"
            Image.fromarray(rgb).save(path, quality=92)
            preprocess_file(path, settings, Path(folder) / "warmup", stage=stage)  # first-call costs
            runs, stages = [], []
            for i in range(args.repeat):
                began = time.perf_counter()
                result = preprocess_file(path, settings, Path(folder) / f"out{i}", stage=stage)
                runs.append(time.perf_counter() - began)
                stages.append(result.seconds)
            median = statistics.median(runs)
            iou = float((result.mask & truth).sum() / (result.mask | truth).sum())
            report["sizes"][f"{side}px"] = {
                "input": f"{rgb.shape[1]}x{rgb.shape[0]} JPEG", "seconds_per_image": round(median, 3),
                "runs": [round(r, 3) for r in runs], "stages_of_median_run": stages[runs.index(sorted(runs)[len(runs) // 2])],
                "mask_iou": round(iou, 4), "unsure": result.unsure}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
