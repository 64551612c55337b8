"""Model registry: `create_model(name, scale)` is the one way to build an SR network; checkpoints rebuild it.

A model's identity in checkpoints and manifests is (arch, config dict), so anything in the registry can be
saved by `compress.checkpoint` and rebuilt without code changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

from torch import nn

from compress.models.edsr import EDSR, EDSRConfig, edsr_config
from compress.models.edsr import PRESETS as EDSR_PRESETS
from compress.models.rdn import PRESETS as RDN_PRESETS
from compress.models.rdn import RDN, RDNConfig, rdn_config
from edgesr.errors import BadInput

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
        raise BadInput(f"unknown model '{name}'; known: {', '.join(list_models())}")
    try:
        cls, make_config = PRESETS[name]
        return cls(make_config(name, scale, **overrides))
    except (TypeError, ValueError) as exc:
        raise BadInput(f"model '{name}': {exc}") from None


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint stores to rebuild the model: {"arch": ..., "config": {...}}."""
    for arch, (cls, _) in ARCHS.items():
        if isinstance(model, cls):
            return {"arch": arch, "config": asdict(model.config)}
    raise TypeError(f"{type(model).__name__} is not a registered architecture")


def default_sparse_layers(model: nn.Module) -> list[str]:
    """The architecture's default sparse-layer globs (see DEFAULT_SPARSE_LAYERS)."""
    return list(DEFAULT_SPARSE_LAYERS[model_spec(model)["arch"]])


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
        return cls(cfg_cls(**cfg))
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{origin}: bad {arch} config: {exc}") from None
