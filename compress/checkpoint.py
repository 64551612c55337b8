"""Checkpoints: weights plus what rebuilds the model, loaded with `weights_only=True`; and other tools' state dicts.

edgesr's format (a dict saved with torch.save): {"format": FORMAT, "recipe", "shapes", "state_dict", "manifest"}.
The recipe builds the architecture (an edgesr preset, or the user's factory called again; `compress.models`), the
shapes resize it to what a pruned model has (`compress.models.shapes`), then the state dict loads strictly. Format
1 (preset arch + config, widths in the config's `conv_channels`) still loads.

Foreign files that carry enough to rebuild an edgesr architecture load too: an EDSR-PyTorch state dict (the
official release files; config inferred from the shapes, res_scale 0.1 for the 32 x 256 EDSR as EDSR-PyTorch
trains it) and a BasicSR checkpoint of its EDSR arch (`params_ema` or `params`). Any other BasicSR checkpoint holds
weights only: it goes with `--model MODULE:FACTORY --weights FILE` (`unwrap_state_dict` reads it).
`save_checkpoint` writes `<dir>/model.pt` and `<dir>/manifest.json` atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.models import build_from_recipe, preset_recipe
from compress.models.edsr import EDSR, config_from_official_state_dict
from compress.models.shapes import apply_shapes, record_shapes
from edgesr.errors import BadInput
from edgesr.manifest import MANIFEST_NAME, atomic_output, write_json

FORMAT = "edgesr-checkpoint/2"
FORMAT_V1 = "edgesr-checkpoint/1"
# EDSR-PyTorch's released EDSR (not the baseline): 32 blocks of 256 features, trained with `--res_scale 0.1`,
# which the state dict cannot tell; every other official EDSR release uses res_scale 1.
EDSR_LARGE = (32, 256)
BASICSR_KEYS = ("params_ema", "params")  # BasicSR's save_network keys, EMA weights first (what its tests load)
log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its manifest, how it rebuilds, and what kind of file it was."""

    model: nn.Module
    manifest: dict[str, Any]
    recipe: dict[str, Any]
    kind: str  # "edgesr checkpoint", "EDSR-PyTorch state dict", "BasicSR checkpoint"


