"""User model factories: `module:function` or `path/to/file.py:function`, called with keyword arguments.

The factory is the user's own code. It is imported and called once per build; any failure it raises, or a result
that is not an `nn.Module`, is a one-line BadInput naming the factory. A `.py` path is imported under a name
derived from its resolved path, so two files with the same stem do not clash and dataclasses in it still work.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from edgesr.errors import BadInput


def first_line(exc: BaseException) -> str:
    """'ValueError: feats must be even' (bounded), for one-line errors about user code."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{exc.__class__.__name__}: {first[:200]}" if first else exc.__class__.__name__


def split_factory(factory: str) -> tuple[str, str]:
    """'pkg.mod:build' -> ('pkg.mod', 'build'); BadInput for anything else."""
    module_name, sep, func_name = factory.rpartition(":")
    if not sep or not module_name or not func_name.isidentifier():
        raise BadInput(f"--model {factory}: expected a preset name or MODULE:FACTORY (e.g. nets/sr.py:build)")
    return module_name, func_name


def is_file_reference(module_name: str) -> bool:
    return module_name.endswith(".py") or "/" in module_name or "\\" in module_name


def factory_file_sha256(factory: str) -> str | None:
    """sha256 of the .py file a factory reference names (None for an importable module name)."""
    module_name, _ = split_factory(factory)
    if not is_file_reference(module_name) or not Path(module_name).is_file():
        return None
    return hashlib.sha256(Path(module_name).read_bytes()).hexdigest()


def import_module(module_name: str) -> Any:
    """Import a module by name or from a .py path; BadInput for anything that fails."""
    if is_file_reference(module_name):
        path = Path(module_name)
        if not path.is_file():
            raise BadInput(f"{path}: no such Python file")
        unique = f"edgesr_user_model_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
        if unique in sys.modules:
            return sys.modules[unique]
        spec = importlib.util.spec_from_file_location(unique, path)
        if spec is None or spec.loader is None:
            raise BadInput(f"{path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code: any failure is the user's input problem
            del sys.modules[unique]
            raise BadInput(f"{path}: importing it failed: {first_line(exc)}") from None
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise BadInput(f"--model: no module named '{module_name}' (not importable from here)") from None
        raise BadInput(f"--model: importing {module_name} failed: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - user code
        raise BadInput(f"--model: importing {module_name} failed: {first_line(exc)}") from None


def build_factory_model(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """Import `module:function`, call it with `kwargs`; it must return an nn.Module."""
    module_name, func_name = split_factory(factory)
    func = getattr(import_module(module_name), func_name, None)
    if not callable(func):
        raise BadInput(f"--model {factory}: {module_name} has no callable '{func_name}'")
    try:
        model = func(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code
        raise BadInput(f"--model {factory}: {func_name}(**{json.dumps(kwargs)}) failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model {factory}: {func_name}() returned {type(model).__name__}, not a torch nn.Module")
    return model
