"""Any PyTorch SR model in: what `convert` accepts, loaded and checked before any slow work starts.

Four ways in, one result (`IntakeModel`: an nn.Module in eval mode mapping NCHW float RGB in [0, 1] to NCHW):
- an edgesr checkpoint (`compress.checkpoint`), or an EDSR-PyTorch state dict (the official release files);
- `module:factory` (an importable module, or a path to a .py file) + a weights file: the factory (called with
  `factory_args` as keyword arguments) returns the nn.Module, the weights are its state dict (saved with
  torch.save, loaded with weights_only=True; {"state_dict": ...} / {"model": ...} wrappers and DataParallel's
  "module." prefix are unwrapped);
- a `torch.export` program saved as `.pt2` (`torch.export.save`), run as a module.

Every model is then checked to be super-resolution shaped, (1, 3, H, W) -> (1, 3, sH, sW) with an integer s >= 1,
and exported with torch.export to list the operators it uses: any operator outside `SUPPORTED_OPS` (what the
TFLite and Core ML converters and our Core ML reference executor all handle) is reported by name together with
the layers (module paths) that call it, before conversion starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import operator
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import load_checkpoint, load_state, torch_load
from edgesr.errors import BadInput
from edgesr.manifest import sha256

log = logging.getLogger(__name__)

EXPORTED_SUFFIX = ".pt2"
OFFICIAL = "EDSR-PyTorch state dict"  # compress.checkpoint's manifest "source" for official EDSR-PyTorch files
PROBE_SIZE = 32  # LR side of the input used to check shapes and list operators when any size works

# The one allowlist of operators a model may use, as torch.export (ATen) names: what litert-torch lowers to
# TFLite builtins, coremltools converts to MIL, and convert.mil_exec executes (its MIL counterparts: conv, add,
# sub, mul, real_div, relu, leaky_relu, prelu, clip, sigmoid, tanh, silu, elu, batch_norm, concat, reshape,
# transpose, expand_dims, squeeze, slice_by_index, pixel_(un)shuffle, upsample_nearest_neighbor/bilinear).
SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        # convolutions
        "aten.conv2d",
        "aten.convolution",
        "aten._convolution",
        # elementwise arithmetic
        "aten.add",
        "aten.add_",
        "aten.sub",
        "aten.sub_",
        "aten.rsub",
        "aten.mul",
        "aten.mul_",
        "aten.div",
        "aten.div_",
        "aten.neg",
        # activations
        "aten.relu",
        "aten.relu_",
        "aten.leaky_relu",
        "aten.leaky_relu_",
        "aten.prelu",
        "aten._prelu_kernel",
        "aten.clamp",
        "aten.clamp_",
        "aten.clip",
        "aten.hardtanh",
        "aten.hardtanh_",
        "aten.sigmoid",
        "aten.tanh",
        "aten.silu",
        "aten.silu_",
        "aten.elu",
        "aten.elu_",
        # inference batch norm (folded or run as MIL batch_norm)
        "aten.batch_norm",
        "aten._native_batch_norm_legit_no_training",
        # concatenation and shapes
        "aten.cat",
        "aten.concat",
        "aten.reshape",
        "aten.view",
        "aten._unsafe_view",
        "aten.permute",
        "aten.flatten",
        "aten.squeeze",
        "aten.unsqueeze",
        "aten.contiguous",
        "aten.clone",
        "aten.alias",
        "aten.detach",
        "aten.dropout",
        "aten.slice",
        # resolution changes
        "aten.pixel_shuffle",
        "aten.pixel_unshuffle",
        "aten.upsample_nearest2d",
        "aten.upsample_bilinear2d",
    }
)
# Graph bookkeeping that computes nothing on tensors (shape reads, asserts, tuple indexing).
_BOOKKEEPING = frozenset(
    {
        "aten.sym_size",
        "aten.sym_numel",
        "aten.sym_stride",
        "aten._assert_scalar",
        "aten._assert_async",
        "aten.sym_constrain_range",
        "aten.sym_constrain_range_for_size",
        "aten._assert_tensor_metadata",
        "aten.lift_fresh_copy",
    }
)


@dataclass(frozen=True)
class ModelSpec:
    """What the user named: a checkpoint (edgesr, EDSR-PyTorch or .pt2), or a factory plus a weights file."""

    checkpoint: Path | None = None
    factory: str | None = None  # "package.module:function" or "path/to/file.py:function"
    weights: Path | None = None
    factory_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.factory is None):
            raise BadInput("give either --checkpoint or --model module:factory (with --weights), not both or neither")
        if self.factory is not None and self.weights is None:
            raise BadInput(f"--model {self.factory}: needs --weights, the state dict file to load into it")
        if self.factory is None and (self.weights is not None or self.factory_args):
            raise BadInput("--weights and --factory-args go with --model module:factory, not with --checkpoint")
        if not isinstance(self.factory_args, dict):
            raise BadInput("--factory-args must be a JSON object of keyword arguments")

    @property
    def origin(self) -> str:
        """How messages name the model: the checkpoint path, or 'factory (weights path)'."""
        return str(self.checkpoint) if self.checkpoint is not None else f"{self.factory} ({self.weights})"


@dataclass
class IntakeModel:
    """A loaded, checked model and what the manifest records about where it came from."""

    model: nn.Module  # eval mode; NCHW float RGB in [0, 1] -> NCHW
    scale: int
    name: str  # default model name for report rows
    source: dict[str, Any]  # the convert manifest's "source"
    input_size: int | None  # LR side a static .pt2 was exported for; None when any size works
    ops: dict[str, int]  # ATen operator -> how often the exported graph calls it


def parse_factory_args(text: str | None) -> dict[str, Any]:
    """'{"scale": 2}' -> {"scale": 2}; anything but a JSON object is BadInput."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"--factory-args: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(args, dict):
        raise BadInput(f"--factory-args: expected a JSON object of keyword arguments, got {type(args).__name__}")
    return args


