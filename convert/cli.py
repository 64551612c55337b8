"""`edgesr convert` / `python -m convert`: a checkpoint to TFLite and Core ML files, dense and sparse, verified.

  python -m convert --checkpoint runs/pruned/model.pt --out runs/convert
  python -m convert --checkpoint runs/pruned/model.pt --out runs/convert --formats tflite --tile 96 --name tiny80

Writes into --out (created if its parent exists), per requested format:
  dense.tflite, sparse.tflite        NHWC float32 (1, tile, tile, 3) -> (1, s*tile, s*tile, 3), values in [0, 1]
  dense.mlpackage, sparse.mlpackage  Core ML ML Program, NCHW input "lr" (1, 3, tile, tile), fp32, iOS 16+
  manifest.json                      sizes, sha256, conv weight counts, parity, tiling overlap; written last
A sparse file in which no conv weight qualified (an unpruned model) is not written; the manifest lists it
under "skipped".
Each TFLite file is run in ai_edge_litert on a crop of a bundled photo and compared with torch (max abs error
<= 1e-4); the sparse file must match the dense one bit for bit. Core ML output cannot be run on Linux; its
saved weights are read back and checked instead. The files take one fixed tile size: the device runner tiles
images with the recorded overlap (the model's receptive-field radius + 1).

Exit codes: 0 done, 1 a parity check failed (nothing written), 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from edgesr.errors import run_cli

DEFAULT_FORMATS = "tflite,coreml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesr convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="edgesr checkpoint (model.pt) or EDSR-PyTorch .pt"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder; created if its parent exists")
    parser.add_argument(
        "--formats", default=DEFAULT_FORMATS, help=f"comma-separated: tflite, coreml (default {DEFAULT_FORMATS})"
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=128,
        help="LR tile side in pixels the files take; must exceed 2 x overlap (default 128)",
    )
    parser.add_argument(
        "--sparse-min",
        type=float,
        default=0.3,
        help="encode a conv's weights sparse when at least this fraction is zero (default 0.3)",
    )
    parser.add_argument(
        "--name", help="model name for report rows (default: the checkpoint manifest's name, else the file stem)"
    )
    return parser


def _quiet_converters() -> None:
    """The converters narrate every pass; this command logs one line per artifact instead."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' pass progress bars
    logging.getLogger("coremltools").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # litert-torch calls logging.info() on the root logger per op
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_converters()
    from convert.pipeline import convert_checkpoint, parse_formats  # torch and friends load only past --help

    convert_checkpoint(
        args.checkpoint,
        args.out,
        formats=parse_formats(args.formats),
        tile=args.tile,
        sparse_min=args.sparse_min,
        name=args.name,
    )
    return 0


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(entry())
