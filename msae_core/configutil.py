"""Dataclass configs: field metadata "help" becomes the CLI help, validation lists every problem.

A config dataclass declares fields as `x: int = field(default=1, metadata={"help": "..."})` and
a `problems() -> list[Problem]` method; `validate(cfg)` raises one InvalidSettings listing them all.
A `Problem` is the line a user reads and the field it is about, so that a form marks the widget
from the field, never by parsing the text.

Types are checked here, once, for every field of every config, against its annotation: `from_dict`
refuses json of the wrong type (a string for an int, 64.5 for an int, null for a float, a number
for a string, a string for a list) with one line naming the field, the type and the value, and
`collect_problems` reports a wrongly typed field of a config built in code the same way (its
`problems()` is not asked then: its range checks would compare values of the wrong type).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Literal, get_args, get_origin

from msae_core.errors import MsaeError


class Problem(str):
    """One problem of a config: the line a user reads (the str itself) and the field it is about
    (`field`, dotted from the outermost config: "sae.k"; "" when it is about no one field)."""

    field: str

    def __new__(cls, field: str, text: str) -> "Problem":
        p = super().__new__(cls, text)
        p.field = field
        return p

    def under(self, prefix: str) -> "Problem":
        """The same problem seen from the config that holds this one at `prefix` ("sae.")."""
        return Problem(prefix + self.field if self.field else "", prefix + self)


class InvalidSettings(MsaeError):
    """Settings with problems: the one-line message lists them all; `problems` keeps each with its field."""

    def __init__(self, problems: list[Problem]):
        super().__init__("invalid settings: " + "; ".join(problems))
        self.problems = list(problems)


def validate(cfg: Any) -> None:
    """Raise one InvalidSettings naming every problem that `cfg.problems()` reports (and nested configs')."""
    problems = collect_problems(cfg)
    if problems:
        raise InvalidSettings(problems)


def collect_problems(cfg: Any, prefix: str = "") -> list[Problem]:
    hints = typing.get_type_hints(type(cfg))
    typed = [Problem(prefix + f.name, p) for f in dataclasses.fields(cfg)
             if not dataclasses.is_dataclass(hints[f.name])
             for p in [type_problem(getattr(cfg, f.name), hints[f.name], prefix + f.name)] if p]
    if typed:
        return typed
    out: list[Problem] = []
    if hasattr(cfg, "problems"):
        out += [(p if isinstance(p, Problem) else Problem("", p)).under(prefix) for p in cfg.problems()]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out += collect_problems(v, prefix=f"{prefix}{f.name}.")
    return out


# ------------------------------------------------------------------------------------------ types
def _describe(t: Any) -> str:
    """The type annotation `t` in words, as a user writing json would read it."""
    origin = get_origin(t)
    if _is_optional(t):
        return f"{_describe(_base_type(t))} or null"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in get_args(t))
    if origin in (list, tuple):
        inner = get_args(t)[0] if get_args(t) else Any
        return "a list" + ("" if inner is Any else f" of {_describe(inner).removeprefix('a ').removeprefix('an ')}s")
    if origin is dict or t is dict:
        return "an object"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        t, getattr(t, "__name__", str(t)))


def _is_optional(t: Any) -> bool:
    origin = get_origin(t)
    return (origin is typing.Union or str(origin) == "types.UnionType") and type(None) in get_args(t)


def _fits(value: Any, t: Any) -> bool:
    if t is Any:
        return True
    if _is_optional(t):
        return value is None or _fits(value, _base_type(t))
    origin = get_origin(t)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return any(_fits(value, a) for a in get_args(t))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(t))
    if origin in (list, tuple):
        inner = get_args(t)[0] if get_args(t) else Any
        return isinstance(value, (list, tuple)) and all(_fits(v, inner) for v in value)
    if origin is dict or t is dict:
        return isinstance(value, dict)
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(t, type):
        return isinstance(value, t)
    return True  # an annotation this checker does not know (a forward reference): not checked


def type_problem(value: Any, t: Any, name: str) -> str | None:
    """None when `value` fits the annotation `t`, else one line naming the field, the expected type
    and the value given."""
    if _fits(value, t):
        return None
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{name}: expected {_describe(t)}, got {shown}"


def _as_type(value: Any, t: Any) -> Any:
    """A checked json value in the field's own type: ints for float fields become floats, json
    lists for tuple fields become tuples."""
    t = _base_type(t) if _is_optional(t) and value is not None else t
    if t is float and isinstance(value, int):
        return float(value)
    if get_origin(t) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, *, strict: bool = True, prefix: str = "") -> Any:
    """Build a (possibly nested) dataclass from a dict (json). Unknown keys are an error when
    strict; a value of the wrong type is always one (MsaeError naming every such field, `prefix`
    before each name, e.g. "sae.")."""
    where = prefix.rstrip(".") or cls.__name__
    if not isinstance(data, dict):
        raise MsaeError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and strict:
        raise MsaeError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    kwargs, problems = {}, []
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v, t = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            v = from_dict(t, v, strict=strict, prefix=f"{prefix}{f.name}.")
        elif (p := type_problem(v, t, prefix + f.name)) is not None:
            problems.append(p)
            continue
        kwargs[f.name] = _as_type(v, t)
    if problems:
        raise MsaeError("; ".join(problems))
    return cls(**kwargs)


def _base_type(t: Any) -> Any:
    origin = get_origin(t)
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        args = [a for a in get_args(t) if a is not type(None)]
        return _base_type(args[0]) if args else str
    return t


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
                       skip: tuple[str, ...] = ()) -> None:
    """Add one `--field-name` option per field of `cls`, help text from metadata["help"].

    Defaults are left as None so that `dataclass_from_args` can tell "not given" apart and let a
    --config file supply the value."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        t = _base_type(hints[f.name])
        opt = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_ = f.metadata.get("help", "")
        help_ = f"{help_} (default: {default})" if help_ else f"(default: {default})"
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": None, "help": help_}
        if get_origin(t) is Literal:
            kw["choices"] = list(get_args(t))
        elif t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif t in (int, float, str):
            kw["type"] = t
        elif get_origin(t) in (list, tuple):
            inner = get_args(t)[0] if get_args(t) else str
            kw["type"] = inner if inner in (int, float, str) else str
            kw["nargs"] = "+"
        parser.add_argument(opt, **kw)


def overrides_from_args(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict:
    """The fields of `cls` that were given on the command line, as a dict."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, prefix + f.name, None)
        if v is not None:
            out[f.name] = v
    return out
