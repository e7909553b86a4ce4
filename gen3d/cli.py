"""The ``gen3d`` command: ``run`` a recipe, list ``plugins``, and the commands plugins add
(``gen3d_commands``: ``preprocess`` a photo comes from one)."""

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
