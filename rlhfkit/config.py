"""Typed, documented, validated settings: each declared once, as a dataclass field made with `setting`.

    @dataclass
    class MyConfig:
        steps: int = setting(10, "optimizer steps", group="shared", check=at_least(0))
        mode: Literal["a", "b"] = setting("a", "what to do")

        def __post_init__(self) -> None:
            validate(self)

`validate` checks every field's type (incl. `Literal` choices and `X | None`) and its `check`; a bad value
raises ConfigError, which names the key, the value and what is accepted. `parse_overrides` turns key=value
arguments into typed values (unknown keys get the closest valid names), and `format_help` prints the fields
grouped, each with its type, default and help text.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from rlhfkit.errors import UserError

Check = Callable[[Any], "str | None"]  # returns what is accepted when the value is bad, None when it is fine


class ConfigError(UserError, ValueError):
    """A bad setting: `key`, the offending `value`, and what is `accepted`."""

    def __init__(self, key: str, value: Any, accepted: str):
        self.key, self.value, self.accepted = key, value, accepted
        super().__init__(f"{key}={value!r}: {accepted}")


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    group: str = "shared",
    check: Check | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a one-line help text, a help group and an optional value check."""
    if not help:
        raise TypeError("every setting needs a help text")
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"help": help, "group": group, "check": check}
    )


# ---------------------------------------------------------------------------------------------------------
# Checks


def at_least(low: float) -> Check:
    return lambda value: None if value is None or value >= low else f"expected a number >= {low}"


def positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "expected a number > 0"


def between(low: float, high: float) -> Check:
    return lambda value: None if value is None or low <= value <= high else f"expected a number in [{low}, {high}]"


def existing_path(value: Any) -> str | None:
    return None if value is None or Path(value).expanduser().exists() else "no such file or folder"


# ---------------------------------------------------------------------------------------------------------
# Types


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of a dataclass (works with `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def describe_type(tp: Any) -> str:
    """e.g. "int | None", "'verdict' | 'probability'"."""
    if (args := _union_args(tp)) is not None:
        return " | ".join(describe_type(a) for a in args)
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _accepted(tp: Any) -> str:
    if typing.get_origin(tp) is Literal or _union_args(tp):
        return f"expected one of {describe_type(tp)}"
    return f"expected {'a' if describe_type(tp)[0] not in 'aeiou' else 'an'} {describe_type(tp)}"


def coerce(key: str, tp: Any, value: Any) -> Any:
    """`value` (a command-line string, or a JSON/TOML value) as type `tp`; ConfigError if it is not one."""
    if (args := _union_args(tp)) is not None:
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(key, value, _accepted(tp))
    if typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        close = difflib.get_close_matches(str(value), [str(c) for c in typing.get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(key, value, _accepted(tp) + hint)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(key, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(key, value, "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, value, "expected a number")
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ConfigError(key, value, "expected a string")
    return value  # other types (builders, lists, callables) are checked by the class itself


def validate(obj: Any) -> None:
    """Check every field of a dataclass instance: its type (ints are accepted for floats and converted), then
    its `check`. Float fields given as ints are stored as floats (also in frozen dataclasses)."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        tp = hints.get(f.name, Any)
        coerced = coerce(f.name, tp, value)
        if isinstance(value, str) and not isinstance(coerced, str):
            raise ConfigError(f.name, value, _accepted(tp))  # a string is only a value when typed as one
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)
        check = f.metadata.get("check")
        if check is not None and (problem := check(coerced)) is not None:
            raise ConfigError(f.name, value, problem)


# ---------------------------------------------------------------------------------------------------------
# key=value arguments, and help


def unknown_key_error(key: str, known: Iterable[str], value: Any = None) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see --help for the settings"
    return ConfigError(key, value, f"unknown setting; {hint}")


def split_key_values(argv: Iterable[str]) -> list[tuple[str, str]]:
    pairs = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(arg, None, "expected key=value (see --help)")
        pairs.append((key.strip(), value))
    return pairs


def parse_values(cls: type, values: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Settings of `cls` from strings or JSON values, typed; unknown keys raise a ConfigError."""
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    out = {}
    for key, value in values.items():
        if key not in names:
            error = unknown_key_error(key, names, value)
            if source:
                error.args = (f"{source}: {error.args[0]}",)
            raise error
        out[key] = coerce(key, hints[key], value)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_help(
    cls: type, groups: Iterable[str] = (), overrides: dict[str, Any] | None = None, override_label: str = "preset"
) -> str:
    """Every field of `cls`, grouped (in the order of `groups`, then any others), with type, default, the
    value of `overrides` where it differs, and the help text."""
    hints = field_types(cls)
    by_group: dict[str, list[dataclasses.Field]] = {g: [] for g in groups}
    for f in dataclasses.fields(cls):
        if f.init:
            by_group.setdefault(f.metadata.get("group", "shared"), []).append(f)
    lines = []
    for group, fields in by_group.items():
        if not fields:
            continue
        lines.append(f"{group}:")
        for f in fields:
            default = _default(f)
            head = f"  {f.name} ({describe_type(hints.get(f.name, Any))})"
            if default is not dataclasses.MISSING:
                head += f" = {default!r}"
            if overrides and f.name in overrides and overrides[f.name] != default:
                head += f"  [{override_label}: {overrides[f.name]!r}]"
            lines.append(head)
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """The environment variables that change rlhfkit's behaviour (RLHFKIT_* and a few of its libraries')."""
    from rlhfkit import environment as env

    return env.snapshot()
