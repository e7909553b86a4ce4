"""The view-teacher end-to-end check: ``recipes/zero123.yaml`` rebuilds the toy from one rendered view.

    python benchmarks/bench_image_to_3d.py --azimuth 90               # reference seen from +y (the side)
    python benchmarks/bench_image_to_3d.py --azimuth 90 --mirror      # T's azimuth sign flipped: must fail
    python benchmarks/bench_image_to_3d.py --azimuth 0 --json out.json -- stages.optimise.steps=600

The teacher is the reconstruction of the shipped toy (``gen3d run recipes/nerf-reconstruct.yaml
--out runs/toy``, trained first if missing). The reference image is the *teacher's* rendering,
256 px, from elevation 0 and the given azimuth, at 20 degrees field of view, looking at the toy's
centre from the distance at which the toy fills 0.8 of the frame (so the recipe's preprocess
stage, which centres the cut-out at that fill, leaves it as it is). The whole recipe then runs
(preprocess, then image-to-3d) with the guidance swapped for ``view-teacher``, which receives only
the reference image and each view's T. The student's world is the teacher's turned by -azimuth
about z and scaled by 3.8 / distance (the recipe's reference camera); scoring undoes exactly that,
with nothing fitted:

- ``chamfer``: the exported mesh (mesh.glb, turned back to Z up and into the toy's frame)
  against assets/toy/mesh.ply, in units of its bounding radius;
- ``mask_iou``: the student's opacity at the toy's first 8 held-out cameras (moved into the
  student's frame) against the ground-truth alpha, mean and min over the views;
- ``psnr_test``: its colour there against the ground truth, both on white (a mirror that keeps
  the silhouettes, as a flipped azimuth does for a reference on the toy's axis of symmetry,
  still shows here).

Targets (issue 20): at most 600 s on a 2-core CPU, chamfer <= 0.03, mean mask IoU >= 0.9, at every
azimuth; a mirrored T must miss them; ``targets_met`` also asks psnr_test >= 30 dB. The toy is
symmetric about its xz plane. A mirror in azimuth about a reference *in* that plane (azimuth 0,
180) gives the same object: it cannot show. About a reference on the y axis (azimuth 90) it gives
the toy turned round, whose silhouettes are the true toy's from the opposite side: the same
outline at the horizon (a silhouette is the mirror image of the opposite view's), close to it
above; mostly the colours are wrong. At azimuth 45 the mirrored toy is turned by 90 degrees.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy"
FOV = 20.0  # the recipe's reference field of view
STUDENT_DISTANCE = 3.8  # the recipe's reference distance
FILL = 0.8  # the preprocess stage's fill
SIZE = 256

# recipes/zero123.yaml -> a run against view-teacher. Each: what it changes and why.
OVERRIDES = [
    # A deterministic target needs no small steps: the reconstruction recipe's learning rates.
    "stages.optimise.representation.lr=0.1", "stages.optimise.representation.density_lr=1.0",
    # Loss scales as in bench_teacher.py: the teacher's gradient about a pixel-mean MSE, and the
    # reference view's colour and mask losses pixel means too.
    "stages.optimise.losses.rgb=1", "stages.optimise.losses.mask=1",
    "stages.optimise.losses.orientation=0", "stages.optimise.losses.entropy=0.001",
    "stages.optimise.representation.upsample_at=[150, 300]",
    "stages.optimise.views.size_at=[300]",
    # A step count, not a time budget, so the figures do not depend on how busy the machine is;
    # max_seconds only guards the 10-minute target.
    "stages.optimise.steps=450", "stages.optimise.max_seconds=540",
]


def toy_center() -> list[float]:
    import trimesh

    bounds = trimesh.load(TOY / "mesh.ply", force="mesh", process=False).bounds
    return [round(float(v), 4) for v in (bounds[0] + bounds[1]) / 2]


def rotation_z(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def render_reference(teacher, azimuth: float, center: list[float], distance: float):
    """The teacher's straight-alpha RGBA [S, S, 4] from the reference camera, and its alpha's box
    (x0, y0, x1, y1) in pixels."""
    from gen3d_plugins.view_teacher import cameras_from_relative, camera_position

    cam = cameras_from_relative(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), camera_position(0.0, azimuth, distance),
                                "zero123", FOV, SIZE, center=torch.tensor(center))
    origins, dirs = cam.to(teacher.renderer.aabb.device).image_rays(0)
    with torch.no_grad():
        out = teacher.renderer.render_chunked(teacher.field, origins, dirs, torch.zeros(3), offsets=4)
    alpha = out.opacity.view(SIZE, SIZE).clamp(0, 1).numpy()
    rgb = out.rgb.view(SIZE, SIZE, 3).numpy() / np.maximum(alpha[..., None], 1e-4)  # premultiplied -> straight
    ys, xs = np.nonzero(alpha > 0.5)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return np.concatenate([np.clip(rgb, 0, 1), alpha[..., None]], axis=-1), box


def make_reference(teacher_dir: Path, azimuth: float, out: Path) -> dict:
    """Write the reference image; returns the teacher camera it was rendered from: looking at the
    point and from the distance that centre the toy's box in the frame at FILL, as the preprocess
    stage would centre it (so that stage leaves the image as it is)."""
    from PIL import Image

    from gen3d import load_trained_field

    teacher = load_trained_field(teacher_dir)
    center, distance = np.array(toy_center()), 6.4
    right = np.array([-math.sin(math.radians(azimuth)), math.cos(math.radians(azimuth)), 0.0])  # image x, in the world
    for _ in range(4):
        _, (x0, y0, x1, y1) = render_reference(teacher, azimuth, center.tolist(), distance)
        per_pixel = 2 * distance * math.tan(math.radians(FOV) / 2) / SIZE  # world units a pixel at the centre
        center = center + per_pixel * ((x0 + x1) / 2 - SIZE / 2) * right - per_pixel * ((y0 + y1) / 2 - SIZE / 2) * \
            np.array([0.0, 0.0, 1.0])
        distance *= max(x1 - x0, y1 - y0) / (FILL * SIZE)
    rgba, box = render_reference(teacher, azimuth, center.tolist(), distance)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(out)
    return {"elevation": 0.0, "azimuth": azimuth, "distance": round(distance, 4), "fov": FOV,
            "center": [round(float(v), 4) for v in center], "box": [int(v) for v in box]}


def run_student(recipe_overrides: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "gen3d", "run", str(ROOT / "recipes" / "zero123.yaml"), *recipe_overrides,
               "--out", str(out)]
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"bench_image_to_3d: the run failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    stage = metrics["stages"]["optimise"]
    return {"seconds": round(seconds, 1), "train_seconds": stage["train_seconds"], "steps": stage["steps"],
            "peak_rss_mb": round(rss, 1), "reference_psnr": stage.get("reference_psnr"),
            "reference_mask_iou": stage.get("reference_mask_iou"), "command": " ".join(command[1:])}


def reexport(student_dir: Path):
    """The student's mesh made again from its checkpoint by the current export code (Z up, the
    student's frame), at the level the run chose: to score a change to the export alone."""
    from dataclasses import replace

    from gen3d import load_recipe, load_trained_field
    from gen3d.export import extract_mesh

    stage = student_dir / "stages" / "optimise"
    level = json.loads((stage / "metrics.json").read_text())["export_level"]
    recipe = load_recipe(student_dir / "recipe.yaml")
    export = next(s.settings.export for s in recipe.stages if s.settings.name == "optimise")
    return extract_mesh(load_trained_field(stage).field, replace(export, level=level, colors="vertex"))


