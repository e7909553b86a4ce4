"""Export one trained run several ways and measure each: the seconds of every phase, the file
sizes, the Khronos validator's counts and how the files look in Blender against the held-out
images (tests/tools/export_fidelity.py), as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python tests/tools/export_variants.py RUN_DIR DATA_DIR --out DIR \
        [--variants texture:20000 vertex:20000 texture:50000 vertex:50000 vertex:full] [--views 8] [--json FILE]

A variant is COLORS:FACES: COLORS ``texture`` or ``vertex`` (``export.colors``), FACES a target
face count or ``full`` (marching cubes' own count). Everything else is the run's own export
(its resolution, and the level it used, from metrics.json); each variant writes
DIR/<variant>/mesh.glb and mesh.obj (+ .mtl, + .png). The validator is run when
.ci/node/node_modules/gltf-validator exists, Blender when ``blender`` is on the PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_fidelity import score_files  # noqa: E402

VALIDATOR = ROOT / "tests" / "tools" / "validate_gltf.js"
NODE_MODULES = ROOT / ".ci" / "node" / "node_modules"


def parse_variant(text: str) -> tuple[str, int | None]:
    colors, _, faces = text.partition(":")
    if colors not in ("texture", "vertex") or not (faces == "full" or faces.isdigit()):
        raise argparse.ArgumentTypeError(f"a variant is texture|vertex:FACES|full, got {text!r}")
    return colors, None if faces == "full" else int(faces)


def export_variant(trained, level: float | None, colors: str, faces: int | None, texture_size: int,
                   out: Path) -> dict:
    """Extract and write one variant into ``out``; its figures."""
    from gen3d.config import Context
    from gen3d.export import export_mesh, extract_mesh
    from gen3d.plugins import get_registry
    from gen3d.recipe import resolve_exporters

    settings = replace(trained.stage.settings.export, level=level, target_faces=faces, colors=colors,
                       texture_size=texture_size, formats=["glb", "obj"])
    resolve_exporters(settings, Context(registry=get_registry()), "export")
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    mesh = extract_mesh(trained.field, settings)
    extracted = time.perf_counter()
    files = export_mesh(mesh, out, settings.exporters)
    done = time.perf_counter()
    seconds = {**mesh.metadata["export_seconds"], "write": round(done - extracted, 3),
               "total": round(done - began, 3)}
    return {"faces": len(mesh.faces), "vertices": len(mesh.vertices), "seconds": seconds,
            "bytes": {p.name: p.stat().st_size for p in files}}


def validate(glb: Path) -> dict | None:
    """The Khronos validator's counts for one GLB (None without the validator)."""
    if not shutil.which("node") or not (NODE_MODULES / "gltf-validator").is_dir():
        return None
    proc = subprocess.run(["node", str(VALIDATOR), str(glb)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NODE_PATH": str(NODE_MODULES)})
    report = json.loads(proc.stdout.splitlines()[0])
    return {key: report[key] for key in ("errors", "warnings", "infos", "hints")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", type=parse_variant,
                        default=[("texture", 20_000), ("vertex", 20_000), ("texture", 50_000), ("vertex", 50_000),
                                 ("vertex", None)])
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from gen3d import Gen3DError, load_trained_field

    trained = load_trained_field(args.run_dir)
    level = json.loads((args.run_dir / "metrics.json").read_text()).get("export_level")
    results, files = {}, {}
    for colors, faces in args.variants:
        name = f"{colors}-{faces or 'full'}"
        try:
            results[name] = export_variant(trained, level, colors, faces, args.texture_size, args.out / name)
        except Gen3DError as exc:  # e.g. a textured export of more faces than the atlas takes
            results[name] = {"error": str(exc)}
            continue
        results[name]["validator"] = validate(args.out / name / "mesh.glb")
        files.update({f"{name}/glb": args.out / name / "mesh.glb", f"{name}/obj": args.out / name / "mesh.obj"})
    if shutil.which("blender"):
        for key, score in score_files(files, args.data_dir, args.views).items():
            name, fmt = key.split("/")
            results[name].setdefault("blender", {})[fmt] = score
    text = json.dumps({"run": str(args.run_dir), "data": str(args.data_dir), "level": level,
                       "texture_size": args.texture_size, "variants": results}, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
