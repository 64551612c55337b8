"""One model intake for every stage: the same flags, the same checks, the same `source` record everywhere.

A model is named by exactly one of:
- `--checkpoint FILE`: an edgesr checkpoint (`compress.checkpoint`), an EDSR-PyTorch state dict, a BasicSR EDSR
  checkpoint, an idealo ISR RDN Keras `.h5` (`compress.models.isr`), or a `torch.export` program `.pt2`;
  `pretrained:NAME` names a file `make setup` fetched (`python -m compress.pretrained list`);
- `--model NAME|MODULE:FACTORY [--weights FILE] [--factory-args JSON]`: an edgesr preset (`edsr-tiny`, ...) or a
  function returning an nn.Module (from an importable module or a .py file), called with the JSON object's keyword
  arguments. `--weights` is a state dict (plain, {"state_dict": ...}, {"model": ...}, BasicSR's "params_ema" /
  "params", DataParallel's "module." prefix), loaded strictly with weights_only=True; without it the model is used
  as the factory returns it (a factory may load its own weights).

Every model is checked to be super-resolution shaped, (1, 3, H, W) -> (1, 3, sH, sW) with an integer s >= 1,
before any slow work. What each stage then needs on top (traceable channels for channel pruning, convertible
operators for convert) is checked by that stage. A `.pt2` is an inference graph: it converts and evaluates, but
cannot be trained or pruned (no modules to gate or slice).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import load_state, read_checkpoint, torch_load, unwrap_state_dict
from compress.models import PRESETS, create_model, factory_recipe, preset_recipe
from compress.models.factory import build_factory_model
from edgesr.errors import BadInput, first_line
from edgesr.manifest import sha256

log = logging.getLogger(__name__)

EXPORTED_SUFFIX = ".pt2"
KERAS_SUFFIX = ".h5"
PROBE_SIZE = 32  # LR side of the input used to check shapes when any size works
PRETRAINED_PREFIX = "pretrained:"  # --checkpoint pretrained:NAME is the cached file of `compress.pretrained` NAME


@dataclass(frozen=True)
class ModelSpec:
    """What the user named: a checkpoint file, or a preset / factory (with optional weights and arguments)."""

    checkpoint: Path | None = None
    model: str | None = None  # a preset name or "module:function" / "path/to/file.py:function"
    weights: Path | None = None
    factory_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.model is None):
            raise BadInput("give either --checkpoint FILE or --model NAME|MODULE:FACTORY, not both or neither")
        if self.model is None and (self.weights is not None or self.factory_args):
            raise BadInput("--weights and --factory-args go with --model, not with --checkpoint")
        if not isinstance(self.factory_args, dict):
            raise BadInput("--factory-args must be a JSON object of keyword arguments")

    @property
    def origin(self) -> str:
        """How messages name the model: the checkpoint path, or 'model (weights path)'."""
        if self.checkpoint is not None:
            return str(self.checkpoint)
        return f"{self.model} ({self.weights})" if self.weights else str(self.model)

    @property
    def is_preset(self) -> bool:
        return self.model is not None and ":" not in self.model


@dataclass
class LoadedModel:
    """A loaded, checked model and what manifests record about where it came from."""

    model: nn.Module  # eval mode; NCHW float RGB in [0, 1] -> NCHW
    scale: int
    name: str  # default model name for report rows
    source: dict[str, Any]  # the manifests' "source" record
    recipe: dict[str, Any] | None  # rebuilds the architecture (None for a .pt2: it cannot be rebuilt or trained)
    input_size: int | None = None  # LR side a static .pt2 was exported for; None when any size works
    manifest: dict[str, Any] = field(default_factory=dict)  # the checkpoint's own manifest, if it had one
    trained: bool = True  # False only for a preset built without weights (training from scratch)


# ------------------------------------------------------------------------------------------ command line


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint | --model, --weights, --factory-args: the same flags in every command."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="edgesr checkpoint (model.pt), EDSR-PyTorch .pt, BasicSR EDSR .pth, ISR RDN .h5, or torch.export .pt2",
    )
    source.add_argument(
        "--model",
        metavar="NAME|MODULE:FACTORY",
        help=f"an edgesr preset ({', '.join(sorted(PRESETS))}) or a function returning an nn.Module "
        "(module name or path/to/file.py)",
    )
    parser.add_argument(
        "--weights", type=Path, help="state dict for --model (torch.save; loaded strictly, weights only); optional"
    )
    parser.add_argument("--factory-args", metavar="JSON", help="keyword arguments for --model, e.g. '{\"scale\": 2}'")


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        checkpoint=args.checkpoint,
        model=args.model,
        weights=args.weights,
        factory_args=parse_factory_args(args.factory_args),
    )


def parse_factory_args(text: str | None) -> dict[str, Any]:
    """'{"scale": 2}' -> {"scale": 2}; anything but a JSON object is BadInput."""
    if not text:
        return {}
    if len(text) > 100_000:
        raise BadInput(f"--factory-args: {len(text)} characters is more than any model's arguments need")
    try:
        args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"--factory-args: not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise BadInput("--factory-args: nested deeper than Python's JSON reader allows") from None
    if not isinstance(args, dict):
        raise BadInput(f"--factory-args: expected a JSON object of keyword arguments, got {type(args).__name__}")
    return args


# ------------------------------------------------------------------------------------------ loading


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load what `spec` names and check it is an SR model; BadInput (one line, naming the file) otherwise."""
    if spec.checkpoint is not None and str(spec.checkpoint).startswith(PRETRAINED_PREFIX):
        from compress import pretrained

        spec = dataclasses.replace(spec, checkpoint=pretrained.path(str(spec.checkpoint)[len(PRETRAINED_PREFIX) :]))
    if spec.model is not None:
        loaded = _from_model(spec)
    elif spec.checkpoint.suffix == EXPORTED_SUFFIX:
        loaded = _from_exported(spec.checkpoint)
    elif spec.checkpoint.suffix == KERAS_SUFFIX:
        from compress.models.isr import load_isr_rdn

        model, info = load_isr_rdn(spec.checkpoint)
        source = {"kind": "ISR Keras .h5", "checkpoint": str(spec.checkpoint), "sha256": sha256(spec.checkpoint)}
        loaded = LoadedModel(model.eval(), 0, spec.checkpoint.stem, {**source, "isr": info}, preset_recipe(model))
    else:
        ckpt = read_checkpoint(spec.checkpoint)
        test_set = ckpt.manifest.get("test_set")
        source = {
            "kind": ckpt.kind,
            "checkpoint": str(spec.checkpoint),
            "sha256": sha256(spec.checkpoint),
            "psnr_y_db": ckpt.manifest.get("psnr_y_db"),
            "test_set": test_set.get("name") if isinstance(test_set, dict) else test_set,
            "degradation": test_set.get("degradation") if isinstance(test_set, dict) else None,
        }
        name = ckpt.manifest.get("name") or spec.checkpoint.stem
        loaded = LoadedModel(ckpt.model, 0, name, source, ckpt.recipe, manifest=ckpt.manifest)
    loaded.model.eval()
    loaded.scale = check_sr_model(loaded.model, spec.origin, loaded.input_size or PROBE_SIZE)
    log.debug("%s: x%d SR model (%s)", spec.origin, loaded.scale, loaded.source["kind"])
    return loaded


