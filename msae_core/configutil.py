"""Dataclass configs: field metadata "help" becomes the CLI help, validation lists every problem.

A config dataclass declares fields as `x: int = field(default=1, metadata={"help": "..."})` and
a `problems() -> list[str]` method; `validate(cfg)` raises one MsaeError listing them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from msae_core.errors import MsaeError


def validate(cfg: Any) -> None:
    """Raise one MsaeError naming every problem that `cfg.problems()` reports (and nested configs')."""
    problems = collect_problems(cfg)
    if problems:
        raise MsaeError("invalid settings: " + "; ".join(problems))


def collect_problems(cfg: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if hasattr(cfg, "problems"):
        out += [prefix + p for p in cfg.problems()]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out += collect_problems(v, prefix=f"{prefix}{f.name}.")
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, *, strict: bool = True) -> Any:
    """Build a (possibly nested) dataclass from a dict; unknown keys are an error when strict."""
    if not isinstance(data, dict):
        raise MsaeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and strict:
        raise MsaeError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        t = hints[f.name]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v, strict=strict)
        kwargs[f.name] = v
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
