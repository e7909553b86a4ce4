"""The ``gen3d`` command: ``run`` a recipe, ``preprocess`` a photo, list ``plugins``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import Gen3DError


def cmd_run(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .trainer import Interrupted, run_recipe

    recipe = load_recipe(Path(args.recipe), args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    try:
        metrics = run_recipe(recipe, out, resume=args.resume, device=args.device, quiet=args.quiet)
    except Interrupted as exc:
        print(f"gen3d: {exc}", file=sys.stderr)
        return 130
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    print(json.dumps(shown, indent=2))
    print(f"run folder: {out}", file=sys.stderr)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_registry

    registry = get_registry()
    if args.json:
        print(json.dumps([{"name": p.name, "version": p.version, "module": p.module,
                           "provides": [{"kind": c.kind, "name": c.name, "description": c.description}
                                        for c in p.components]}
                          for p in registry.plugins()], indent=2))
        return 0
    for plugin in registry.plugins():
        print(f"{plugin.name} {plugin.version} ({plugin.module})")
        for c in plugin.components:
            print(f"  {c.kind:<15} {c.name:<20} {c.description}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .config import Context
    from .preprocess import load_settings, preprocess_file
    from .recipe import apply_override, parse_override

    data: dict = {key: {"type": getattr(args, key)} for key in ("detector", "segmenter", "depth")
                  if getattr(args, key) is not None}
    data.update({key: getattr(args, key) for key in ("size", "fill") if getattr(args, key) is not None})
    for text in args.overrides:
        apply_override(data, *parse_override(text))
    settings = load_settings(data, Context(source="gen3d preprocess", base_dir=Path.cwd()))
    out = Path(args.out) if args.out else Path("runs") / "preprocess" / Path(args.image).stem
    result = preprocess_file(Path(args.image), settings, out, prompts=args.prompt or [])
    chosen = result.detections.labels[result.chosen] if result.chosen is not None else "alpha"
    print(json.dumps({"out": str(out), "object": chosen, "object_box": result.object_box,
                      "unsure": result.unsure, "seconds": result.seconds}, indent=2))
    for note in result.notes:
        print(f"gen3d: note: {note}", file=sys.stderr)
    for reason in result.unsure:
        print(f"gen3d: unsure: {reason}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gen3d", description="Plugin-based 3D content generation.")
    parser.add_argument("--version", action="version", version=f"gen3d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe", description="Run a recipe YAML file.")
    run.add_argument("recipe", help="recipe YAML file, e.g. recipes/nerf-reconstruct.yaml")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe settings")
    run.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.add_argument("--device", choices=["cpu", "cuda"], help="override the recipe's device")
    run.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    run.set_defaults(func=cmd_run)

    pre = sub.add_parser("preprocess", help="find, cut out and centre the object in a photo",
                         description="Detect -> segment -> centre the object of a photo; writes rgba.png, "
                                     "mask.png, detections.json, overview.png (and depth.npy/png).")
    pre.add_argument("image", help="input photo (JPEG, PNG, WebP, ...)")
    pre.add_argument("overrides", nargs="*", metavar="key.sub=value",
                     help="settings, e.g. detector.model=PATH pick=largest max_side=2048")
    pre.add_argument("--prompt", action="append", help="what to find, e.g. 'a chair' (repeatable)")
    pre.add_argument("--out", help="output folder (default: runs/preprocess/<image name>)")
    pre.add_argument("--detector", help="detector preprocessor (default: grabcut)")
    pre.add_argument("--segmenter", help="segmenter preprocessor (default: grabcut)")
    pre.add_argument("--depth", help="depth preprocessor (default: none)")
    pre.add_argument("--size", type=int, help="output side in pixels (default 256)")
    pre.add_argument("--fill", type=float, help="object's share of the output side (default 0.85)")
    pre.set_defaults(func=cmd_preprocess)

    plugins = sub.add_parser("plugins", help="list installed plugins and their components")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too: gen3d run R.yaml --out x steps=10
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("run", "preprocess")
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not takes_overrides]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except Gen3DError as exc:
        print(f"gen3d: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
