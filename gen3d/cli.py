"""The ``gen3d`` command: ``run`` a recipe, ``batch`` many runs of one, list ``plugins``, and the
commands plugins add (``gen3d_commands``: ``preprocess`` a photo comes from one)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import Gen3DError, PluginError
from .plugins import get_registry


def cmd_run(args: argparse.Namespace) -> int:
    from .api import load_recipe, run_recipe
    from .trainer import Interrupted

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


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import BatchConfig, BatchInterrupted, run_batch

    config = BatchConfig(recipe=Path(args.recipe), out=Path(args.out),
                         inputs=Path(args.inputs) if args.inputs else None, sweeps=args.sweep or [],
                         overrides=args.overrides, engine=args.engine, workers=args.workers, threads=args.threads,
                         ray_address=args.ray_address, memory_gb=args.memory_gb,
                         retry_failed=args.retry_failed, quiet=args.quiet)
    try:
        manifest = run_batch(config)
    except (BatchInterrupted, KeyboardInterrupt) as exc:
        print(f"gen3d batch: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    failed = [run for run in manifest["runs"] if run["state"] == "failed"]
    for run in failed:
        print(f"gen3d batch: {run['name']} failed: {run['error']}", file=sys.stderr)
    done = sum(run["state"] == "done" for run in manifest["runs"])
    print(f"gen3d batch: {done} done, {len(failed)} failed "
          f"({Path(args.out) / 'batch.json'})", file=sys.stderr)
    return 1 if failed else 0


def cmd_plugins(args: argparse.Namespace) -> int:
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


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def build_parser(registry) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gen3d", description="Plugin-based 3D content generation.")
    parser.add_argument("--version", action="version", version=f"gen3d {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a failing plugin's full traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe", description="Run a recipe YAML file.")
    run.add_argument("recipe", help="recipe YAML file, e.g. recipes/nerf-reconstruct.yaml")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe settings")
    run.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.add_argument("--device", choices=["cpu", "cuda"], help="override the recipe's device")
    run.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    run.set_defaults(takes_overrides=True)
    run.set_defaults(func=cmd_run)

    batch = sub.add_parser("batch", help="many runs of a recipe, each in its own folder",
                           description="Run a recipe once per input row and/or sweep point, each run in "
                                       "OUT/<name>, state in OUT/batch.json; the same command again continues.")
    batch.add_argument("recipe", help="recipe YAML file")
    batch.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every run")
    batch.add_argument("--inputs", metavar="FILE",
                       help="YAML list of runs (mappings of overrides) or CSV (a header of keys)")
    batch.add_argument("--sweep", action="append", metavar="key=v1,v2,...",
                       help="a grid axis; several --sweep make a product (and multiply --inputs)")
    batch.add_argument("--out", required=True, metavar="DIR",
                       help="batch folder: a run folder per run, batch.json, index.html")
    batch.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local worker processes (default) or Ray tasks (pip install 'gen3d[ray]')")
    batch.add_argument("--workers", type=_positive, metavar="N",
                       help="runs at a time (default: one per GPU, or cores / threads)")
    batch.add_argument("--threads", type=_positive, metavar="N", help="torch threads per run (default: cores / workers)")
    batch.add_argument("--ray-address", metavar="ADDR",
                       help="a Ray cluster's address (default: a local Ray for the batch)")
    batch.add_argument("--memory-gb", type=float, metavar="GB", default=2.0,
                       help="memory a run needs: a Ray task declares it; the local pool fits what is free (default 2)")
    batch.add_argument("--retry-failed", action="store_true", help="run the runs that failed before again")
    batch.add_argument("--quiet", action="store_true", help="no progress line")
    batch.set_defaults(takes_overrides=True, func=cmd_batch)

    plugins = sub.add_parser("plugins", help="list installed plugins and their components")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)
    add_plugin_commands(sub, registry)
    return parser


def add_plugin_commands(sub, registry) -> None:
    """Subcommands plugins contribute through the ``gen3d_commands`` hook."""
    for impl in registry.pm.hook.gen3d_commands.get_hookimpls():
        for name, help_text, setup in impl.function() or ():
            command = sub.add_parser(name, help=help_text, description=help_text)
            command.set_defaults(func=setup(command), takes_overrides=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: a plugin's traceback instead of one line
    argv = [a for a in argv if a != "--debug"]
    try:
        registry = get_registry()
        parser = build_parser(registry)
        # Overrides may come after options too: gen3d run R.yaml --out x steps=10
        args, extra = parser.parse_known_args(argv)
        takes_overrides = getattr(args, "takes_overrides", False) and hasattr(args, "overrides")
        stray = [e for e in extra if e.startswith("-") or "=" not in e or not takes_overrides]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
        return args.func(args)
    except Gen3DError as exc:
        if debug:
            raise
        hint = " (run with --debug for the plugin's traceback)" if isinstance(exc, PluginError) else ""
        print(f"gen3d: error: {exc}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