def load_model(spec: ModelSpec) -> IntakeModel:
    """Load what `spec` names, check it is an SR model built from supported operators; BadInput otherwise."""
    input_size = None
    program = None
    if spec.factory is not None:
        model = build_factory_model(spec.factory, spec.factory_args)
        load_weights(model, spec.weights)
        name = spec.factory.rsplit(":", 1)[-1]
        source: dict[str, Any] = {
            "kind": "module:factory",
            "model": spec.factory,
            "factory_args": spec.factory_args,
            "weights": str(spec.weights),
            "sha256": sha256(spec.weights),
            "psnr_y_db": None,
            "test_set": None,
        }
    elif spec.checkpoint.suffix == EXPORTED_SUFFIX:
        program = load_exported(spec.checkpoint)
        model, input_size = ExportedModule(program), exported_input_size(program, spec.checkpoint)
        name = spec.checkpoint.stem
        source = {"kind": "torch.export", "checkpoint": str(spec.checkpoint), "sha256": sha256(spec.checkpoint)}
        source.update(psnr_y_db=None, test_set=None)
    else:
        model, manifest = load_checkpoint(spec.checkpoint)
        name = manifest.get("name") or spec.checkpoint.stem
        source = {
            "kind": "EDSR-PyTorch state dict" if manifest.get("source") == OFFICIAL else "edgesr checkpoint",
            "checkpoint": str(spec.checkpoint),
            "sha256": sha256(spec.checkpoint),
            "psnr_y_db": manifest.get("psnr_y_db"),
            "test_set": _test_set_name(manifest.get("test_set")),
        }
    model.eval()
    size = input_size or PROBE_SIZE
    scale = check_sr_model(model, spec.origin, size)
    if program is None:
        program = export_program(model, spec.origin, size)
    ops = op_counts(program)
    check_supported_ops(program, spec.origin)
    log.debug("%s: x%d SR model, operators %s", spec.origin, scale, ops)
    return IntakeModel(model=model, scale=scale, name=name, source=source, input_size=input_size, ops=ops)


# ------------------------------------------------------------------------------------------ module:factory


