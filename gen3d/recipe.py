"""Recipes: YAML files that name a loop (or a list of stages) and their components, with dotted
command-line overrides.

A one-stage recipe is flat: a few keys every recipe shares (:class:`RunSettings`: ``seed``,
``device``), the stage's own keys (:class:`StageSettings`: ``loop``, ``steps``, ``max_seconds``,
``export``, ``preview``, ...), and every other top-level key belongs to the loop's config. A
multi-stage recipe holds the shared keys and ``stages:``, an ordered list of such stage
mappings, each with a ``name``; a later stage may start from an earlier one (``init_from``).
The whole recipe is validated into typed configs, against the installed plugins (a registry
passed in), before any work starts.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import Choice, Context, component_config, fail, from_dict, to_dict
from .errors import ConfigError
from .export import MeshSettings
from .fields import check_capabilities
from .outputs import PreviewSettings


@dataclass
class RunSettings:
    """Keys the whole run shares."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class StageSettings:
    """Keys every stage has, whatever its loop."""

    loop: str
    name: str = "main"
    steps: int = 1000  # the step budget (a loop that does not train, e.g. preprocess, ignores it)
    max_seconds: float | None = None  # optional wall-clock budget for training (evaluation excluded)
    checkpoint_every: int = 200
    # Evaluate (untimed) when training time passes these marks: PSNR at 15 s, 30 s, ... for benchmarks.
    eval_at_seconds: list[float] = field(default_factory=list)
    # Start this stage's field from an earlier stage's (its name): by the field's own conversion
    # when it has one (init_from(other)), else by distillation (fit the earlier field's density
    # and colour at random points).
    init_from: str | None = None
    export: MeshSettings = field(default_factory=MeshSettings)
    preview: PreviewSettings = field(default_factory=PreviewSettings)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be 0 or more, got {self.steps}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")


@dataclass
class Stage:
    settings: StageSettings
    loop: Any  # the loop component's config instance
    component: Any  # the loop component


@dataclass
class Recipe:
    settings: RunSettings
    stages: list[Stage]
    source: str
    staged: bool = False  # written with a stages: list (else one flat stage)

    @property
    def loop(self) -> Any:
        """The loop config of a one-stage recipe (the first stage's in a multi-stage one)."""
        return self.stages[0].loop

    @property
    def first(self) -> StageSettings:
        """The stage settings of a one-stage recipe (the first stage's in a multi-stage one)."""
        return self.stages[0].settings

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.settings.name == name)

    def to_dict(self) -> dict[str, Any]:
        stages = [{**to_dict(s.settings), **to_dict(s.loop)} for s in self.stages]
        if self.staged:
            return {**to_dict(self.settings), "stages": stages}
        single = stages[0]
        single.pop("name")
        return {**to_dict(self.settings), **single}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