def _from_model(spec: ModelSpec) -> LoadedModel:
    if spec.is_preset:
        args = dict(spec.factory_args)
        scale = args.pop("scale", 2)
        model = create_model(spec.model, scale=scale, **args)
        recipe = preset_recipe(model)
        kind = "preset"
    else:
        model = build_factory_model(spec.model, spec.factory_args)
        recipe = factory_recipe(spec.model, spec.factory_args)
        kind = "module:factory"
    source: dict[str, Any] = {"kind": kind, "model": spec.model, "factory_args": spec.factory_args}
    if spec.weights is not None:
        load_state(model, unwrap_state_dict(torch_load(spec.weights), spec.weights), str(spec.weights))
        source.update(weights=str(spec.weights), sha256=sha256(spec.weights))
    else:
        source.update(weights=None, sha256=None)
    source.update(psnr_y_db=None, test_set=None)
    name = spec.model if spec.is_preset else spec.model.rsplit(":", 1)[-1]
    trained = spec.weights is not None or not spec.is_preset
    return LoadedModel(model, 0, name, source, recipe, trained=trained)


def _from_exported(path: Path) -> LoadedModel:
    program = load_exported(path)
    source = {"kind": "torch.export", "checkpoint": str(path), "sha256": sha256(path)}
    source.update(psnr_y_db=None, test_set=None)
    return LoadedModel(ExportedModule(program), 0, path.stem, source, None, exported_input_size(program, path))


