"""How each exported mesh looks in Blender against the held-out images it was reconstructed from.

    .venv/bin/python tests/tools/export_fidelity.py RUN_DIR DATA_DIR [--views 8] [--formats glb obj ply]

Renders RUN_DIR/mesh.{glb,obj,ply} unlit in Blender from DATA_DIR's held-out cameras
(tests/tools/blender_render.py), composites renders and images on the same background and prints,
per format, the mean over views of the PSNR and of the alpha IoU (coverage > 0.5), as JSON.
The scores catch what a user would see: colours in the wrong colour space, a file on its side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np

RENDER_SCRIPT = Path(__file__).resolve().parent / "blender_render.py"


def held_out_views(data_dir: Path, split: str, count: int) -> list[int]:
    """``count`` frame indices spread evenly over the split's frames."""
    frames = json.loads((data_dir / f"transforms_{split}.json").read_text())["frames"]
    return sorted({int(round(i)) for i in np.linspace(0, len(frames) - 1, min(count, len(frames)))})


def image_path(data_dir: Path, split: str, view: int) -> Path:
    frame = json.loads((data_dir / f"transforms_{split}.json").read_text())["frames"][view]
    path = data_dir / frame["file_path"]
    return path if path.suffix else path.with_suffix(".png")


def read_rgba(path: Path) -> np.ndarray:
    image = iio.imread(path).astype(np.float64) / 255.0
    if image.shape[-1] == 3:
        image = np.concatenate([image, np.ones_like(image[..., :1])], axis=-1)
    return image


def compare(render: np.ndarray, truth: np.ndarray, background: np.ndarray) -> dict[str, float]:
    """PSNR of the two composited on ``background``, and the IoU of their coverage masks."""
    def over(rgba):
        return rgba[..., :3] * rgba[..., 3:] + background * (1 - rgba[..., 3:])

    mse = float(np.mean((over(render) - over(truth)) ** 2))
    a, b = render[..., 3] > 0.5, truth[..., 3] > 0.5
    return {"psnr": float(10 * np.log10(1 / max(mse, 1e-12))),
            "alpha_iou": float((a & b).sum() / max((a | b).sum(), 1))}


def render_in_blender(files: list[Path], data_dir: Path, split: str, views: list[int], size: int, out: Path,
                      blender: str = "blender", samples: int = 128, timeout: float = 600) -> list[dict]:
    command = [blender, "-b", "--factory-startup", "--python", str(RENDER_SCRIPT), "--",
               "--transforms", str(data_dir / f"transforms_{split}.json"), "--views", *map(str, views),
               "--size", str(size), "--out", str(out), "--samples", str(samples), *map(str, files)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    reports = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("GEN3D ")]
    if proc.returncode != 0 or len(reports) != len(files):
        raise RuntimeError(f"Blender rendering failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return reports


def score_exports(run_dir: Path, data_dir: Path, formats=("glb", "obj", "ply"), views: int = 8,
                  split: str = "test", background=(1.0, 1.0, 1.0), blender: str = "blender",
                  samples: int = 128, keep: Path | None = None) -> dict[str, dict]:
    """Per format of RUN_DIR/mesh.FORMAT: see :func:`score_files`."""
    files = {fmt: Path(run_dir) / f"mesh.{fmt}" for fmt in formats}
    return score_files(files, data_dir, views, split, background, blender, samples, keep)


def score_files(files: dict[str, Path], data_dir: Path, views: int = 8, split: str = "test",
                background=(1.0, 1.0, 1.0), blender: str = "blender", samples: int = 128,
                keep: Path | None = None) -> dict[str, dict]:
    """Per named file: mean PSNR and alpha IoU over ``views`` held-out views, their minima,
    what fed the colour in Blender ("colors": an image texture or a colour attribute) and
    Blender's seconds. The renders go to ``keep`` if given (to look at), else to a scratch folder."""
    picked = held_out_views(data_dir, split, views)
    truths = [read_rgba(image_path(data_dir, split, v)) for v in picked]
    size = truths[0].shape[1]
    bg = np.asarray(background, dtype=np.float64)
    scratch = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="gen3d-fidelity-"))
    try:
        reports = render_in_blender(list(files.values()), data_dir, split, picked, size, scratch, blender, samples)
        scores = {}
        for name, report in zip(files, reports):
            per_view = [compare(read_rgba(Path(r)), t, bg) for r, t in zip(report["renders"], truths)]
            scores[name] = {key: round(float(np.mean([s[key] for s in per_view])), 4) for key in ("psnr", "alpha_iou")}
            scores[name].update(min_psnr=round(float(min(s["psnr"] for s in per_view)), 2),
                                min_alpha_iou=round(float(min(s["alpha_iou"] for s in per_view)), 4),
                                views=len(per_view), colors=report["colors"], blender_seconds=report["seconds"])
        return scores
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--formats", nargs="+", default=["glb", "obj", "ply"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--blender", default="blender")
    parser.add_argument("--keep", type=Path, help="folder to keep the renders in")
    args = parser.parse_args()
    print(json.dumps(score_exports(args.run_dir, args.data_dir, args.formats, args.views, args.split,
                                   blender=args.blender, samples=args.samples, keep=args.keep), indent=1))


if __name__ == "__main__":
    main()
