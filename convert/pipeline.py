"""`convert_model`: one model in, every requested format x precision plus `manifest.json` out, all or nothing.

Order: check the output folder, load and check the model (`compress.intake`: SR-shaped; `convert.ops`: supported
operators), measure the receptive field (the tiling overlap; of the local paths when the model also pools
globally, which the manifest notes), check the tile, lower what a converter lacks into
exact equivalents (`convert.lowering`: transposed convs; checked against the original in torch, and the lowered
graph's operators checked again, as the converters will see them), then build every artifact from the lowered
model in a hidden staging folder inside the output folder (TFLite: `convert.tflite_artifacts`, Core ML:
`convert.coreml_artifacts`; each verifies its files' parity against the ORIGINAL model's torch output on a real
photo tile), and only then move the artifacts into place and write the manifest last (with `lowered`: what was
rewritten, and `ops`: the operators the converters got). Any error leaves the output folder as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from compress.intake import PROBE_SIZE, LoadedModel, ModelSpec, load_model
from compress.receptive_field import local_receptive_field, tiling_overlap
from convert import parity
from convert.lowering import lower_for_conversion
from convert.ops import check_supported_ops, export_program, op_counts
from convert.sparse_tflite import MIN_SPARSITY
from edgesr.errors import BadInput
from edgesr.manifest import MANIFEST_NAME, as_write_error, new_manifest, sha256, size_bytes, versions, write_json
from edgesr.progress import progress
from edgesr.workload import MAX_SIDE, Size, as_size, format_size

log = logging.getLogger("convert")

FORMATS = ("tflite", "coreml")
# One precision vocabulary for both formats (lutN = N-bit palettized weights, Core ML only). A format that
# cannot build a requested precision lists it under the manifest's "skipped"; that is not an error.
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8", *(f"lut{n}" for n in range(1, 9)))
DEFAULT_PRECISIONS = ("fp32",)
DEFAULT_TILE = 128
CALIBRATION_PATCHES = 16
# Why a format has no variant for a precision, for the manifest's "skipped" entries.
_NO_VARIANT = {
    ("tflite", "lut"): "TFLite has no palettized (n-bit look-up table) weights",
    ("coreml", "int8-dynamic"): "Core ML has no dynamic-range (activation) quantization; int8 gives int8 weights",
}
ARTIFACT_KEYS = ("file", "format", "encoding", "precision", "size_bytes", "sha256", "weights", "parity")
WEIGHT_KEYS = ("conv_weights", "nonzeros", "sparse_tensors", "weight_bytes", "bound_bytes")


@dataclass(frozen=True)
class ConvertConfig:
    formats: tuple[str, ...] = FORMATS
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    tile: Size | None = None  # LR tile (height, width) the files take; None: DEFAULT_TILE or a static .pt2's size
    sparse_min: float = MIN_SPARSITY  # encode a conv's weights sparse when at least this fraction is zero
    name: str | None = None  # model name for report rows

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise BadInput(f"unknown format '{unknown[0] if unknown else ''}'; known: {', '.join(FORMATS)}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise BadInput(f"unknown precision '{unknown[0] if unknown else ''}'; known: {', '.join(PRECISIONS)}")
        if self.tile is not None and not (1 <= min(self.tile) and max(self.tile) <= MAX_SIDE):
            raise BadInput(f"tile must be 1..{MAX_SIDE} pixels a side, got {format_size(self.tile)}")
        if not 0.0 <= self.sparse_min <= 1.0:
            raise BadInput(f"sparse-min must be in [0, 1], got {self.sparse_min}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))


def parse_formats(text: str) -> tuple[str, ...]:
    """'tflite,coreml' -> ('tflite', 'coreml'); unknown names are BadInput."""
    formats = _parse_list(text)
    ConvertConfig(formats=formats)  # validates
    return formats


def parse_precisions(text: str) -> tuple[str, ...]:
    """'fp32,int8' -> ('fp32', 'int8'); unknown names are BadInput."""
    precisions = _parse_list(text)
    ConvertConfig(precisions=precisions)  # validates
    return precisions


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    formats: Iterable[str] = FORMATS,
    tile: int | Size | None = DEFAULT_TILE,
    sparse_min: float = MIN_SPARSITY,
    name: str | None = None,
    precisions: Iterable[str] = DEFAULT_PRECISIONS,
) -> dict[str, Any]:
    """Convert an edgesr checkpoint, an EDSR-PyTorch state dict or a .pt2 into `out_dir`; returns the manifest."""
    spec = ModelSpec(checkpoint=Path(checkpoint))
    return convert_model(spec, out_dir, formats, precisions, tile, sparse_min, name)


def convert_model(
    spec: ModelSpec,
    out_dir: str | os.PathLike,
    formats: Iterable[str] = FORMATS,
    precisions: Iterable[str] = DEFAULT_PRECISIONS,
    tile: int | Size | None = None,
    sparse_min: float = MIN_SPARSITY,
    name: str | None = None,
    frame: Size | None = None,
) -> dict[str, Any]:
    """Convert the model `spec` names into `out_dir`, every format x precision, for one tile (a side or (H, W));
    returns the manifest it wrote. `frame` (the workload's LR frame) is recorded when the tile is the frame."""
    cfg = ConvertConfig(tuple(formats), tuple(precisions), None if tile is None else as_size(tile), sparse_min, name)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    intake = load_model(spec)
    program = export_program(intake.model, spec.origin, intake.input_size or PROBE_SIZE)
    check_supported_ops(program, spec.origin)
    intake_ops = op_counts(program)
    tile = _tile(cfg, intake, spec)
    model = intake.model
    log.info("%s: x%d SR model, %d kinds of operators, all supported", spec.origin, intake.scale, len(intake_ops))
    # A static .pt2 runs at its own size only: probe the receptive field there.
    probe = {"start": min(tile), "limit": min(tile)} if intake.input_size else {}
    radius, global_stats = local_receptive_field(model, **probe)
    overlap = tiling_overlap(radius)
    if min(tile) <= 2 * overlap:
        raise BadInput(
            f"tile {format_size(tile)} must be larger than 2 x overlap = {2 * overlap} a side "
            f"(overlap = receptive-field radius {radius} + {overlap - radius})"
        )
    x = parity.parity_tile(tile, intake.scale)
    lowered = lower_for_conversion(model, x, spec.origin)  # what the converters get; `model` stays the reference
    converted_ops = op_counts(lowered.program) if lowered.program is not None else intake_ops
    with staged(out_dir, ".convert-") as staging:
        reference = parity.torch_output(model, x)
        artifacts, skipped = _build_all(lowered.model, staging, cfg, tile, intake.scale, x, reference)
        for a in artifacts:  # the files as published: sizes and digests measured here, once, for every format
            a.update(size_bytes=size_bytes(staging / a["file"]), sha256=sha256(staging / a["file"]))
        manifest = new_manifest(
            "convert",
            model=cfg.name or intake.name,
            source=intake.source,
            scale=intake.scale,
            tile=_tile_record(tile, overlap, radius, global_stats, frame),
            io={
                "layout": "NHWC",
                "dtype": "float32",
                "range": [0, 1],
                "input_shape": list(x.shape),
                "output_shape": list(reference.shape),
            },
            formats=list(cfg.formats),
            precisions=list(cfg.precisions),
            ops=converted_ops,
            lowered=lowered.records,
            lowering_check=lowered.check,
            artifacts=artifacts,
            skipped=skipped,
            versions=versions("torch", "litert-torch", "ai-edge-litert", "coremltools", "scikit-learn", "numpy"),
        )
        _publish(staging, out_dir, [a["file"] for a in artifacts], manifest)
    log.info("wrote %s: %d artifacts, %d skipped", out_dir / MANIFEST_NAME, len(artifacts), len(skipped))
    return manifest


def _tile_record(
    tile: Size, overlap: int, radius: int, global_stats: list[str], frame: Size | None = None
) -> dict[str, Any]:
    """The manifest's tile: size, overlap, radius; for a model with global statistics, which and what it means."""
    record: dict[str, Any] = {"height": tile[0], "width": tile[1], "overlap": overlap, "receptive_field_radius": radius}
    if frame is not None and tuple(frame) == tuple(tile):
        record["whole_frame"] = format_size(frame)
    if global_stats:
        record["global_statistics"] = global_stats
        record["note"] = (
            f"the model also pools over its whole input ({', '.join(global_stats)}: global context); the radius "
            "is that of its local paths, so tiled output approximates whole-frame output rather than equalling it"
        )
    return record


def _tile(cfg: ConvertConfig, intake: LoadedModel, spec: ModelSpec) -> Size:
    """The tile: as asked, else DEFAULT_TILE; a static .pt2 fixes it to the size it was exported for."""
    if intake.input_size is None:
        return cfg.tile or (DEFAULT_TILE, DEFAULT_TILE)
    fixed = (intake.input_size, intake.input_size)
    if cfg.tile not in (None, fixed):
        raise BadInput(
            f"{spec.origin}: exported for a {intake.input_size}x{intake.input_size} input, so the tile must be "
            f"{intake.input_size}, not {format_size(cfg.tile)} (or export it with dynamic H and W)"
        )
    return fixed


Builder = Callable[[str], tuple[list[dict[str, Any]], list[dict[str, Any]]]]


def _builders(
    model: nn.Module, staging: Path, cfg: ConvertConfig, tile: Size, scale: int, x: np.ndarray, reference: np.ndarray
) -> dict[str, tuple[tuple[str, ...], Builder]]:
    """Per requested format: the precisions it builds and a function building one precision's artifacts."""
    out: dict[str, tuple[tuple[str, ...], Builder]] = {}
    if "tflite" in cfg.formats:
        from convert.calibration import calibration_patches
        from convert.tflite_artifacts import TFLITE_PRECISIONS, tflite_artifacts

        calibration: np.ndarray | None = None

        def tflite(precision: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            nonlocal calibration
            if calibration is None and precision == "int8":  # only full-integer quantization calibrates
                calibration = calibration_patches(tile, count=CALIBRATION_PATCHES, seed=0)
            return tflite_artifacts(model, staging, precision, tile, cfg.sparse_min, x, reference, calibration)

        out["tflite"] = (tuple(TFLITE_PRECISIONS), tflite)
    if "coreml" in cfg.formats:
        from convert.coreml_artifacts import COREML_PRECISIONS, coreml_artifacts

        def coreml(precision: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return coreml_artifacts(model, staging, precision, tile, cfg.sparse_min, x, reference, scale)

        out["coreml"] = (tuple(COREML_PRECISIONS), coreml)
    return out


def _build_all(
    model: nn.Module, staging: Path, cfg: ConvertConfig, tile: Size, scale: int, x: np.ndarray, reference: np.ndarray
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every format x precision into `staging`: (artifacts, skipped), format by format in FORMATS order."""
    artifacts: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    builders = _builders(model, staging, cfg, tile, scale, x, reference)
    work = [(fmt, precision) for fmt in builders for precision in cfg.precisions]
    for fmt, precision in progress(work, desc=f"convert {format_size(tile)}", unit="variant"):
        supported, build = builders[fmt]
        if precision not in supported:
            reason = _NO_VARIANT.get((fmt, precision.rstrip("0123456789")), f"{fmt} has no {precision} variant")
            skipped.append({"format": fmt, "precision": precision, "reason": reason})
            log.info("%s %s: skipped, %s", fmt, precision, reason)
            continue
        built, not_built = build(precision)
        artifacts += built
        skipped += not_built
        for s in not_built:
            log.info("%s not written: %s", s.get("file", f"{fmt} {precision}"), s.get("reason"))
    for a in artifacts:
        _check_entry(a, staging)
    files = [a["file"] for a in artifacts]
    if len(set(files)) != len(files):
        raise RuntimeError(f"two artifacts share a file name: {files}")
    return artifacts, skipped


def _check_entry(a: dict[str, Any], staging: Path) -> None:
    """Every manifest entry carries what the manifest promises (the format builders' contract)."""
    missing = [k for k in ARTIFACT_KEYS if k not in a and k not in ("size_bytes", "sha256")]
    missing += [f"weights.{k}" for k in WEIGHT_KEYS if k not in (a.get("weights") or {})]
    if missing or not (staging / a.get("file", "")).exists():
        raise RuntimeError(f"artifact entry {a.get('file')!r} is incomplete or its file is missing: {missing}")


def check_out_dir(out_dir: Path) -> None:
    """Fail early, before any slow work, if `out_dir` cannot be used or created."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise BadInput(f"{out_dir}: output path exists and is not a folder")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise BadInput(f"{out_dir}: output folder is not writable")
    elif not out_dir.parent.is_dir():
        raise BadInput(f"{out_dir}: its parent folder {out_dir.parent} does not exist")
    elif not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise BadInput(f"{out_dir}: cannot create it, {out_dir.parent} is not writable")


@contextlib.contextmanager
def staged(out_dir: Path, prefix: str) -> Iterator[Path]:
    """A hidden staging folder inside `out_dir` (created if needed) for work that is published only whole: removed
    afterwards either way; on an error, `out_dir` too if this call created it and it is still empty."""
    created = make_out_dir(out_dir)
    try:
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=prefix))
    except OSError as exc:
        if created:
            out_dir.rmdir()
        raise BadInput(f"{out_dir}: cannot write into the output folder ({exc.strerror or exc})") from None
    try:
        yield staging
    except BaseException as exc:
        error = as_write_error(exc, out_dir) if isinstance(exc, Exception) else exc  # while the disk is still full
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        if error is not exc:
            raise error from exc
        raise
    shutil.rmtree(staging, ignore_errors=True)


def make_out_dir(out_dir: Path) -> bool:
    """Create `out_dir` if needed; returns True if this call created it."""
    if out_dir.is_dir():
        return False
    try:
        out_dir.mkdir()
    except OSError as exc:
        raise BadInput(f"{out_dir}: cannot create output folder ({exc.strerror or exc})") from None
    return True


def _publish(staging: Path, out_dir: Path, files: list[str], manifest: dict[str, Any]) -> None:
    """Move verified artifacts from staging into `out_dir`, then write the manifest (last)."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # never leave an old manifest beside new artifacts
    for name in files:
        dst = out_dir / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(staging / name, dst)
    write_json(out_dir / MANIFEST_NAME, manifest)