RUN_KEYS = [f.name for f in fields(RunSettings)]
STAGE_KEYS = [f.name for f in fields(StageSettings)]


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value), the value read as YAML (so 200 is a number, [a,b] a list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # prompt=a cat: sitting is text, not a mapping
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (dotted) to ``value``; in a list of stages, a part is a stage's name or index
    (``stages.fine.steps=600``, ``stages.1.steps=600``)."""
    node = data
    parts = key.split(".")
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        if isinstance(node.get(part), list) and i + 2 < len(parts):
            node = _list_entry(node[part], parts[i + 1], key)
            i += 2
            continue
        i += 1
        child = node.get(part)
        if isinstance(child, str):  # `representation: grid-nerf` shorthand
            child = {"type": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is a value, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _list_entry(items: list, part: str, key: str) -> dict:
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part.isdigit() and int(part) < len(items) and isinstance(items[int(part)], dict):
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    raise ConfigError(f"override {key}: no stage {part!r}; stages: {', '.join(map(str, names)) or '(none)'}")


def load_recipe(path: Path, overrides: list[str] = (), *, registry) -> Recipe:
    """Read, override and validate a recipe against ``registry`` (a gen3d.plugins.Registry)."""
    path = Path(path)
    data = copy.deepcopy(read_yaml(path))
    cli_keys = set()
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
        cli_keys.add(key)
    rename_old_keys(data)
    return recipe_from_dict(data, Context(source=str(path), base_dir=path.parent.resolve(),
                                          cli_keys=frozenset(cli_keys), registry=registry))


# Keys renamed since gen3d first wrote them: (section, old key, new key, what else the old
# meaning implies). Run folders keep the recipe they ran with, so a teacher or a resumed run
# written before a rename must still load and mean what it meant. export.decimate dates from
# before textured exports: those runs exported vertex colours.
RENAMED_KEYS = [("export", "decimate", "target_faces", {"colors": "vertex"})]


def rename_old_keys(data: dict[str, Any]) -> None:
    """Move renamed keys to their new names, at the top and in every stage (in place)."""
    sections = [data, *[s for s in data.get("stages") or [] if isinstance(s, dict)]]
    for holder in sections:
        for section, old, new, implied in RENAMED_KEYS:
            part = holder.get(section)
            if isinstance(part, dict) and old in part:
                value = part.pop(old)
                part.setdefault(new, value)
                for key, meant in implied.items():
                    part.setdefault(key, meant)


def recipe_from_dict(data: dict[str, Any], ctx: Context) -> Recipe:
    if "stages" in data:
        return _staged(data, ctx)
    if "loop" not in data:
        raise ConfigError(f"{ctx.source}: loop: missing; a recipe names its loop, e.g. 'loop: nerf-reconstruct', "
                          "or lists its stages:")
    run = from_dict(RunSettings, {k: v for k, v in data.items() if k in RUN_KEYS}, ctx)
    stage = _stage({k: v for k, v in data.items() if k not in RUN_KEYS}, ctx, "", RUN_KEYS)
    return Recipe(settings=run, stages=[stage], source=ctx.source)


def _staged(data: dict[str, Any], ctx: Context) -> Recipe:
    run = from_dict(RunSettings, {k: v for k, v in data.items() if k in RUN_KEYS}, ctx)
    raw = data["stages"]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, dict) for s in raw):
        raise fail(ctx, "stages", "expected a list of stage mappings, each with a name and a loop")
    raw, ctx = _share_inputs(data, raw, ctx)
    stages: list[Stage] = []
    for i, entry in enumerate(raw):
        key = f"stages[{i}]"
        if "name" not in entry or "loop" not in entry:
            raise fail(ctx, key, "every stage needs a name and a loop, e.g. {name: coarse, loop: nerf-reconstruct}")
        stage = _stage(entry, ctx, key, [])
        names = [s.settings.name for s in stages]
        if stage.settings.name in names:
            raise fail(ctx, f"{key}.name", f"stage name {stage.settings.name!r} is used twice")
        if stage.settings.init_from is not None and stage.settings.init_from not in names:
            raise fail(ctx, f"{key}.init_from", f"{stage.settings.init_from!r} is not an earlier stage; "
                                                f"earlier stages: {', '.join(names) or '(none)'}")
        stages.append(stage)
    return Recipe(settings=run, stages=stages, source=ctx.source, staged=True)


def _share_inputs(data: dict[str, Any], raw: list[dict], ctx: Context) -> tuple[list[dict], Context]:
    """A multi-stage recipe's other top-level keys are its inputs (``image=photo.jpg``): each goes
    to every stage whose loop has that key and does not set it itself, so one override on the
    command line reaches the stage that reads it. A key no stage takes is an error."""
    shared = {k: v for k, v in data.items() if k not in RUN_KEYS + ["stages"]}
    entries = [dict(entry) for entry in raw]
    cli_keys = set(ctx.cli_keys) | _stage_cli_keys(ctx.cli_keys, entries)
    takes = [_loop_keys(ctx, entry, i) for i, entry in enumerate(entries)] if shared else []
    for key, value in shared.items():
        takers = [i for i in range(len(entries)) if key in takes[i]]
        if not takers:
            known = sorted(set().union(*takes))
            raise fail(ctx, key, f"{_unknown(key, RUN_KEYS + ['stages'] + known)} (a recipe with stages: passes a "
                                 "top-level key to the stages whose loop takes it, and none takes this one)")
        for i in (i for i in takers if key not in entries[i]):  # a stage's own setting wins
            entries[i][key] = copy.deepcopy(value)
            if key in ctx.cli_keys:  # a path given on the command line stays relative to the cwd
                cli_keys.add(f"stages[{i}].{key}")
    return entries, Context(source=ctx.source, base_dir=ctx.base_dir, cli_keys=frozenset(cli_keys),
                            registry=ctx.registry)


def _stage_cli_keys(cli_keys: frozenset[str], entries: list[dict]) -> set[str]:
    """``stages.fine.data.path`` (by name or index, as overrides say it) as validation names it,
    ``stages[1].data.path``: so a path set on the command line resolves against the cwd."""
    names = [entry.get("name") for entry in entries]
    out = set()
    for key in cli_keys:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "stages":
            index = int(parts[1]) if parts[1].isdigit() else names.index(parts[1]) if parts[1] in names else None
            if index is not None:
                out.add(f"stages[{index}]." + ".".join(parts[2:]))
    return out


def _loop_keys(ctx: Context, entry: dict[str, Any], index: int) -> set[str]:
    """The config keys of a stage's loop (none when the stage names no loop: reported later)."""
    if "loop" not in entry:
        return set()
    component = ctx.registry.get("loop", str(entry["loop"]), where=f"{ctx.source}: stages[{index}].loop")
    return {f.name for f in fields(component.config)} - set(STAGE_KEYS) if component.config else set()


def _stage(data: dict[str, Any], ctx: Context, prefix: str, other_keys: list[str]) -> Stage:
    """One stage: its StageSettings, its loop component and the loop's config, all validated."""
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    settings = from_dict(StageSettings, {k: v for k, v in data.items() if k in STAGE_KEYS}, ctx, prefix)
    component = ctx.registry.get("loop", settings.loop, where=f"{ctx.source}: {join('loop')}")
    loop_keys = [f.name for f in fields(component.config)] if component.config else []
    rest = {k: v for k, v in data.items() if k not in STAGE_KEYS}
    for key in rest:
        if key not in loop_keys:
            raise fail(ctx, join(str(key)), _unknown(str(key), other_keys + STAGE_KEYS + loop_keys))
    loop_config = component_config(component, rest, ctx, prefix)
    # A loop whose config class says TRAINS = False (a preprocessing stage) needs no steps.
    if settings.steps < 1 and getattr(component.config, "TRAINS", True):
        raise fail(ctx, join("steps"), f"steps must be at least 1 for the training loop {component.name!r}, "
                                       f"got {settings.steps}")
    representation = getattr(loop_config, "representation", None)
    if isinstance(representation, Choice) and component.needs:
        check_capabilities(representation.component, tuple(component.needs), f"loop {component.name!r}",
                           f"{ctx.source}: {join('representation.type')}")
    resolve_exporters(settings.export, ctx, join("export"))
    return Stage(settings=settings, loop=loop_config, component=component)


def resolve_exporters(export: MeshSettings, ctx: Context, key: str) -> None:
    """Each format's exporter component and its config (``export.options.FORMAT``, defaults when absent)."""
    for name in export.options:
        if name not in export.formats:
            raise fail(ctx, f"{key}.options.{name}", f"options for {name!r}, which is not in export.formats "
                                                     f"({', '.join(export.formats)})")
    export.exporters = []
    for fmt in export.formats:
        component = ctx.registry.get("exporter", fmt, where=f"{ctx.source}: {key}.formats")
        settings = export.options.get(fmt) or {}
        if not isinstance(settings, dict):
            raise fail(ctx, f"{key}.options.{fmt}", f"expected a mapping of settings, got {settings!r}")
        config = component_config(component, settings, ctx, f"{key}.options.{fmt}")
        export.exporters.append(Choice(kind="exporter", type=fmt, config=config, component=component))


def _unknown(name: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(str(name), known, n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    return f"unknown key {name!r}.{did_you_mean} Known keys: {', '.join(sorted(set(known)))}"