def score(student_dir: Path, camera: dict, mesh=None) -> dict:
    """Chamfer and held-out mask IoU of the student, in the toy's frame (nothing fitted). ``mesh``:
    the student's mesh (Z up, its own frame), instead of its mesh.glb."""
    import trimesh

    from gen3d import Cameras, chamfer, load_trained_field, psnr
    from gen3d_plugins.nerf_data import NerfDataConfig, load

    scale = STUDENT_DISTANCE / camera["distance"]
    turn, center = rotation_z(camera["azimuth"]), np.array(camera["center"])
    if mesh is None:
        mesh = trimesh.load(student_dir / "mesh.glb", force="mesh", process=False)
        mesh.vertices = mesh.vertices @ np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])  # Y up -> Z up
    mesh.vertices = (mesh.vertices / scale) @ turn.T + center  # student -> toy frame
    report = {"chamfer": round(chamfer(mesh, TOY / "mesh.ply"), 5)}

    test = load(NerfDataConfig(path=TOY)).test
    cams = test.cameras[torch.arange(8)]
    back = torch.tensor(turn.T, dtype=torch.float32)  # toy -> student frame: turn by -azimuth, then scale
    c2w = cams.c2w.clone()
    c2w[:, :3, :3] = back @ cams.c2w[:, :3, :3]
    c2w[:, :3, 3] = scale * (cams.c2w[:, :3, 3] - torch.tensor(center, dtype=torch.float32)) @ back.T
    moved = Cameras(c2w, cams.fx, cams.fy, cams.cx, cams.cy, cams.width, cams.height)
    student = load_trained_field(student_dir)
    ious, psnrs = [], []
    for i in range(8):
        origins, dirs = moved.to(student.renderer.aabb.device).image_rays(i)
        with torch.no_grad():
            out = student.renderer.render_chunked(student.field, origins, dirs, torch.ones(3))
        predicted = out.opacity.view(moved.height, moved.width).numpy() > 0.5
        rgba = test.images[i].numpy()
        truth = rgba[..., 3] > 0.5
        ious.append(float((predicted & truth).sum() / max(1, (predicted | truth).sum())))
        on_white = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        psnrs.append(psnr(out.rgb.view(moved.height, moved.width, 3).clamp(0, 1).numpy(), on_white))
    report.update(mask_iou=round(float(np.mean(ious)), 4), mask_iou_min=round(min(ious), 4),
                  psnr_test=round(float(np.mean(psnrs)), 2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, default=ROOT / "runs" / "toy", help="the teacher's run folder")
    parser.add_argument("--azimuth", type=float, default=90.0, help="the reference view's azimuth in the toy's world")
    parser.add_argument("--mirror", action="store_true", help="flip T's azimuth sign (the check must then fail)")
    parser.add_argument("--out", type=Path, help="the run folder (default runs/bench-image-to-3d/az{A}[-mirror])")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--rescore", type=Path, help="only score a finished run again, from its report JSON")
    parser.add_argument("--reexport", action="store_true",
                        help="with --rescore: make the mesh again from the checkpoint with the current export code")
    parser.add_argument("overrides", nargs="*", help="more recipe overrides")
    args = parser.parse_args()
    if args.rescore:
        report = json.loads(args.rescore.read_text())
        mesh = reexport(args.out) if args.reexport else None
        report.update(score(args.out, report["teacher_camera"], mesh), reexported=args.reexport)
        args.rescore.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return

    if not (args.teacher / "checkpoints" / "last.safetensors").is_file():
        print(f"bench_image_to_3d: training the teacher into {args.teacher} (about 3 minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "gen3d", "run", str(ROOT / "recipes" / "nerf-reconstruct.yaml"),
                        "--out", str(args.teacher)], check=True)
    name = f"az{args.azimuth:g}" + ("-mirror" if args.mirror else "")
    out = args.out or ROOT / "runs" / "bench-image-to-3d" / name
    if out.exists():
        sys.exit(f"bench_image_to_3d: {out} exists; pick another --out")
    reference_png = out.parent / f"{name}-reference.png"
    camera = make_reference(args.teacher.resolve(), args.azimuth, reference_png)
    guidance = {"type": "view-teacher", "run": str(args.teacher.resolve()), "weight": 0.001,
                "mirror_azimuth": args.mirror,
                "reference": {k: camera[k] for k in ("elevation", "azimuth", "distance", "fov", "center")}}
    overrides = [f"image={reference_png}", f"stages.optimise.guidance={json.dumps(guidance)}", *OVERRIDES,
                 *args.overrides]
    result = {"azimuth": args.azimuth, "mirror": args.mirror, "teacher_camera": camera}
    result.update(run_student(overrides, out))
    result.update(score(out, camera))
    # The targets, plus held-out colour: a mirror that keeps the silhouettes shows only there.
    result["targets_met"] = bool(result["seconds"] <= 600 and result["chamfer"] <= 0.03 and result["mask_iou"] >= 0.9
                                 and result["psnr_test"] >= 30)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
