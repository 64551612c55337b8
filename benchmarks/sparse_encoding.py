"""Benchmark: how close sparse weight encodings come to the bound, per format, precision and sparsity; one table.

The shipped checkpoint is magnitude-pruned in memory (every prunable conv to the same sparsity, no training:
size figures do not depend on accuracy) and each format's artifacts are built and verified exactly as
`convert` builds them. Per artifact the table gives:

- file bytes; conv weight bytes (values + index vectors + quantization scales/zero points of the conv filters);
- bound bytes: the non-zeros at the file's value width plus 1 bit per weight (a bitmask encoding);
- ratio to the bound; and the size a reference tool gives for the same model, with our ratio to it. TFLite:
  TensorFlow's own sparsifier `mlir_sparsify` (the pass behind `Optimize.EXPERIMENTAL_SPARSITY`) on our dense
  file. Core ML: coremltools' own `prune_weights` with its defaults (then its joint int8 quantizer or n-bit
  palettizer with their defaults) on the same converted program.

TFLite's sparse format stores at least one index byte per stored non-zero (uint8 is its narrowest index type),
so at low sparsity or narrow values (int8) no TFLite encoding can reach the bitmask bound; the table shows how far.
Core ML stores a 1-bit mask (constexpr_sparse_to_dense), so its files come within header bytes of the bound.

    python benchmarks/sparse_encoding.py --out runs/bench-sparse        # 50/80/90 %, TFLite and Core ML
    python benchmarks/sparse_encoding.py --formats coreml --precisions fp32,lut4 --sparsities 0.8

Writes --out/sparse_encoding.{json,md}. It asserts nothing; it prints figures.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from torch import nn  # noqa: E402

from compress.checkpoint import load_checkpoint  # noqa: E402
from compress.pruning.methods.magnitude import prune_once  # noqa: E402
from edgesr.manifest import atomic_output, new_manifest, versions, write_json  # noqa: E402

log = logging.getLogger("sparse_encoding")
BOUND_SLACK = 1.05  # the target: sparse weight bytes <= 1.05 x bound


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints/edsr-tiny-x2/model.pt")
    p.add_argument("--out", type=Path, default=REPO / "runs/bench-sparse")
    p.add_argument("--sparsities", default="0.5,0.8,0.9", help="comma list of sparsities (default 0.5,0.8,0.9)")
    p.add_argument("--formats", default="tflite,coreml", help="comma list of formats (default tflite,coreml)")
    p.add_argument(
        "--precisions",
        default="",
        help="comma list, each applied to the formats that have it (default: every TFLite precision; Core ML "
        + ", ".join(COREML_DEFAULT_PRECISIONS)
        + ")",
    )
    p.add_argument("--tile", type=int, default=48, help="LR tile side of the files (default 48)")
    return p.parse_args(argv)


def pruned_model(checkpoint: Path, sparsity: float) -> nn.Module:
    """The checkpoint with every prunable conv magnitude-pruned to `sparsity` (one-shot, in memory)."""
    model, _ = load_checkpoint(checkpoint)
    prune_once(model, sparsity, layers="all")
    return model.eval()


def _chosen(asked: list[str], known: tuple[str, ...], default: tuple[str, ...]) -> list[str]:
    """The asked precisions this format has, or its default set when none were asked."""
    return [q for q in asked if q in known] if asked else list(default)


def tflite_rows(
    model: nn.Module, sparsity: float, precisions: list[str], tile: int, scale: int
) -> list[dict[str, Any]]:
    """TFLite: dense and sparse files per precision, and `mlir_sparsify` on the same dense file."""
    from convert import parity
    from convert.calibration import calibration_patches
    from convert.sparse_tflite import conv_filter_stats, tf_sparsify
    from convert.tflite_artifacts import TFLITE_PRECISIONS, tflite_artifacts

    x = parity.parity_tile(tile, scale)
    reference = parity.torch_output(model, x)
    calibration = calibration_patches(tile)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in _chosen(precisions, TFLITE_PRECISIONS, TFLITE_PRECISIONS):
            staging = Path(tmp) / precision
            staging.mkdir()
            artifacts, skipped = tflite_artifacts(model, staging, precision, tile, 0.0, x, reference, calibration)
            dense = next(a for a in artifacts if a["encoding"] == "dense")
            if skipped:  # no filter is smaller sparse: what the sparse request yields is the dense encoding
                artifacts.append({**dense, "file": f"{skipped[0]['file']} (kept dense)", "encoding": "sparse"})
            tf_bytes = tf_sparsify((staging / dense["file"]).read_bytes())
            tf_stats = conv_filter_stats(tf_bytes)
            for a in artifacts:
                rows.append(_row(a, "mlir_sparsify", len(tf_bytes), tf_stats.weight_bytes, tf_stats.sparse_tensors))
    return rows


COREML_DEFAULT_PRECISIONS = ("fp32", "fp16", "int8", "lut4")


def coremltools_defaults(model: nn.Module, sparsity: float, precision: str, tile: int) -> Any:
    """The Core ML cross-check: coremltools' own `prune_weights` (OpMagnitudePrunerConfig defaults, which skip
    tensors under 2048 elements), then for int8 / lutN its own joint quantizer / palettizer with default
    thresholds, on the same model and deployment target as ours."""
    import coremltools.optimize.coreml as cto

    from convert import coreml
    from convert.coreml_artifacts import VALUE_BITS

    if precision in ("fp32", "fp16"):
        return coreml.coremltools_default_sparse(coreml.convert_coreml(model, tile, "iOS16", precision), sparsity)
    pruned = coreml.coremltools_default_sparse(coreml.convert_coreml(model, tile, "iOS18"), sparsity)
    types = coreml.PRUNED_OP_TYPES
    if precision == "int8":
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel")
        return cto.linear_quantize_weights(
            pruned, cto.OptimizationConfig(op_type_configs=dict.fromkeys(types, config)), joint_compression=True
        )
    config = cto.OpPalettizerConfig(mode="kmeans", nbits=VALUE_BITS[precision], granularity="per_tensor")
    return cto.palettize_weights(
        pruned, cto.OptimizationConfig(op_type_configs=dict.fromkeys(types, config)), joint_compression=True
    )


def coreml_rows(
    model: nn.Module, sparsity: float, precisions: list[str], tile: int, scale: int
) -> list[dict[str, Any]]:
    """Core ML: dense and sparse packages per precision (verified by the MIL executor), and coremltools' defaults."""
    from convert import coreml, parity
    from convert.coreml_artifacts import COREML_PRECISIONS, coreml_artifacts

    x = parity.parity_tile(tile, scale)
    reference = parity.torch_output(model, x)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in _chosen(precisions, COREML_PRECISIONS, COREML_DEFAULT_PRECISIONS):
            staging = Path(tmp) / precision
            staging.mkdir()
            artifacts, skipped = coreml_artifacts(model, staging, precision, tile, 0.0, x, reference, scale)
            if skipped and not artifacts:
                log.warning("coreml %s skipped: %s", precision, skipped[0]["reason"])
                continue
            theirs_path = coreml.save_mlpackage(
                coremltools_defaults(model, sparsity, precision, tile), staging / "coremltools-default.mlpackage"
            )
            theirs = coreml.mlpackage_stats(theirs_path)
            for a in artifacts:
                a = {**a, "parity": {**a["parity"], "verified_with": {"delegate": "mil_exec"}}}
                rows.append(
                    _row(a, "coremltools defaults", theirs.size_bytes, theirs.weight_bytes, theirs.sparse_tensors)
                )
    return rows


