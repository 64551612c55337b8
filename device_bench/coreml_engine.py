"""Core ML for the bench runner: a .mlpackage behind the three calls the runner makes on a TFLite interpreter.

Device side, copied next to runner.py with `mil_exec.py` (numpy and coremltools only, never torch or edgesr).

Runtimes:
  coreml            `coremltools.models.MLModel` at the job's compute units (CPU_ONLY, CPU_AND_GPU, CPU_AND_NE,
                    ALL): Core ML itself, on macOS. Load time is MLModel's construction (it compiles the package).
  coreml-reference  edgesr's numpy MIL executor (`mil_exec`) runs the same program anywhere: the outputs are
                    what the file computes, so PSNR, memory phases and the whole push/run/pull path are real, but
                    its timings say nothing about a device (float64 numpy, not Core ML).
  auto              coreml on macOS, coreml-reference elsewhere.

A model is one float32 NCHW input [1, 3, H, W] and one float32 output [1, 3, sH, sW] (what `convert` writes:
"lr" -> "sr"); the runner tiles NHWC images, so the adapter transposes each tile in and out. Shapes are read from
the package's program with `mil_exec.load_program` on every OS, so describe needs no Core ML.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__:  # imported as device_bench.coreml_engine (tests, the host's checks)
    from device_bench import mil_exec
else:  # next to runner.py on a device
    import mil_exec  # type: ignore[no-redef]

RUNTIMES = ("coreml", "coreml-reference")
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")
REFERENCE_NOTE = "reference executor — timings not meaningful"


class CoreMLError(Exception):
    """A model or job the Core ML engine cannot use; `kind` as the runner's error kinds."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_mlpackage(path: Path) -> bool:
    return Path(path).suffix == ".mlpackage"


