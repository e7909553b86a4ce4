"""Recipes: YAML files that name a loop and its components, with dotted command-line overrides.

A recipe has a few keys every recipe shares (:class:`RunSettings`: ``loop``, ``steps``,
``max_seconds``, ...); every other top-level key belongs to the loop's own config.
The whole recipe is validated into typed configs before any work starts.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import Context, from_dict, to_dict
from .errors import ConfigError
from .plugins import get_component


@dataclass
class RunSettings:
    loop: str
    steps: int = 1000  # the step budget
    max_seconds: float | None = None  # optional wall-clock budget for training (evaluation excluded)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 200
    # Evaluate (untimed) when training time passes these marks: PSNR at 15 s, 30 s, ... for benchmarks.
    eval_at_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")


@dataclass
class Recipe:
    settings: RunSettings
    loop: Any  # the loop component's config instance
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {**to_dict(self.settings), **to_dict(self.loop)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


COMMON_KEYS = [f.name for f in fields(RunSettings)]


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
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str):  # `representation: grid-nerf` shorthand
            child = {"type": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    data = copy.deepcopy(read_yaml(path))
    cli_keys = set()
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
        cli_keys.add(key)
    return recipe_from_dict(data, Context(source=str(path), base_dir=path.parent.resolve(),
                                          cli_keys=frozenset(cli_keys)))


def recipe_from_dict(data: dict[str, Any], ctx: Context) -> Recipe:
    if "loop" not in data:
        raise ConfigError(f"{ctx.source}: loop: missing; a recipe names its loop, e.g. 'loop: nerf-reconstruct'")
    common = {k: v for k, v in data.items() if k in COMMON_KEYS}
    rest = {k: v for k, v in data.items() if k not in COMMON_KEYS}
    settings = from_dict(RunSettings, common, ctx)
    component = get_component("loop", settings.loop, where=f"{ctx.source}: loop")
    loop_keys = [f.name for f in fields(component.config)] if component.config else []
    for key in rest:
        if key not in loop_keys:
            known = COMMON_KEYS + loop_keys
            hint = difflib.get_close_matches(str(key), known, n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{ctx.source}: {key}: unknown key {key!r}.{did_you_mean} "
                              f"Known keys: {', '.join(sorted(known))}")
    loop_config = from_dict(component.config, rest, ctx) if component.config else None
    return Recipe(settings=settings, loop=loop_config, source=ctx.source)
