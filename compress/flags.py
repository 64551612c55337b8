"""Command-line flags built from config dataclasses, so that every default lives in one place: the config.

A config field becomes `--field-name` (or the `flag` its metadata names), typed from its annotation, documented by
its metadata `help` and `choices`; booleans get `--x/--no-x`. Flags default to "not given" (argparse.SUPPRESS), so
the command knows exactly what the user set: it builds the config from those values over the config's own
defaults, and can reject a flag that the chosen method does not take. Float flags refuse NaN and infinities.

Configs validate themselves in `__post_init__` with `require(...)`, which raises `ConfigError` naming the field;
`flag_error` turns that into the message a CLI user reads ("--sparsity must be in (0, 1), got 1.5").
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

from edgesr.errors import finite_float


class ConfigError(ValueError):
    """A config value is wrong; `field` names it, the message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


def require(ok: bool, field: str, message: str) -> None:
    """ConfigError(field, message) unless `ok`."""
    if not ok:
        raise ConfigError(field, message)


def option(default: Any, help: str, choices: Iterable[str] | None = None, flag: str | None = None) -> Any:
    """A dataclass field with its CLI help (and choices, and a flag name other than --field-name)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def flag_error(exc: ConfigError, fields_of: type | None = None) -> str:
    """'--sparsity must be in (0, 1), got 1.5' for a ConfigError on field 'sparsity'."""
    flag = "--" + exc.field.replace("_", "-")
    if fields_of is not None:
        flag = next((flag_of(f) for f in dataclasses.fields(fields_of) if f.name == exc.field), flag)
    return f"{flag} {exc.message}"


def _value_type(cls: type, field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _describe_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    owners: dict[str, type],
    skip: Iterable[str] = (),
    defaults_note: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """Add one flag per field of the configs in `owners` (name -> config class); a field several configs share
    becomes one flag whose help lists each owner's default. Returns {field name: [owner names]}."""
    skip = set(skip)
    by_field: dict[str, list[tuple[str, type, dataclasses.Field]]] = {}
    for owner, cls in owners.items():
        for f in dataclasses.fields(cls):
            if f.name not in skip and f.init:
                by_field.setdefault(f.name, []).append((owner, cls, f))
    for name, entries in by_field.items():
        owner, cls, f = entries[0]
        kind = _value_type(cls, f)
        defaults = {o: _describe_default(fl.default) for o, _, fl in entries}
        if (defaults_note or {}).get(name):
            default_text = defaults_note[name]
        elif len(set(defaults.values())) == 1 and len(owners) == 1:
            default_text = f"default {next(iter(defaults.values()))}"
        else:
            default_text = "; ".join(f"{o}: default {d}" for o, d in defaults.items())
        takers = "" if len(owners) == 1 else f"[{', '.join(o for o, _, _ in entries)}] "
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        kwargs["help"] = f"{takers}{f.metadata.get('help', '')} ({default_text})"
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = finite_float if kind is float else kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag_of(f), **kwargs)
    return {name: [o for o, _, _ in entries] for name, entries in by_field.items()}


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The values of the flags among `names` that the user actually gave."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def build_config(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """`cls` from `values` over `base` (an instance) or over the class defaults; ConfigError if invalid."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if k in known}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)