def choose_runtime(choice: str) -> str:
    """coreml or coreml-reference for a runner --runtime choice (a TFLite interpreter's name counts as auto: the
    target's runtime names the interpreter for its .tflite files)."""
    if choice in RUNTIMES:
        return choice
    return "coreml" if sys.platform == "darwin" else "coreml-reference"


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def program_io(model: Path) -> tuple[Any, dict[str, Any]]:
    """(the package's program, its io described as the runner's model_io describes a TFLite model)."""
    if not (Path(model) / "Manifest.json").is_file():
        raise CoreMLError("invalid-model", f"{model}: not a .mlpackage (no Manifest.json)")
    try:
        program = mil_exec.load_program(model)
    except (mil_exec.BadInput, ValueError, KeyError, OSError) as exc:
        raise CoreMLError("invalid-model", f"{model}: cannot read its program ({exc})") from None
    fn = program.functions["main"]
    tensors = {
        "inputs": [_info(v) for v in fn.inputs.values()],
        "outputs": [_info(v) for v in fn.outputs],
    }
    if len(tensors["inputs"]) != 1 or len(tensors["outputs"]) != 1:
        n_in, n_out = len(tensors["inputs"]), len(tensors["outputs"])
        raise CoreMLError("unsupported-model", f"{model}: expected 1 input and 1 output, got {n_in} and {n_out}")
    i, o = tensors["inputs"][0], tensors["outputs"][0]
    if len(i["shape"]) != 4 or i["shape"][:2] != [1, 3] or len(o["shape"]) != 4 or o["shape"][:2] != [1, 3]:
        raise CoreMLError(
            "unsupported-model", f"{model}: expected NCHW RGB tensors [1,3,H,W], got {i['shape']} -> {o['shape']}"
        )
    if i["dtype"] != "float32" or o["dtype"] != "float32":
        raise CoreMLError("unsupported-model", f"{model}: expected float32 input/output, got {i['dtype']}/{o['dtype']}")
    (th, tw), (oh, ow) = i["shape"][2:], o["shape"][2:]
    if oh % th or ow % tw or oh // th != ow // tw or oh // th < 1:
        raise CoreMLError("unsupported-model", f"{model}: output {oh}x{ow} is not an integer upscale of {th}x{tw}")
    io = {**tensors, "layout": "NCHW", "tile": [th, tw], "scale": oh // th, "input_index": 0, "output_index": 0}
    return program, io


def _info(var: Any) -> dict[str, Any]:
    dtype = {"fp32": "float32", "fp16": "float16"}.get(mil_exec.dtype_name(var), mil_exec.dtype_name(var))
    return {"name": var.name, "shape": [int(v) for v in var.shape], "dtype": dtype}


class CoreMLInterpreter:
    """set_tensor / invoke / get_tensor over a predict function on NCHW arrays: what the runner's TiledModel
    calls, so tiling, timing and stitching are the runner's own for Core ML as for TFLite."""

    def __init__(self, predict: Any, input_name: str, output_name: str) -> None:
        self._predict, self._in, self._out = predict, input_name, output_name
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        self._x = np.ascontiguousarray(value.transpose(0, 3, 1, 2), dtype=np.float32)

    def invoke(self) -> None:
        try:
            self._y = np.asarray(self._predict({self._in: self._x})[self._out], dtype=np.float32)
        except mil_exec.BadInput as exc:  # an op the reference executor does not run: the model's problem, exit 2
            raise CoreMLError("unsupported-model", str(exc)) from None

    def get_tensor(self, index: int) -> np.ndarray:
        return np.ascontiguousarray(self._y.transpose(0, 2, 3, 1))


def mlmodel_predict(model: Path, compute_units: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The only code that needs macOS: Core ML's own MLModel (it compiles and loads the package) and its predict.
    Never run by this project's tests (no Mac); everything around it is shared with coreml-reference."""
    if sys.platform != "darwin":  # coremltools builds an MLModel anywhere, but only macOS can predict with it
        raise CoreMLError("no-runtime", f"Core ML cannot load {model.name} here: MLModel runs on macOS only")
    try:
        import coremltools as ct

        mlmodel = ct.models.MLModel(str(model), compute_units=getattr(ct.ComputeUnit, compute_units))
    except Exception as exc:  # Core ML refused the package (or its compiled framework is missing)
        raise CoreMLError("no-runtime", f"Core ML cannot load {model.name} here: {exc}") from None
    return mlmodel.predict


def open_coreml(model: Path, choice: str, compute_units: str) -> tuple[dict[str, Any], Any, dict[str, Any], dict]:
    """(runtime record, interpreter, delegate record, io) for a .mlpackage: what the caller times as the load
    (reading the program; for coreml, also MLModel's construction and compile)."""
    runtime_name = choose_runtime(choice)
    if compute_units not in COMPUTE_UNITS:
        raise CoreMLError("bad-job", f"compute_units {compute_units!r} is not one of {', '.join(COMPUTE_UNITS)}")
    program, io = program_io(model)
    name_in, name_out = io["inputs"][0]["name"], io["outputs"][0]["name"]
    version = _version("coremltools")
    if runtime_name == "coreml":
        predict = mlmodel_predict(model, compute_units)
        runtime = {"name": "coreml", "version": version, "module": "coremltools.models.MLModel"}
        delegate = {"name": f"Core ML {compute_units}", "compute_units": compute_units}
    else:

        def predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return mil_exec.run_program(program, inputs, where=model.name)

        runtime = {"name": "coreml-reference", "version": version, "module": mil_exec.RUNTIME}
        delegate = {"name": "none (numpy reference executor)", "compute_units": None}
    runtime["os"] = f"macOS {platform.mac_ver()[0]}" if sys.platform == "darwin" else platform.platform()
    return runtime, CoreMLInterpreter(predict, name_in, name_out), delegate, io


def result_fields(runtime: dict[str, Any], compute_units: str) -> dict[str, Any]:
    """What a Core ML result adds to the runner's: the compute units asked for, and whether timings mean much."""
    reference = runtime["name"] == "coreml-reference"
    return {
        "compute_units": None if reference else compute_units,
        "os_version": runtime["os"],
        "timings_meaningful": not reference,
        "timing_note": REFERENCE_NOTE if reference else None,
    }
