"""Model registry and recipes: how every SR network edgesr handles is built, and rebuilt from a checkpoint.

A model's recipe is what builds its architecture again, as a plain dict that checkpoints store:
- `{"kind": "preset", "arch": "edsr", "config": {...}}` for edgesr's own architectures (`create_model(name)`);
- `{"kind": "factory", "factory": "nets/sr.py:build", "factory_args": {...}, "factory_sha256": ...}` for a user's
  model, built by calling their factory again.
A pruned network is its recipe plus the per-module shapes of `compress.models.shapes`, so presets and user models
are rebuilt the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from torch import nn

from compress.models.edsr import EDSR, EDSRConfig, edsr_config
from compress.models.edsr import PRESETS as EDSR_PRESETS
from compress.models.factory import bounded_build, build_factory_model, factory_file_sha256
from compress.models.rdn import PRESETS as RDN_PRESETS
from compress.models.rdn import RDN, RDNConfig, rdn_config
from edgesr.errors import BadInput

log = logging.getLogger(__name__)

ARCHS: dict[str, tuple[type, type]] = {"edsr": (EDSR, EDSRConfig), "rdn": (RDN, RDNConfig)}
# Preset name -> (architecture class, config builder(preset, scale, **overrides)).
PRESETS: dict[str, tuple[type, Callable[..., Any]]] = {
    **{name: (EDSR, edsr_config) for name in EDSR_PRESETS},
    **{name: (RDN, rdn_config) for name in RDN_PRESETS},
}
# Module-name globs of the layers each architecture sparsifies by default (`--layers default`). EDSR: every body
# conv (both convs of each ResBlock and the final body conv); head, upsampler and tail stay dense, as in the
# IKS reference code (RaccoonDML/IKS, Train_code/code/model/edsr.py).
# RDN: every conv of the residual dense blocks (their C dense convs and the 1x1 local fusion).
DEFAULT_SPARSE_LAYERS: dict[str, tuple[str, ...]] = {"edsr": ("body.*",), "rdn": ("rdbs.*",)}


def list_models() -> list[str]:
    return sorted(PRESETS)


def create_model(name: str, scale: int = 2, **overrides: Any) -> nn.Module:
    """Build a registered preset, e.g. `create_model("edsr-baseline", scale=4)`."""
    if name not in PRESETS:
        raise BadInput(f"unknown model '{name}'; known: {', '.join(list_models())}, or MODULE:FACTORY")
    try:
        cls, make_config = PRESETS[name]
        config = make_config(name, scale, **overrides)
        return bounded_build(lambda: cls(config), f"model '{name}'")
    except (TypeError, ValueError) as exc:
        raise BadInput(f"model '{name}': {exc}") from None


def model_spec(model: nn.Module) -> dict[str, Any]:
    """An edgesr architecture's identity: {"arch": ..., "config": {...}}; TypeError for any other model."""
    for arch, (cls, _) in ARCHS.items():
        if isinstance(model, cls):
            return {"arch": arch, "config": asdict(model.config)}
    raise TypeError(f"{type(model).__name__} is not a registered architecture")


def build_from_spec(spec: dict[str, Any], origin: str = "checkpoint") -> nn.Module:
    """Rebuild a model from `model_spec` output; unknown arch or config keys are errors."""
    arch = spec.get("arch")
    if arch not in ARCHS:
        raise BadInput(f"{origin}: unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    cls, cfg_cls = ARCHS[arch]
    cfg = dict(spec.get("config", {}))
    unknown = set(cfg) - {f.name for f in fields(cfg_cls)}
    if unknown:
        raise BadInput(f"{origin}: unknown {arch} config keys: {', '.join(sorted(unknown))}")
    try:
        config = cfg_cls(**cfg)
        return bounded_build(lambda: cls(config), origin)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{origin}: bad {arch} config: {exc}") from None


def preset_recipe(model: nn.Module) -> dict[str, Any]:
    return {"kind": "preset", **model_spec(model)}


def factory_recipe(factory: str, factory_args: dict[str, Any]) -> dict[str, Any]:
    """A user factory's recipe; a .py path is stored resolved, so the checkpoint rebuilds from any folder."""
    module_name, _, func = factory.rpartition(":")
    path = Path(module_name)
    resolved = f"{path.resolve()}:{func}" if module_name.endswith(".py") and path.is_file() else factory
    return {
        "kind": "factory",
        "factory": resolved,
        "factory_args": dict(factory_args),
        "factory_sha256": factory_file_sha256(factory),
    }


def build_from_recipe(recipe: dict[str, Any], origin: str = "checkpoint") -> nn.Module:
    """The architecture a recipe names, freshly initialised (the caller loads the weights)."""
    kind = recipe.get("kind")
    if kind == "preset":
        return build_from_spec(recipe, origin)
    if kind == "factory":
        factory, args = recipe.get("factory"), recipe.get("factory_args") or {}
        if not isinstance(factory, str) or not isinstance(args, dict):
            raise BadInput(f"{origin}: damaged factory recipe {recipe!r:.200}")
        digest = factory_file_sha256(factory) if ":" in factory else None
        if recipe.get("factory_sha256") and digest and digest != recipe["factory_sha256"]:
            log.warning("%s: %s changed since the checkpoint was written", origin, factory.rpartition(":")[0])
        return build_factory_model(factory, args)
    raise BadInput(f"{origin}: unknown model recipe kind {kind!r} (expected preset or factory)")


def default_sparse_layers(model: nn.Module) -> list[str] | None:
    """The architecture's default sparse-layer globs (see DEFAULT_SPARSE_LAYERS); None for other models."""
    try:
        return list(DEFAULT_SPARSE_LAYERS[model_spec(model)["arch"]])
    except TypeError:
        return None
