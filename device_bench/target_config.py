"""The targets file: one YAML that names every remote target (`--targets local,pi,phone --targets-file FILE`).

  targets:
    pi:                                # the name used in --targets and in reports
      type: ssh                        # ssh | adb | local
      host: 127.0.0.1                  # or an ~/.ssh/config alias
      identity: .pi/key                # relative paths are relative to the targets file
      ...

Each entry is handed to its target class's `from_config(name, entry, base_dir)`, which reads its fields through
`EntryFields`: typed getters that turn a wrong or misspelt field into a one-line BadInput naming the target and
field. The loader adds the file name to that message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device_bench.runner import RUNTIMES
from edgesr.errors import BadInput
from edgesr.manifest import read_yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # target names become folder names under <out>/jobs/
_REQUIRED = object()


def load_targets_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """name -> entry (a dict with at least a string `type`), as written in the file."""
    path = Path(path)
    data = read_yaml(path, "targets file")
    if not isinstance(data, dict) or not isinstance(data.get("targets"), dict) or not data["targets"]:
        raise BadInput(f"{path}: expected a mapping 'targets:' with at least one named target")
    unknown = set(data) - {"targets"}
    if unknown:
        raise BadInput(f"{path}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; expected 'targets'")
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in data["targets"].items():
        if not isinstance(name, str) or not NAME.match(name):
            raise BadInput(f"{path}: target name {name!r} must be letters, digits, '.', '_' or '-'")
        if not isinstance(entry, dict):
            raise BadInput(f"{path}: target {name}: expected a mapping of settings, got {type(entry).__name__}")
        if not isinstance(entry.get("type"), str):
            raise BadInput(f"{path}: target {name}: 'type' is required (ssh, adb or local)")
        entries[name] = entry
    return entries


def normalize_runtime(value: str) -> str:
    """`auto` or a runner runtime name; the distribution spellings (ai-edge-litert, tflite-runtime) are accepted."""
    name = value.strip().replace("-", "_")
    if name != "auto" and name not in RUNTIMES:
        choices = ", ".join(["auto", "ai-edge-litert", "tflite-runtime", "tensorflow"])
        raise BadInput(f"runtime {value!r} is not one of {choices}")
    return name


class EntryFields:
    """Typed access to one target's settings; `check_unknown()` at the end catches misspelt keys."""

    def __init__(self, name: str, entry: Mapping[str, Any], base_dir: Path) -> None:
        self.name, self.entry, self.base_dir = name, entry, Path(base_dir)
        self.used: set[str] = {"type"}

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        value = self.entry.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        return value

    def error(self, key: str, problem: str) -> BadInput:
        return BadInput(f"target {self.name}: field '{key}' {problem}")

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return str(value)

    def integer(
        self, key: str, default: Any = _REQUIRED, minimum: int | None = None, maximum: int | None = None
    ) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self.error(key, f"must be in [{minimum}, {maximum}], got {value}")
        return value

    def number(self, key: str, default: Any = _REQUIRED, positive: bool = True) -> Any:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or (positive and not value > 0):
            raise self.error(key, f"must be a {'positive ' if positive else ''}number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def path(self, key: str, default: Any = _REQUIRED, must_exist: bool = True) -> Any:
        """A host path: `~` expanded, relative paths taken relative to the targets file's folder."""
        value = self.text(key, default)
        if value is default:
            return value
        p = Path(value).expanduser()
        p = p if p.is_absolute() else self.base_dir / p
        if must_exist and not p.exists():
            raise self.error(key, f"names {p}, which does not exist")
        return p

    def env(self, key: str = "env") -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"must be a mapping NAME: value, got {value!r}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise self.error(key, f"has an invalid variable name {k!r}")
            if isinstance(v, dict | list) or v is None:
                raise self.error(key, f"variable {k} must be a string, got {v!r}")
            out[k] = str(v)
        return out

    def runtime(self, key: str = "runtime", default: str = "auto") -> str:
        value = self.text(key, default)
        try:
            return normalize_runtime(value)
        except BadInput as exc:
            raise self.error(key, str(exc).removeprefix("runtime ")) from None

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def check_unknown(self) -> None:
        unknown = sorted(set(map(str, self.entry)) - self.used)
        if unknown:
            raise BadInput(
                f"target {self.name}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(self.used))}"
            )