def build_factory_model(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """Import `module:function` (module name or .py path), call it with `kwargs`; it must return an nn.Module."""
    module_name, sep, func_name = factory.rpartition(":")
    if not sep or not module_name or not func_name.isidentifier():
        raise BadInput(f"--model {factory}: expected module:factory, e.g. mypkg.models:build or nets/sr.py:build")
    module = _import(module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise BadInput(f"--model {factory}: {module_name} has no callable '{func_name}'")
    try:
        model = func(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code: any failure is the user's input problem
        raise BadInput(f"--model {factory}: {func_name}(**{json.dumps(kwargs)}) failed: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model {factory}: {func_name}() returned {type(model).__name__}, not a torch nn.Module")
    return model


def _import(module_name: str) -> Any:
    path = Path(module_name)
    if path.suffix == ".py" or "/" in module_name or "\\" in module_name:
        if not path.is_file():
            raise BadInput(f"{path}: no such Python file")
        unique = f"edgesr_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(unique, path)
        if spec is None or spec.loader is None:
            raise BadInput(f"{path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code
            del sys.modules[unique]
            raise BadInput(f"{path}: importing it failed: {_first_line(exc)}") from None
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise BadInput(f"--model: no module named '{module_name}' (not importable from here)") from None
        raise BadInput(f"--model: importing {module_name} failed: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - user code
        raise BadInput(f"--model: importing {module_name} failed: {_first_line(exc)}") from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict file into `model` (strict); BadInput names the file and the first mismatches."""
    obj = torch_load(path)
    state = unwrap_state_dict(obj, path)
    load_state(model, state, str(path))
    log.debug("%s: loaded %d tensors", path, len(state))


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The state dict inside `obj`: itself, or under "state_dict"/"model"; a "module." prefix is dropped."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise BadInput(f"{path}: expected a state dict (parameter name -> tensor), got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel / DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------ torch.export .pt2


class ExportedModule(nn.Module):
    """A `torch.export` program run as an ordinary module.

    `ExportedProgram.module()` refuses `.train()`/`.eval()`, which every converter calls; an exported program
    is already an inference graph, so this wrapper records the mode without passing it on.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self


def load_exported(path: Path) -> torch.export.ExportedProgram:
    """torch.export.load a .pt2 file, with a one-line error for anything else."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        return torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or damaged archives
        raise BadInput(f"{path}: not a torch.export program (.pt2): {_first_line(exc)}") from None


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
            raise BadInput(f"{path}: exported for a {h}x{w} input; convert needs a square tile (export with H = W)")
        return h
    if isinstance(h, int) or isinstance(w, int):
        raise BadInput(f"{path}: exported with only one of H, W dynamic; make both dynamic or both static")
    return None


# ------------------------------------------------------------------------------------------ checks


@torch.no_grad()
def check_sr_model(model: nn.Module, origin: str, size: int = PROBE_SIZE) -> int:
    """The integer scale s of a model mapping (1, 3, size, size) -> (1, 3, s*size, s*size); BadInput otherwise."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    shape_in = f"input (1, 3, {size}, {size})"
    try:
        y = model(x)
    except Exception as exc:  # noqa: BLE001 - user code
        raise BadInput(f"{origin}: running the model on {shape_in} failed: {_first_line(exc)}") from None
    if not isinstance(y, torch.Tensor):
        raise BadInput(f"{origin}: not a super-resolution model: output is a {type(y).__name__} for {shape_in}")
    s = y.shape[-1] // size if y.dim() == 4 else 0
    if y.dim() != 4 or tuple(y.shape[:2]) != (1, 3) or s < 1 or tuple(y.shape[2:]) != (s * size, s * size):
        shape = "(" + ", ".join(str(d) for d in y.shape) + ")"
        raise BadInput(f"{origin}: not a super-resolution model: output {shape} for {shape_in}")
    if not y.is_floating_point():
        raise BadInput(f"{origin}: not a super-resolution model: output dtype {y.dtype} (expected float)")
    return int(s)


def export_program(model: nn.Module, origin: str, size: int = PROBE_SIZE) -> torch.export.ExportedProgram:
    """torch.export the model (as litert-torch does) at (1, 3, size, size); BadInput if it cannot be exported."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            return torch.export.export(model.eval(), (x,), strict=False)
    except Exception as exc:  # noqa: BLE001 - export raises many types for unsupported Python
        raise BadInput(f"{origin}: torch.export cannot capture the model: {_first_line(exc)}") from None


def _op_name(target: Any) -> str | None:
    """'aten.conv2d' for an ATen overload; None for graph bookkeeping (getitem, shape reads, asserts)."""
    if target in (operator.getitem,) or getattr(target, "__module__", None) in ("_operator", "operator", "math"):
        return None
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}.{target._opname}"
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = str(target)
    else:
        name = getattr(target, "__qualname__", None) or str(target)
    return None if name in _BOOKKEEPING else name


def op_counts(program: torch.export.ExportedProgram) -> dict[str, int]:
    """ATen operator -> number of calls in the exported graph."""
    counts: dict[str, int] = defaultdict(int)
    for node in program.graph.nodes:
        if node.op == "call_function" and (name := _op_name(node.target)):
            counts[name] += 1
    return dict(sorted(counts.items()))


def unsupported_ops(program: torch.export.ExportedProgram) -> dict[str, list[str]]:
    """Each operator outside SUPPORTED_OPS -> the layers that call it ('body.3.conv (Conv2d)'), in graph order."""
    found: dict[str, list[str]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not (name := _op_name(node.target)) or name in SUPPORTED_OPS:
            continue
        layer = _layer(node)
        layers = found.setdefault(name, [])
        if layer not in layers:
            layers.append(layer)
    return found


def _layer(node: torch.fx.Node) -> str:
    """The innermost module that called `node`: 'body.3.warp (Warp)', or 'forward of SRNet' for the top level."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return "the model's forward"
    path, cls = stack[-1]
    cls_name = str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]
    return f"{path} ({cls_name})" if path else f"forward of {cls_name}"


def check_supported_ops(program: torch.export.ExportedProgram, origin: str) -> None:
    """BadInput naming every unsupported operator and the layers that use it."""
    found = unsupported_ops(program)
    if not found:
        return
    parts = []
    for op, layers in found.items():
        more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
        parts.append(f"{op} in {', '.join(layers[:3])}{more}")
    raise BadInput(f"{origin}: unsupported operators for TFLite/Core ML conversion: {'; '.join(parts)}")


def _test_set_name(test_set: Any) -> str | None:
    if isinstance(test_set, dict):
        return test_set.get("name")
    return test_set if isinstance(test_set, str) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{exc.__class__.__name__}: {first[:200]}" if first else exc.__class__.__name__
