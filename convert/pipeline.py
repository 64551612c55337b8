"""`convert_checkpoint`: one checkpoint in, the requested artifacts plus `manifest.json` out, all or nothing.

Order: load the checkpoint, measure the receptive field (the tiling overlap), check the tile, then build every
artifact in a hidden staging folder inside the output folder, verify it, and only then move the artifacts into
place and write the manifest last. Any error leaves the output folder as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.checkpoint import load_checkpoint
from convert import coreml, parity
from convert.receptive_field import receptive_field_radius, tiling_overlap
from convert.sparse_tflite import MIN_SPARSITY, conv_filter_stats, sparsify_tflite
from convert.tflite import convert_tflite
from edgesr.errors import BadInput, CheckFailed
from edgesr.manifest import MANIFEST_NAME, atomic_output, new_manifest, sha256, size_bytes, versions, write_json

log = logging.getLogger("convert")

FORMATS = ("tflite", "coreml")
TFLITE_SPARSE_NOTE = (
    "sparse conv weights shrink the file only: DENSIFY restores dense fp32 weights when the model loads, "
    "so peak memory and latency are those of the dense file"
)
COREML_NOTE = (
    "output not verified: Core ML prediction needs macOS; the saved program was read back on Linux "
    "and its conv weights checked"
)


@dataclass(frozen=True)
class ConvertConfig:
    formats: tuple[str, ...] = FORMATS
    tile: int = 128  # LR tile side in pixels; the files take exactly (1, tile, tile, 3)
    sparse_min: float = MIN_SPARSITY  # encode a conv's weights sparse when at least this fraction is zero
    name: str | None = None  # model name for report rows

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise BadInput(f"unknown format '{unknown[0] if unknown else ''}'; known: {', '.join(FORMATS)}")
        if self.tile < 1:
            raise BadInput(f"tile must be a positive number of pixels, got {self.tile}")
        if not 0.0 <= self.sparse_min <= 1.0:
            raise BadInput(f"sparse-min must be in [0, 1], got {self.sparse_min}")


def parse_formats(text: str) -> tuple[str, ...]:
    """'tflite,coreml' -> ('tflite', 'coreml'); unknown names are BadInput."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    ConvertConfig(formats=formats)  # validates
    return formats


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    formats: tuple[str, ...] | list[str] = FORMATS,
    tile: int = 128,
    sparse_min: float = MIN_SPARSITY,
    name: str | None = None,
) -> dict[str, Any]:
    """Convert an edgesr checkpoint into `out_dir`; returns the manifest it wrote."""
    cfg = ConvertConfig(tuple(formats), tile, sparse_min, name)
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_out_dir(out_dir)
    model, source = load_checkpoint(checkpoint)
    radius = receptive_field_radius(model)
    overlap = tiling_overlap(radius)
    if cfg.tile <= 2 * overlap:
        raise BadInput(
            f"tile {cfg.tile} must be larger than 2 x overlap = {2 * overlap} "
            f"(overlap = receptive-field radius {radius} + {overlap - radius})"
        )
    scale = _model_scale(model)
    created = _make_out_dir(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".convert-"))
    try:
        x = parity.parity_tile(cfg.tile, scale)
        reference = parity.torch_output(model, x)
        artifacts: list[dict[str, Any]] = []
        if "tflite" in cfg.formats:
            artifacts += _tflite_artifacts(model, staging, cfg, x, reference)
        if "coreml" in cfg.formats:
            artifacts += _coreml_artifacts(model, staging, cfg, scale)
        # A sparse artifact in which nothing was encoded sparse would only duplicate the dense one.
        skipped = [
            {"file": a["file"], "reason": f"no conv weight tensor with >= {cfg.sparse_min:.0%} zeros worth encoding"}
            for a in artifacts
            if a["encoding"] == "sparse" and a["weights"]["sparse_tensors"] == 0
        ]
        for s in skipped:
            log.info("%s not written: %s", s["file"], s["reason"])
        artifacts = [a for a in artifacts if a["file"] not in {s["file"] for s in skipped}]
        manifest = new_manifest(
            "convert",
            model=cfg.name or source.get("name") or checkpoint.stem,
            source={
                "checkpoint": str(checkpoint),
                "sha256": sha256(checkpoint),
                "psnr_y_db": source.get("psnr_y_db"),
                "test_set": _test_set_name(source.get("test_set")),
            },
            scale=scale,
            tile={"height": cfg.tile, "width": cfg.tile, "overlap": overlap, "receptive_field_radius": radius},
            io={
                "layout": "NHWC",
                "dtype": "float32",
                "range": [0, 1],
                "input_shape": list(x.shape),
                "output_shape": list(reference.shape),
            },
            artifacts=artifacts,
            skipped=skipped,
            versions=versions("torch", "litert-torch", "ai-edge-litert", "coremltools"),
        )
        _publish(staging, out_dir, [a["file"] for a in artifacts], manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s with %d artifacts", out_dir / MANIFEST_NAME, len(artifacts))
    return manifest


def _model_scale(model: nn.Module) -> int:
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 8, 8))
    return int(out.shape[-1] // 8)


def _test_set_name(test_set: Any) -> str | None:
    if isinstance(test_set, dict):
        return test_set.get("name")
    return test_set if isinstance(test_set, str) else None


def _check_out_dir(out_dir: Path) -> None:
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


def _make_out_dir(out_dir: Path) -> bool:
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


def _weights(conv_weights: int, nonzeros: int, sparse_tensors: int) -> dict[str, int]:
    return {
        "conv_weights": conv_weights,
        "nonzeros": nonzeros,
        "sparse_tensors": sparse_tensors,
        "bound_bytes": parity.bound_bytes(conv_weights, nonzeros),
    }


def _artifact(path: Path, fmt: str, encoding: str) -> dict[str, Any]:
    return {
        "file": path.name,
        "format": fmt,
        "encoding": encoding,
        "precision": "fp32",
        "size_bytes": size_bytes(path),
        "sha256": sha256(path),
    }


def _tflite_artifacts(
    model: nn.Module, staging: Path, cfg: ConvertConfig, x: np.ndarray, reference: np.ndarray
) -> list[dict[str, Any]]:
    dense_path = convert_tflite(model, staging / "dense.tflite", cfg.tile)
    dense_bytes = dense_path.read_bytes()
    sparse_bytes, sparse_stats = sparsify_tflite(dense_bytes, cfg.sparse_min)
    sparse_path = staging / "sparse.tflite"
    with atomic_output(sparse_path) as tmp:
        tmp.write_bytes(sparse_bytes)
    dense_stats = conv_filter_stats(dense_bytes)
    dense_parity, dense_out = parity.check_tflite(dense_path, reference, x)
    sparse_parity, _ = parity.check_tflite(sparse_path, reference, x, dense_output=dense_out)
    dense = _artifact(dense_path, "tflite", "dense")
    dense.update(weights=_weights(dense_stats.conv_weights, dense_stats.nonzeros, 0), parity=dense_parity)
    sparse = _artifact(sparse_path, "tflite", "sparse")
    sparse.update(
        weights=_weights(sparse_stats.conv_weights, sparse_stats.nonzeros, sparse_stats.sparse_tensors),
        parity=sparse_parity,
        min_sparsity=cfg.sparse_min,
        note=TFLITE_SPARSE_NOTE,
    )
    for a in (dense, sparse):
        log.info(
            "%s: %d bytes, %d of %d conv weights non-zero, %d sparse filters",
            a["file"],
            a["size_bytes"],
            a["weights"]["nonzeros"],
            a["weights"]["conv_weights"],
            a["weights"]["sparse_tensors"],
        )
    return [dense, sparse]


def _coreml_artifacts(model: nn.Module, staging: Path, cfg: ConvertConfig, scale: int) -> list[dict[str, Any]]:
    dense_model = coreml.convert_coreml(model, cfg.tile)
    dense_path = coreml.save_mlpackage(dense_model, staging / "dense.mlpackage")
    sparse_path = coreml.save_mlpackage(
        coreml.sparsify_coreml(dense_model, cfg.sparse_min), staging / "sparse.mlpackage"
    )
    if not coreml.same_weights(coreml.read_conv_weights(sparse_path), coreml.read_conv_weights(dense_path)):
        raise CheckFailed("sparse.mlpackage: its conv weights differ from dense.mlpackage's after sparse encoding")
    io = {
        "layout": "NCHW",
        "input_name": coreml.INPUT_NAME,
        "output_name": coreml.OUTPUT_NAME,
        "input_shape": [1, 3, cfg.tile, cfg.tile],
        "output_shape": [1, 3, scale * cfg.tile, scale * cfg.tile],
    }
    out = []
    for path, encoding in ((dense_path, "dense"), (sparse_path, "sparse")):
        stats = coreml.mlpackage_stats(path)
        a = _artifact(path, "coreml", encoding)
        a.update(
            weight_bin_bytes=stats.weight_bin_bytes,
            weights=_weights(stats.conv_weights, stats.nonzeros, stats.sparse_tensors),
            parity=None,
            note=COREML_NOTE,
            io=io,
        )
        if encoding == "sparse":
            a["min_sparsity"] = cfg.sparse_min
        log.info(
            "%s: %d bytes (weight.bin %d), %d sparse conv weights",
            a["file"],
            a["size_bytes"],
            stats.weight_bin_bytes,
            stats.sparse_tensors,
        )
        out.append(a)
    return out