# ------------------------------------------------------------------------------------------ torch.export .pt2


class ExportedModule(nn.Module):
    """A `torch.export` program run as an ordinary module.

    `ExportedProgram.module()` refuses `.train()`/`.eval()`, which every converter calls; an exported program
    is already an inference graph, so this wrapper records the mode without passing it on.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.exported = program  # what convert checks and lowers
        self.program = program.module()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self


def load_exported(path: Path) -> torch.export.ExportedProgram:
    """torch.export.load a .pt2 file, with a one-line error for anything else."""
    if not path.is_file():
        raise BadInput(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    export_log = logging.getLogger("torch.export")
    level, export_log.level = export_log.level, logging.CRITICAL  # it logs its own traceback for a damaged file
    try:
        return torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or damaged archives
        raise BadInput(f"{path}: not a torch.export program (.pt2): {first_line(exc)}") from None
    finally:
        export_log.setLevel(level)


def exported_input_size(program: torch.export.ExportedProgram, path: Path) -> int | None:
    """The LR side a program was exported for if its input is static (must be square), None if dynamic."""
    user_inputs = [
        n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs
    ]
    if len(user_inputs) != 1:
        raise BadInput(f"{path}: not a super-resolution model: it takes {len(user_inputs)} inputs, expected 1 image")
    val = user_inputs[0].meta.get("val")
    shape = tuple(val.shape) if val is not None else ()
    if len(shape) != 4:
        raise BadInput(f"{path}: not a super-resolution model: input shape {shape}, expected (1, 3, H, W)")
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int):
        if h != w:
            raise BadInput(f"{path}: exported for a {h}x{w} input; edgesr needs a square tile (export with H = W)")
        return h
    if isinstance(h, int) or isinstance(w, int):
        raise BadInput(f"{path}: exported with only one of H, W dynamic; make both dynamic or both static")
    return None


# ------------------------------------------------------------------------------------------ checks


@torch.no_grad()
def check_sr_model(model: nn.Module, origin: str, size: int = PROBE_SIZE) -> int:
    """The integer scale s of a model mapping (1, 3, size, size) -> (1, 3, s*size, s*size); BadInput otherwise."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    shape_in = f"input (1, 3, {size}, {size})"
    try:
        y = model(x)
    except Exception as exc:  # noqa: BLE001 - user code
        raise BadInput(f"{origin}: running the model on {shape_in} failed: {first_line(exc)}") from None
    if not isinstance(y, torch.Tensor):
        raise BadInput(f"{origin}: not a super-resolution model: output is a {type(y).__name__} for {shape_in}")
    s = y.shape[-1] // size if y.dim() == 4 else 0
    if y.dim() != 4 or tuple(y.shape[:2]) != (1, 3) or s < 1 or tuple(y.shape[2:]) != (s * size, s * size):
        shape = "(" + ", ".join(str(d) for d in y.shape) + ")"
        raise BadInput(f"{origin}: not a super-resolution model: output {shape} for {shape_in}")
    if not y.is_floating_point():
        raise BadInput(f"{origin}: not a super-resolution model: output dtype {y.dtype} (expected float)")
    return int(s)