# One function per format; each returns table rows (see `_row`).
FORMAT_ROWS: dict[str, Callable[[nn.Module, float, list[str], int, int], list[dict[str, Any]]]] = {
    "tflite": tflite_rows,
    "coreml": coreml_rows,
}


def _row(a: dict[str, Any], tool: str, tool_file: int, tool_weights: int, tool_sparse: int) -> dict[str, Any]:
    w = a["weights"]
    return {
        "format": a["format"],
        "precision": a["precision"],
        "file": a["file"],
        "encoding": a["encoding"],
        "file_bytes": a["size_bytes"],
        "conv_weights": w["conv_weights"],
        "nonzeros": w["nonzeros"],
        "sparse_tensors": w["sparse_tensors"],
        "weight_bytes": w["weight_bytes"],
        "bound_bytes": w["bound_bytes"],
        "ratio_to_bound": w["weight_bytes"] / w["bound_bytes"],
        "crosscheck_tool": tool,
        "crosscheck_file_bytes": tool_file,
        "crosscheck_weight_bytes": tool_weights,
        "crosscheck_sparse_tensors": tool_sparse,
        "ratio_to_crosscheck": w["weight_bytes"] / tool_weights,
        "file_ratio_to_crosscheck": a["size_bytes"] / tool_file,
        "verified_with": a["parity"]["verified_with"]["delegate"],
        "xnnpack": (a.get("runtime_requirements") or {}).get("xnnpack", True),
    }


