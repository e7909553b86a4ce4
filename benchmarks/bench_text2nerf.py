"""The scene-teacher end-to-end check of Text2NeRF: ``recipes/text2nerf-teacher.yaml`` rebuilds
the shipped room (assets/scene) with scene-teacher playing text-to-image, inpainter and depth.

    python benchmarks/bench_text2nerf.py --out runs/room --json /tmp/text2nerf.json
    python benchmarks/bench_text2nerf.py --rescore runs/room         # score a finished run again
    python benchmarks/bench_text2nerf.py --out /tmp/r -- camera.width=256 camera.height=256

Scores, against the room itself (nothing fitted):

- ``psnr_held_out``: the field at 8 cameras inside the trajectory's span and on none of its
  poses (half its move and turn, half-way between its directions), rendered with 2 x 2 rays a
  pixel as the teacher renders, against the teacher's image there; mean and min;
- ``align_error_max``: the largest, over the views, median relative error of the aligned depth
  on the known pixels (metrics.json); ``depth_error_holes``: the aligned depth of each view's
  inpainted pixels against the room's true depth there, median relative error, the worst view;
- ``chamfer``: mesh.ply against the room's ground-truth mesh over the part the trajectory's
  views see (true depth within 2 %), in units of the room's diagonal;
- with ``--blender``: the exported mesh.glb, mesh.obj and mesh.ply opened in Blender 3.4 and
  rendered unlit from the held-out cameras at 256 px (tests/tools/blender_render.py), against the
  teacher's images there (``blender``: PSNR on black, and the share of pixels the mesh covers),
  beside the field's own rendering at the same size (``field_psnr_256``): what a user sees of
  the export against what the run showed.

Targets (issue 21): at most 900 s on a 2-core CPU, psnr_held_out mean >= 28 dB, align_error_max
<= 0.02, chamfer <= 0.02. ``targets_met`` says whether all hold.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "text2nerf-teacher.yaml"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10 * np.log10(max(float(np.mean((a - b) ** 2)), 1e-10)))


def blender_scores(out: Path, trained, teacher, held: torch.Tensor, size: int = 256) -> dict:
    """The exports in Blender and the field, against the teacher, at ``size`` px from ``held``."""
    import math
    import tempfile

    import imageio.v3 as iio
    from gen3d import scene

    sys.path.insert(0, str(ROOT / "tests" / "tools"))
    from export_fidelity import score_files

    loop = trained.stage.loop
    pinhole = scene.PinholeConfig(loop.camera.fov_deg, size, size)
    data = Path(tempfile.mkdtemp(prefix="gen3d-room-"))
    (data / "test").mkdir()
    frames, field_psnr = [], []
    for i, pose in enumerate(held):
        cam = scene.pinhole(pose, pinhole)
        truth = teacher.render(cam)[0].numpy()
        iio.imwrite(data / "test" / f"r_{i}.png", (truth * 255 + 0.5).astype(np.uint8))
        frames.append({"file_path": f"test/r_{i}", "transform_matrix": pose.tolist()})
        field_psnr.append(psnr(trained.render_images(cam, [0.0, 0.0, 0.0], offsets=1)[0].permute(1, 2, 0).numpy(),
                               truth))
    (data / "transforms_test.json").write_text(json.dumps({"camera_angle_x": math.radians(loop.camera.fov_deg),
                                                          "frames": frames}))
    files = {fmt: out / f"mesh.{fmt}" for fmt in ("glb", "obj", "ply")}
    scores = score_files(files, data, views=len(frames), split="test", background=(0.0, 0.0, 0.0))
    return {"field_psnr_256": round(float(np.mean(field_psnr)), 3),
            "blender": {fmt: {"psnr": v["psnr"], "min_psnr": v["min_psnr"], "coverage_iou": v["alpha_iou"],
                              "colors": v["colors"]} for fmt, v in scores.items()}}


def score(out: Path, blender: bool = False) -> dict:
    from gen3d import load_trained_field, scene
    from gen3d_plugins.scene_teacher import SceneTeacher

    trained = load_trained_field(out)
    loop = trained.stage.loop
    teacher = SceneTeacher(loop.text_to_image.config)
    pinhole = loop.camera.pinhole
    start = torch.tensor(loop.camera.start, dtype=torch.float32)
    traj = loop.trajectory
    held = scene.held_out_poses(start, traj.translation, traj.rotation_deg)
    scores = []
    for pose in held:
        cam = scene.pinhole(pose, pinhole)
        truth = teacher.render(cam)[0].numpy()
        h, w = cam.height, cam.width
        origins, dirs = cam.image_rays(0, 2)
        rgb = trained.renderer.render_chunked(trained.field, origins, dirs, torch.zeros(3)).rgb
        pred = rgb.view(h * w, 4, 3).mean(1).view(h, w, 3).clamp(0, 1).numpy()
        scores.append(psnr(pred, truth))
    poses = scene.trajectory(traj, start)
    cameras = [scene.pinhole(p, pinhole) for p in poses]
    depths = [teacher.render(c)[1] for c in cameras]
    truth_mesh = trimesh.load(Path(teacher.config.scene) / "mesh.ply" if Path(teacher.config.scene).is_dir()
                              else Path(teacher.config.scene).with_name("mesh.ply"), force="mesh", process=False)
    mesh = trimesh.load(out / "mesh.ply", force="mesh", process=False)
    chamfer = scene.scoring.seen_chamfer(mesh, truth_mesh, depths, cameras, teacher.scene.size)
    metrics = json.loads((out / "metrics.json").read_text())
    hole_errors = []
    for i, camera in enumerate(cameras[1:], start=1):
        views = out / "views" / f"{i:03d}.safetensors"
        from safetensors.torch import load_file
        data = load_file(str(views))
        hole = data["0.train"].bool()
        if hole.any():
            error = ((data["0.depth"] - depths[i]).abs() / depths[i])[hole]
            hole_errors.append(float(error.median()))
    result = {"psnr_held_out": round(float(np.mean(scores)), 3), "psnr_held_out_min": round(float(np.min(scores)), 3),
              "psnr_held_out_each": [round(s, 2) for s in scores],
              "align_error_max": metrics.get("align_error_max"),
              "depth_error_holes": round(max(hole_errors), 5) if hole_errors else None,
              **{k: round(v, 5) if isinstance(v, float) else v for k, v in chamfer.items()},
              "steps": metrics.get("steps"), "train_seconds": metrics.get("train_seconds"),
              "export_seconds": metrics.get("export_seconds"), "mesh_faces": metrics.get("mesh_faces"),
              "inpainted_mean": metrics.get("inpainted_mean"), "seconds_by_stage": metrics.get("seconds_by_stage")}
    if blender:
        result.update(blender_scores(out, trained, teacher, held))
    result["targets_met"] = bool(result["psnr_held_out"] >= 28 and (result["align_error_max"] or 0) <= 0.02
                                 and result["chamfer"] <= 0.02)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--out", type=Path, default=Path("runs/room"))
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--rescore", type=Path, help="score this finished run folder; train nothing")
    parser.add_argument("--blender", action="store_true", help="also score the exports opened in Blender")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (after --)")
    args = parser.parse_args()
    from gen3d import load_recipe, run_recipe

    if args.rescore:
        result = {"run": str(args.rescore), **score(args.rescore, args.blender)}
    else:
        recipe = load_recipe(args.recipe, args.overrides)
        began = time.perf_counter()
        run_recipe(recipe, args.out, quiet=False)
        wall = time.perf_counter() - began
        result = {"run": str(args.out), "overrides": args.overrides, "wall_seconds": round(wall, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "torch_threads": torch.get_num_threads(), **score(args.out, args.blender)}
        result["targets_met"] = bool(result["targets_met"] and wall <= 900)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
