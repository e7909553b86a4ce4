"""What the best possible export scores in Blender against a shipped data set's held-out images.

    python benchmarks/blender_ceiling.py [--object toy] [--faces 50000] [--texture 1024] [--out DIR]

Builds the asset a perfect reconstruction would export: the object's exact shape (marching
cubes of the analytic SDF of ``assets/make_dataset.py``, decimated to ``--faces``) with its exact
shaded colour baked into a ``--texture`` px texture, written by our GLB exporter. Then renders
it unlit in Blender from the held-out cameras (``tests/tools/export_fidelity.py``) and prints
the PSNR against the shipped images, as JSON. An export's Blender PSNR (issue 19's "within 2 dB
of the field") can only be read against this: whatever the data's images and Blender disagree
on (their pixel filters, the colour space they filter in) caps every export alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
import trimesh

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "assets"), str(ROOT / "tests" / "tools")]
import make_dataset  # noqa: E402
from export_fidelity import score_files  # noqa: E402

from gen3d.api import load_recipe  # noqa: E402
from gen3d.export import export_mesh, finish_mesh  # noqa: E402


def exact_colors(sdf, albedo):
    """The colour function the data set's renderer shades with, for :func:`finish_mesh`."""

    def color(points: torch.Tensor, _normals: torch.Tensor) -> torch.Tensor:
        normals = make_dataset.normals(sdf, points)
        # Onto the surface, just outside it, where the data's sphere tracer stops: the toy's
        # pedestal top lies exactly on a boundary of its checker, which flips a hair below it.
        for _ in range(3):
            points = points - (sdf(points)[0] - 2e-4)[:, None] * normals
        shade = make_dataset.AMBIENT + sum(w * (normals @ torch.nn.functional.normalize(light, dim=0)).clamp_min(0)
                                           for light, w in make_dataset.LIGHTS)
        return (albedo(points, sdf(points)[1]) * shade[:, None]).clamp(0, 1)

    return color


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--object", choices=sorted(make_dataset.OBJECTS), default="toy")
    parser.add_argument("--data", type=Path, help="the data set folder (default: assets/OBJECT)")
    parser.add_argument("--faces", type=int, default=50_000)
    parser.add_argument("--texture", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=256, help="marching-cubes grid of the exact SDF")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--samples", type=int, default=128, help="Cycles samples per pixel")
    parser.add_argument("--out", type=Path, help="keep the GLB and the renders here")
    args = parser.parse_args()
    sdf, albedo = make_dataset.OBJECTS[args.object]
    data = args.data or ROOT / "assets" / args.object
    exact = make_dataset.ground_truth_mesh(sdf, albedo, args.resolution)
    settings = load_recipe(ROOT / "recipes" / "nerf-refine.yaml").stages[-1].settings.export
    glb = [choice for choice in settings.exporters if choice.type == "glb"]
    settings = dataclasses.replace(settings, target_faces=args.faces, texture_size=args.texture, formats=["glb"])
    settings.exporters = glb
    with torch.no_grad():
        mesh = finish_mesh(trimesh.Trimesh(exact.vertices, exact.faces, process=False), exact_colors(sdf, albedo),
                           settings)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        export_mesh(mesh, out, settings.exporters)
        report = score_files({"glb": out / "mesh.glb"}, data, args.views, samples=args.samples,
                             keep=out / "renders" if args.out else None)["glb"]
    print(json.dumps({"object": args.object, "data": str(data), "faces": len(mesh.faces),
                      "texture": args.texture, **report}, indent=1))


if __name__ == "__main__":
    main()