COLUMNS = (
    ("sparsity", "sparsity", "{:.0%}"),
    ("format", "format", "{}"),
    ("file", "artifact", "{}"),
    ("file_bytes", "file B", "{:,}"),
    ("weight_bytes", "conv weights B", "{:,}"),
    ("bound_bytes", "bound B", "{:,}"),
    ("ratio_to_bound", "/ bound", "{:.3f}"),
    ("crosscheck_weight_bytes", "cross-check B", "{:,}"),
    ("ratio_to_crosscheck", "/ cross-check", "{:.3f}"),
    ("crosscheck_file_bytes", "cross-check file B", "{:,}"),
    ("file_ratio_to_crosscheck", "file / cross-check file", "{:.3f}"),
    ("sparse_tensors", "sparse tensors", "{}"),
    ("crosscheck_sparse_tensors", "cross-check sparse tensors", "{}"),
    ("verified_with", "verified with", "{}"),
)


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per format, counts over the sparse rows: within 1.05 x bound; at most the cross-check tool's size.

    "At most the cross-check" holds on file bytes and on weight bytes counting each sparse tensor's flatbuffer
    tables (`SPARSE_TENSOR_OVERHEAD_BYTES`): TF encodes tensors whose data saving is smaller than those tables
    (e.g. a 9-weight filter: 17 B less data, ~270 B more tables); we keep them dense.
    """
    from convert.sparse_tflite import SPARSE_TENSOR_OVERHEAD_BYTES as tables

    out = {}
    for fmt in sorted({r["format"] for r in rows}):
        sparse = [r for r in rows if r["encoding"] == "sparse" and r["format"] == fmt]
        out[fmt] = {
            "sparse_rows": len(sparse),
            f"within_{BOUND_SLACK}x_bound": sum(r["ratio_to_bound"] <= BOUND_SLACK for r in sparse),
            "weight_bytes_at_most_crosscheck": sum(r["weight_bytes"] <= r["crosscheck_weight_bytes"] for r in sparse),
            "file_at_most_crosscheck": sum(r["file_bytes"] <= r["crosscheck_file_bytes"] for r in sparse),
        }
        if fmt == "tflite":
            out[fmt]["weight_bytes_with_tables_at_most_crosscheck"] = sum(
                r["weight_bytes"] + tables * r["sparse_tensors"]
                <= r["crosscheck_weight_bytes"] + tables * r["crosscheck_sparse_tensors"]
                for r in sparse
            )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMAT_ROWS]
    if unknown:
        print(f"error: unknown format {unknown[0]!r}; this benchmark knows {', '.join(FORMAT_ROWS)}", file=sys.stderr)
        return 2
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    rows: list[dict[str, Any]] = []
    for sparsity in sparsities:
        model = pruned_model(args.checkpoint, sparsity)
        for fmt in formats:
            for row in FORMAT_ROWS[fmt](model, sparsity, precisions, args.tile, model.config.scale):
                rows.append({"sparsity": sparsity, **row})
                print(" ".join(f"{h}={f.format(rows[-1][k])}" for k, h, f in COLUMNS), flush=True)
    summary = summarize(rows)
    table = markdown(rows)
    print(table)
    print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out / "sparse_encoding.json",
        new_manifest(
            "bench-sparse-encoding",
            checkpoint=str(args.checkpoint),
            tile=args.tile,
            rows=rows,
            summary=summary,
            versions=versions("torch", "litert-torch", "ai-edge-litert", "tensorflow-cpu", "coremltools"),
        ),
    )
    with atomic_output(args.out / "sparse_encoding.md") as tmp:
        tmp.write_text(f"# Sparse encoding vs bound\n\n{table}\n\n{summary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
