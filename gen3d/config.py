"""Typed dataclass configs, validated from plain dicts (YAML) with errors that name the key path.

Written by hand rather than with pydantic so the messages read the way a recipe author
thinks: ``recipe.yaml: representation.lr: expected a number, got 'fast'`` and
``unknown key 'stpes', did you mean 'steps'?``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError, call_plugin


@dataclass
class Choice:
    """A recipe section that picks a component by name: ``{type: grid-nerf, <its settings>}``.

    Validation resolves the name to the installed component (``component``), so building needs
    no registry look-up and a misspelt name fails before any work starts."""

    kind: str
    type: str
    config: Any = None
    component: Any = dataclasses.field(default=None, compare=False, repr=False)

    def build(self, **context: Any) -> Any:
        """The chosen component, made from its settings (``context``: what the loop passes, e.g. device).
        An exception raised by the plugin becomes a one-line :class:`PluginError` naming it."""
        if self.component is None:
            raise ConfigError(f"{self.kind} {self.type!r} was not resolved against the installed plugins")
        return call_plugin(self.component, "building it", self.component.factory, self.config, **context)


def choice(kind: str, default: str | None) -> Any:
    """A dataclass field holding a :class:`Choice` of ``kind``, defaulting to component ``default``
    (None: no component). A field typed ``Choice | None`` may be set to ``null`` in a recipe."""
    if default is None:
        return field(default=None, metadata={"kind": kind})
    return field(default_factory=lambda: {"type": default}, metadata={"kind": kind})


@dataclass
class Context:
    """Where values come from, for messages and for resolving relative paths."""

    source: str = "<recipe>"
    base_dir: Path = Path(".")
    cli_keys: frozenset[str] = frozenset()  # keys set on the command line resolve against the cwd
    # The installed components (a gen3d.plugins.Registry), for sections that pick one by name.
    # Passed in, not imported: configs stay importable without loading any plugin.
    registry: Any = None

    def path(self, key: str, value: str) -> Path:
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        return ((Path.cwd() if key in self.cli_keys else self.base_dir) / p).resolve()


def fail(ctx: Context, key: str, message: str) -> ConfigError:
    return ConfigError(f"{ctx.source}: {key or '<top level>'}: {message}")


def from_dict(cls: type, data: Any, ctx: Context, key: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    if isinstance(data, cls):  # a default_factory default
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail(ctx, key, f"expected a mapping of settings, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            raise fail(ctx, _join(key, str(name)), _unknown(str(name), list(fields)))
    values = {}
    for name, f in fields.items():
        sub = _join(key, name)
        if name in data:
            raw = data[name]
        elif f.default is not dataclasses.MISSING:
            raw = f.default
        elif f.default_factory is not dataclasses.MISSING:
            raw = f.default_factory()
        else:
            raise fail(ctx, sub, "missing required setting")
        if "kind" in f.metadata and raw is None and type(None) in typing.get_args(hints[name]):
            values[name] = None  # an optional choice (typed `Choice | None`) left out or set to null
        elif "kind" in f.metadata:
            if isinstance(raw, dict) and "type" not in raw and f.default_factory is not dataclasses.MISSING:
                raw = {**f.default_factory(), **raw}  # settings without a type: the default component's
            values[name] = _choice(f.metadata["kind"], raw, ctx, sub)
        else:
            values[name] = convert(hints[name], raw, ctx, sub)
    try:
        obj = cls(**values)
    except (ValueError, TypeError) as exc:  # a config's own __post_init__ check
        raise fail(ctx, key, str(exc)) from None
    return obj


def _choice(kind: str, raw: Any, ctx: Context, key: str) -> Choice:
    if isinstance(raw, Choice):
        return raw
    if ctx.registry is None:
        raise fail(ctx, key, f"a {kind} is chosen here, but no plugin registry was given to resolve it")
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict) or "type" not in raw:
        raise fail(ctx, key, f"expected a mapping with 'type: <{kind} name>', got {_show(raw)}")
    settings = dict(raw)
    name = settings.pop("type")
    component = ctx.registry.get(kind, str(name), where=f"{ctx.source}: {key}.type")
    return Choice(kind=kind, type=str(name), config=component_config(component, settings, ctx, key),
                  component=component)


def component_config(component: Any, settings: dict, ctx: Context, key: str) -> Any:
    """The component's config instance from its recipe settings (its defaults where none are given)."""
    if component.config is None:
        if settings:
            raise fail(ctx, key, f"{component.kind} {component.name!r} takes no settings, got {sorted(settings)}")
        return None
    return from_dict(component.config, settings, ctx, key)


def convert(tp: Any, value: Any, ctx: Context, key: str) -> Any:
    """Convert one value to type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(option, value, ctx, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise fail(ctx, key, f"expected {_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if value in args:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise fail(ctx, key, f"expected one of {', '.join(map(repr, args))}, got {_show(value)}.{extra}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, ctx, key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail(ctx, key, f"expected a list, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(ctx, key, f"expected {len(args)} values, got {len(value)}")
            return tuple(convert(a, v, ctx, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [convert(item, v, ctx, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail(ctx, key, f"expected a mapping, got {_show(value)}")
        return dict(value)
    return _scalar(tp, value, ctx, key)


def _scalar(tp: Any, value: Any, ctx: Context, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail(ctx, key, f"expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail(ctx, key, f"expected a whole number, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 4e-4 (no dot) as text; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        raise fail(ctx, key, f"expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail(ctx, key, f"expected text, got {_show(value)}")
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return ctx.path(key, str(value))
        raise fail(ctx, key, f"expected a file or folder path, got {_show(value)}")
    raise TypeError(f"config type {tp!r} at {key} is not supported")


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data from a config (the inverse of :func:`from_dict`)."""
    if isinstance(obj, Choice):
        return {"type": obj.type, **(to_dict(obj.config) if obj.config is not None else {})}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _unknown(name: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(name, known, n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    return f"unknown key {name!r}.{did_you_mean} Known keys: {', '.join(sorted(known))}"


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