def torch_load(path: str | Path) -> Any:
    """torch.load a user file safely (weights_only) with a one-line error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: {'not a regular file' if path.exists() else 'no such checkpoint file'}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage bytes reach any error in the unpickler (IndexError, KeyError, struct.error…)
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


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The state dict inside a weights file: itself, or under "state_dict" / "model" / BasicSR's "params_ema" /
    "params"; a DataParallel "module." prefix is dropped."""
    for key in ("state_dict", "model", *BASICSR_KEYS):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise BadInput(f"{path}: expected a state dict (parameter name -> tensor), got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel / DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _edsr_from_official(state: dict[str, Any], path: Path, origin_kind: str) -> EDSR:
    cfg = config_from_official_state_dict(state)
    if cfg.scale == 0:
        raise BadInput(f"{path}: cannot infer the scale of this {origin_kind}")
    if (cfg.n_resblocks, cfg.n_feats) == EDSR_LARGE:  # the paper's EDSR trains with res_scale 0.1
        cfg = replace(cfg, res_scale=0.1)
    log.info(
        "loaded %s: EDSR %d blocks x %d feats, x%d, res_scale %g",
        origin_kind,
        cfg.n_resblocks,
        cfg.n_feats,
        cfg.scale,
        cfg.res_scale,
    )
    return EDSR(cfg)


def _basicsr_edsr_keys(state: dict[str, Any]) -> dict[str, Any] | None:
    """BasicSR's EDSR arch (conv_first, body.i.conv1/2, conv_after_body, upsample.k, conv_last) renamed to
    EDSR-PyTorch's; None if `state` is not that arch. The two compute the same function (same mean shift)."""
    if not {"conv_first.weight", "conv_after_body.weight", "conv_last.weight"} <= set(state):
        return None
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "conv_first":
            new = "head.0." + parts[-1]
        elif parts[0] == "body" and len(parts) == 4 and parts[2] in ("conv1", "conv2"):
            new = f"body.{parts[1]}.body.{0 if parts[2] == 'conv1' else 2}.{parts[3]}"
        elif parts[0] == "conv_after_body":
            n = len({k.split(".")[1] for k in state if k.startswith("body.")})
            new = f"body.{n}.{parts[-1]}"
        elif parts[0] == "upsample":
            new = f"tail.0.{parts[1]}.{parts[2]}"
        elif parts[0] == "conv_last":
            new = "tail.1." + parts[-1]
        else:
            return None
        renamed[new] = value
    return renamed


def read_checkpoint(path: str | Path) -> Checkpoint:
    """An edgesr checkpoint, an EDSR-PyTorch state dict or a BasicSR EDSR checkpoint; BadInput for anything else."""
    path = Path(path)
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    if obj.get("format") in (FORMAT, FORMAT_V1):
        return _read_edgesr(obj, path)
    if "head.0.weight" in obj and "tail.0.0.weight" in obj:
        model = _edsr_from_official(obj, path, "EDSR-PyTorch state dict")
        load_state(model, obj, str(path))
        manifest = {"source": "EDSR-PyTorch state dict", "origin": str(path)}
        return Checkpoint(model.eval(), manifest, preset_recipe(model), "EDSR-PyTorch state dict")
    inner = next((obj[k] for k in BASICSR_KEYS if isinstance(obj.get(k), dict)), None)
    if inner is not None:
        renamed = _basicsr_edsr_keys(inner)
        if renamed is None:
            raise BadInput(
                f"{path}: a BasicSR checkpoint of an architecture edgesr does not build; it holds weights only: "
                "give --model MODULE:FACTORY --weights FILE"
            )
        model = _edsr_from_official(renamed, path, "BasicSR EDSR checkpoint")
        own = model.state_dict()
        renamed.update({k: v for k, v in own.items() if k.startswith(("sub_mean.", "add_mean."))})
        load_state(model, renamed, str(path))
        manifest = {"source": "BasicSR checkpoint", "origin": str(path)}
        return Checkpoint(model.eval(), manifest, preset_recipe(model), "BasicSR checkpoint")
    raise BadInput(
        f"{path}: not an edgesr checkpoint, an EDSR-PyTorch state dict or a BasicSR EDSR checkpoint; "
        "for weights of your own architecture give --model MODULE:FACTORY --weights FILE"
    )


def _read_edgesr(obj: dict[str, Any], path: Path) -> Checkpoint:
    origin = str(path)
    if obj["format"] == FORMAT_V1:
        config = dict(obj.get("config") or {})
        widths = config.pop("conv_channels", ())
        recipe = {"kind": "preset", "arch": obj.get("arch"), "config": config}
        model = build_from_recipe(recipe, origin)
        shapes = {}
        for name, c_out, c_in in widths:
            kh, kw = model.get_submodule(name).kernel_size
            attrs = {"out_channels": c_out, "in_channels": c_in}
            shapes[name] = {"type": "Conv2d", "attrs": attrs, "tensors": {"weight": [c_out, c_in, kh, kw]}}
            if model.get_submodule(name).bias is not None:
                shapes[name]["tensors"]["bias"] = [c_out]
    else:
        recipe = obj.get("recipe")
        if not isinstance(recipe, dict):
            raise BadInput(f"{origin}: damaged checkpoint (no model recipe)")
        model = build_from_recipe(recipe, origin)
        shapes = obj.get("shapes") or {}
    apply_shapes(model, shapes, origin)
    load_state(model, obj["state_dict"], origin)
    return Checkpoint(model.eval(), dict(obj.get("manifest") or {}), recipe, "edgesr checkpoint")


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, manifest) of any file `read_checkpoint` takes."""
    ckpt = read_checkpoint(path)
    return ckpt.model, ckpt.manifest


def save_checkpoint(
    out_dir: str | Path, model: nn.Module, manifest: dict[str, Any], recipe: dict[str, Any] | None = None
) -> Path:
    """Write `<out_dir>/model.pt` and `<out_dir>/manifest.json`; returns the checkpoint path.

    `recipe` rebuilds the architecture (`compress.models`); edgesr presets have one by default, any other model
    must pass the recipe it was built from.
    """
    if recipe is None:
        try:
            recipe = preset_recipe(model)
        except TypeError:
            raise ValueError(
                f"{type(model).__name__} is not an edgesr preset: pass the recipe it was built from"
            ) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt"
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "recipe": recipe,
        "shapes": record_shapes(model),
        "state_dict": state,
        "manifest": manifest,
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    write_json(out_dir / MANIFEST_NAME, manifest)
    return path
