"""User model factories: `module:function` or `path/to/file.py:function`, called with keyword arguments.

The factory is the user's own code. It is imported and called twice per build: once on torch's meta device, to
count the parameters before any memory is spent (see bounded_build), then for real; any failure it raises, or a
result that is not an `nn.Module`, is a one-line BadInput naming the factory. A `.py` path is imported under a name
derived from its resolved path, so two files with the same stem do not clash and dataclasses in it still work.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgesr.errors import BadInput, first_line


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
        unique = f"edgesr_user_model_{hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:16]}"
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


MAX_MODEL_PARAMS = 1 << 28  # 268M parameters (1 GiB of float32): 6x EDSR's full paper model; more is a mistake


def bounded_build(build: Callable[[], Any], origin: str) -> Any:
    """`build()`, after the same call on torch's meta device (shapes only, no memory) showed a model of at most
    MAX_MODEL_PARAMS parameters and buffers: a typo such as n_feats 100000 is refused before it allocates 360 GB.
    A builder that cannot run on the meta device (it loads files, computes on tensors) is built for real."""
    try:
        with torch.device("meta"):
            shaped = build()
    except BadInput:
        raise
    except Exception:  # noqa: BLE001 - user code may not run on meta tensors; the real build reports its errors
        shaped = None
    if isinstance(shaped, nn.Module):
        count = sum(t.numel() for t in [*shaped.parameters(), *shaped.buffers()])
        if count > MAX_MODEL_PARAMS:
            raise BadInput(
                f"{origin}: the model would hold {count:,} parameters ({4 * count / 2**30:.1f} GiB as float32), "
                f"more than the {MAX_MODEL_PARAMS:,} edgesr builds; check its size arguments"
            )
    return build()


def build_factory_model(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """Import `module:function`, call it with `kwargs`; it must return an nn.Module."""
    module_name, func_name = split_factory(factory)
    func = getattr(import_module(module_name), func_name, None)
    if not callable(func):
        raise BadInput(f"--model {factory}: {module_name} has no callable '{func_name}'")
    try:
        model = bounded_build(lambda: func(**kwargs), f"--model {factory}")
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - user code
        raise BadInput(f"--model {factory}: {func_name}(**{json.dumps(kwargs)}) failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model {factory}: {func_name}() returned {type(model).__name__}, not a torch nn.Module")
    return model
