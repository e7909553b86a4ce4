"""Seconds of one field step (forward, backward, optimiser) of each grid field on the same 160k
samples at 128^3, interleaved so every field sees the same machine load; medians. Prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_field_step.py
"""
import time, torch
from gen3d_plugins.grid_field import GridNeRF, GridNeRFConfig
from gen3d_plugins.sdf_field import SDFGrid, SDFGridConfig
from gen3d_plugins.occupancy_field import OccupancyField, OccupancyGridConfig
box = torch.tensor([-1.0, -1, -1, 1, 1, 1]); step = 3.46 / 160
fields = {"grid-nerf": GridNeRF(GridNeRFConfig(resolutions=[128], upsample_at=[], betas=(0.0, 0.95)), box, step),
          "sdf-grid": SDFGrid(SDFGridConfig(resolutions=[128], upsample_at=[], betas=(0.0, 0.95), sphere_radius=0.5, curvature_weight=0.001), box, step),
          "sdf-nocurv": SDFGrid(SDFGridConfig(resolutions=[128], upsample_at=[], betas=(0.0, 0.95), sphere_radius=0.5), box, step),
          "sdf-noreg": SDFGrid(SDFGridConfig(resolutions=[128], upsample_at=[], betas=(0.0, 0.95), sphere_radius=0.5, eikonal_weight=0.0), box, step)}
opt = {k: f.make_optimizer() for k, f in fields.items()}
g = torch.Generator().manual_seed(0)
x = torch.nn.functional.normalize(torch.randn(160_000, 3, generator=g), dim=-1) * (0.4 + 0.2 * torch.rand(160_000, 1, generator=g))
d = torch.nn.functional.normalize(torch.randn(160_000, 3, generator=g), dim=-1)
times = {k: [] for k in fields}
for rep in range(12):
    for k, f in fields.items():
        t = time.perf_counter()
        f.grow(rep)
        sigma, rgb = f(x, d)
        loss = (sigma * 1e-3).mean() + rgb.mean()
        reg = f.regularizer(rep)
        if reg is not None:
            loss = loss + reg
        opt[k].zero_grad(set_to_none=True); loss.backward(); opt[k].step()
        if rep >= 2:
            times[k].append(time.perf_counter() - t)
import json
import statistics

print(json.dumps({k: {"median_seconds": round(statistics.median(v), 4), "steps": len(v)} for k, v in times.items()}))
