"""Self-describing checkpoints: weights plus what rebuilds the model, loaded with `weights_only=True`.

Format (a dict saved with torch.save): {"format": FORMAT, "arch", "config", "state_dict", "manifest"}.
A plain EDSR-PyTorch state dict (the official release files) loads too; its config is inferred from shapes
(and res_scale 0.1 for the 32 x 256 EDSR, as EDSR-PyTorch trains it).
`save_checkpoint` writes `<dir>/model.pt` and `<dir>/manifest.json` atomically.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.models import build_from_spec, model_spec
from compress.models.edsr import EDSR, config_from_official_state_dict
from edgesr.errors import BadInput
from edgesr.manifest import MANIFEST_NAME, atomic_output, write_json

FORMAT = "edgesr-checkpoint/1"
# EDSR-PyTorch's released EDSR (not the baseline): 32 blocks of 256 features, trained with `--res_scale 0.1`,
# which the state dict cannot tell; every other official EDSR release uses res_scale 1.
EDSR_LARGE = (32, 256)
log = logging.getLogger(__name__)


def torch_load(path: str | Path) -> Any:
    """torch.load a user file safely (weights_only) with a one-line error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise BadInput(f"{path}: not a readable torch checkpoint ({first[:160]})") from None


def _few(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_state(model: nn.Module, state_dict: dict[str, Any], origin: str) -> None:
    """Load `state_dict` into `model` strictly; BadInput naming `origin` and the first few mismatches otherwise."""
    own = model.state_dict()
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own) - set(not_tensors))
    shapes = [
        f"'{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and own[k].shape != v.shape
    ]
    problems = [f"missing {_few(missing)}"] if missing else []
    problems += [f"unexpected {_few(unexpected)}"] if unexpected else []
    problems += [f"not tensors: {_few(not_tensors)}"] if not_tensors else []
    problems += shapes[:3] + ([f"+{len(shapes) - 3} more shape mismatches"] if len(shapes) > 3 else [])
    if problems:
        raise BadInput(f"{origin}: weights do not match the model ({'; '.join(problems)})")
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load an edgesr checkpoint or an EDSR-PyTorch state dict; returns (model in eval mode, manifest)."""
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        model = build_from_spec(obj, origin=str(path))
        load_state(model, obj["state_dict"], str(path))
        manifest = dict(obj.get("manifest") or {})
    elif "head.0.weight" in obj and "tail.0.0.weight" in obj:
        cfg = config_from_official_state_dict(obj)
        if cfg.scale == 0:
            raise BadInput(f"{path}: cannot infer the scale of this EDSR-PyTorch checkpoint")
        if (cfg.n_resblocks, cfg.n_feats) == EDSR_LARGE:  # the paper's EDSR trains with res_scale 0.1
            cfg = replace(cfg, res_scale=0.1)
        model = EDSR(cfg)
        load_state(model, obj, str(path))
        manifest = {"source": "EDSR-PyTorch state dict", "origin": str(path)}
        log.info(
            "loaded EDSR-PyTorch weights: %d blocks x %d feats, x%d, res_scale %g",
            cfg.n_resblocks,
            cfg.n_feats,
            cfg.scale,
            cfg.res_scale,
        )
    else:
        raise BadInput(f"{path}: not an edgesr checkpoint nor an EDSR-PyTorch state dict")
    return model.eval(), manifest


def save_checkpoint(out_dir: str | Path, model: nn.Module, manifest: dict[str, Any]) -> Path:
    """Write `<out_dir>/model.pt` and `<out_dir>/manifest.json`; returns the checkpoint path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt"
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, **model_spec(model), "state_dict": state, "manifest": manifest}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    write_json(out_dir / MANIFEST_NAME, manifest)
    return path
