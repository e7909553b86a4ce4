"""Time gen3d.raster on the CPU: rasterize + interpolate + antialias of a sphere mesh, forward
and backward, at 128 x 128 (and 256 x 256), one view and a batch of four. Prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_raster.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import trimesh

from gen3d.cameras import orbit
from gen3d.raster import antialias, clip_matrices, edge_neighbors, interpolate, project, rasterize


def sphere(faces: int) -> trimesh.Trimesh:
    if faces <= 20480:
        return trimesh.creation.icosphere(subdivisions=5)
    n = int((faces / 4) ** 0.5)  # a uv sphere of n x n segments has about 4 n^2 faces
    return trimesh.creation.uv_sphere(count=[n, n])


def time_once(verts, faces, cameras, size):
    verts = verts.clone().requires_grad_()
    colors = torch.rand(len(verts), 4)
    began = time.perf_counter()
    clip = project(verts, clip_matrices(cameras))
    rast = rasterize(clip, faces, (size, size))
    image = antialias(interpolate(colors, rast, faces), rast, clip, faces, edge_neighbors(faces))
    forward = time.perf_counter() - began
    image.square().mean().backward()
    return forward, time.perf_counter() - began


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for target in (20480, 50000):
        mesh = sphere(target)
        verts = torch.tensor(mesh.vertices, dtype=torch.float32)
        faces = torch.tensor(mesh.faces, dtype=torch.long)
        for size in (128, 256):
            for views in (1, 4):
                cameras = orbit(views, 3.0, 20.0, 0.8, size)  # the sphere fills about 2/3 of the view
                time_once(verts, faces, cameras, size)  # warm-up
                runs = [time_once(verts, faces, cameras, size) for _ in range(5)]
                rows.append({"faces": len(faces), "size": size, "views": views,
                             "forward_s": round(statistics.median(r[0] for r in runs), 4),
                             "forward_backward_s": round(statistics.median(r[1] for r in runs), 4),
                             "threads": torch.get_num_threads()})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
