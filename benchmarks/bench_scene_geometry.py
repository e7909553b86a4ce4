"""Timings and accuracy of gen3d.scene's geometry at 512 px on the shipped room (scene-teacher).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scene_geometry.py

Along the forward trajectory (9 views), as the progressive loop will: for each new view, its
holes from every view so far, the known pixels' depth from splatting those views (a stand-in
for the field's rendered depth), the teacher's disparity (unknown scale and shift) aligned to
it. Prints per view the hole fraction, the alignment error on the known pixels, the error on
all pixels and in the holes against the true depth, and the medians of 3 timings of each step.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from gen3d.scene import TrajectoryConfig, align_depth, coverage, pinhole, trajectory, warp
from gen3d_plugins.scene_teacher import SceneTeacher, SceneTeacherConfig


def timed(fn, repeats=3):
    times, out = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return out, statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    teacher = SceneTeacher(SceneTeacherConfig())
    start = teacher.start_camera()
    (rgb, depth), t_render2 = timed(lambda: teacher.scene.render(start, 2))
    _, t_render1 = timed(lambda: teacher.scene.render(start, 1))
    print(f"render 512 px: {t_render1:.2f} s (1 ray a pixel), {t_render2:.2f} s (2x2 rays)")
    poses = trajectory(TrajectoryConfig(), start.c2w[0])
    cams = [pinhole(p) for p in poses]
    _, t_warp = timed(lambda: warp(rgb, depth, start, cams[1]))
    print(f"warp 512 px -> 512 px: {t_warp:.3f} s")
    depths, seen = [depth], [start]
    rows = []
    for k, cam in enumerate(cams[1:], start=1):
        known, t_cov = timed(lambda: coverage(depths, seen, cam))
        truth = teacher.scene.render(cam, 1)[1]
        estimate = torch.from_numpy(teacher.estimate(np.zeros((512, 512, 3), np.float32), cam))
        reference = torch.where(known.valid, known.depth, torch.zeros_like(truth))
        aligned, t_align = timed(lambda: align_depth(estimate, reference, known.valid))
        rel = (aligned.depth - truth).abs() / truth
        rows.append((k, float(known.holes.float().mean()), aligned.error, float(rel.median()),
                     float(rel[known.holes].median()), t_cov, t_align))
        depths.append(aligned.depth)  # the view joins the set with its aligned depth, as in the loop
        seen.append(cam)
    print("view  holes  align_err(known)  err_vs_truth(all)  err_vs_truth(holes)  coverage_s  align_s")
    for k, h, e, a, ho, tc, ta in rows:
        print(f"{k:4d}  {h:5.3f}  {e:16.5f}  {a:17.5f}  {ho:19.5f}  {tc:10.3f}  {ta:7.3f}")


if __name__ == "__main__":
    main()
