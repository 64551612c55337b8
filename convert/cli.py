"""`edgesr convert` / `python -m convert`: a PyTorch SR model to TFLite and Core ML files, every precision, verified.

  python -m convert --checkpoint runs/pruned/model.pt --out runs/convert
  python -m convert --checkpoint runs/pruned/model.pt --out runs/convert --precision fp32,fp16,int8,lut4
  python -m convert --checkpoint edsr_baseline_x2-1bc95232.pt --out runs/edsr --formats tflite --tile 96
  python -m convert --model mynets/sr.py:build --factory-args '{"scale": 2}' --weights sr.pth --out runs/mine
  python -m convert --checkpoint model.pt2 --out runs/exported
  python -m convert --checkpoint runs/pruned/model.pt --tile 128,256,frame --frame 960x540 --out runs/sweep

The model (the same flags as compress; compress.intake), one of:
  --checkpoint FILE         an edgesr checkpoint (compress's model.pt, preset or factory + pruned shapes), an
                            EDSR-PyTorch state dict, a BasicSR EDSR checkpoint, an ISR RDN Keras .h5,
                            pretrained:NAME (fetched by make setup), or a torch.export program (.pt2); a .pt2
                            exported with a static input fixes --tile to its size
  --model NAME|MODULE:FACTORY  an edgesr preset or a function returning an nn.Module (importable module or .py
    [--weights FILE]        file), called with --factory-args as keyword arguments; FILE is its state dict
    [--factory-args JSON]   (torch.save; also {"state_dict"|"model"|"params_ema"|"params": ...}), loaded with
                            weights_only=True, strictly; without --weights the model is used as returned
Every model must map (1, 3, H, W) float RGB in [0, 1] to (1, 3, sH, sW) and use only operators the converters
and the Core ML reference executor handle (convolutions of any groups, ConvTranspose2d (lowered to a conv +
PixelShuffle first), elementwise arithmetic and activations, BatchNorm, explicit padding, concat / split /
slicing, mean pooling, pixel shuffle, nearest/bilinear upsampling; convert/ops.py); anything else is reported
by operator, layer and node.

Writes into --out (created if its parent exists), per format and precision (--precision, default fp32):
  dense.tflite, sparse.tflite            fp32 TFLite, NHWC float32 (1, tile, tile, 3) -> (1, s*tile, s*tile, 3)
  dense-<p>.tflite, sparse-<p>.tflite    p = fp16, int8-dynamic, int8 (float32 I/O in every variant)
  dense.mlpackage, sparse.mlpackage      Core ML ML Program, NCHW input "lr" (1, 3, tile, tile), fp32
  <enc>-<p>.mlpackage                    p = fp16, int8 (iOS 18, sparse + int8), lut1..lut8 (iOS 18, palettized)
  manifest.json                          per artifact: size, sha256, conv weights, non-zeros, weight bytes vs
                                         the bound, parity vs torch and what verified it; tool versions; last
A precision a format cannot build (lutN for TFLite, int8-dynamic for Core ML) and a sparse file in which no conv
weight qualified are listed under "skipped" in the manifest, not written.
Every artifact is run (TFLite in ai_edge_litert, Core ML in edgesr's reference executor for ML programs) on a
crop of a bundled photo and compared with torch against its precision's tolerance. The files take one fixed tile
size: the device runner tiles images with the recorded overlap (the model's receptive-field radius + 1).
--tile takes a list for a tile sweep (and `frame`, the whole --frame at once): each tile gets its own folder
<out>/tile-<size>/ (tile-128, tile-960x540) with its own manifest, all written or none; device_bench bench takes
<out> and picks the tiles its workload names.

Exit codes: 0 done, 1 a parity check failed (nothing written), 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from convert import quiet_converters
from edgesr.errors import ArgumentParser, finite_float, run_cli
from edgesr.manifest import exclusive_output

if TYPE_CHECKING:
    from compress.intake import ModelSpec
    from edgesr.workload import Size

DEFAULT_FORMATS = "tflite,coreml"
DEFAULT_PRECISIONS = "fp32"


def build_parser() -> argparse.ArgumentParser:
    from compress.intake import add_model_arguments

    parser = ArgumentParser(
        prog="edgesr convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder; created if its parent exists")
    parser.add_argument(
        "--formats", default=DEFAULT_FORMATS, help=f"comma-separated: tflite, coreml (default {DEFAULT_FORMATS})"
    )
    parser.add_argument(
        "--precision",
        default=DEFAULT_PRECISIONS,
        help="comma-separated: fp32, fp16, int8-dynamic, int8, lut1..lut8 (default fp32)",
    )
    parser.add_argument(
        "--tile",
        default=None,
        metavar="N[,N|frame...]",
        help="LR tile side in pixels the files take (must exceed 2 x overlap), or `frame` (the whole --frame); a "
        "list makes one tile-<size>/ folder each (default 128, or the input size of a .pt2 exported with static "
        "shapes)",
    )
    parser.add_argument(
        "--frame", metavar="WxH", help="the workload's LR frame, e.g. 960x540 (what --tile frame converts for)"
    )
    parser.add_argument(
        "--sparse-min",
        type=finite_float,
        default=0.0,
        help="a floor: encode a conv's weights sparse only when at least this fraction is zero (default 0: "
        "whenever the sparse form saves bytes)",
    )
    parser.add_argument(
        "--name", help="model name for report rows (default: the checkpoint manifest's name, else the file stem)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_converters()
    # torch and the converters load only past --help
    from compress.intake import spec_from_args
    from edgesr.workload import parse_frame, parse_tiles, tile_size

    frame = parse_frame(args.frame) if args.frame else None
    tiles = parse_tiles(args.tile) if args.tile else None
    for t in tiles or ():
        tile_size(t, frame)  # `frame` needs --frame: say so before loading anything
    spec = spec_from_args(args)
    with exclusive_output(args.out, "convert"):
        _convert(args, spec, tiles, frame)
    return 0


def _convert(args: argparse.Namespace, spec: ModelSpec, tiles: tuple | None, frame: Size | None) -> None:
    from convert.pipeline import parse_formats, parse_precisions
    from convert.tiles import convert_tiles

    convert_tiles(
        spec,
        args.out,
        tiles,
        frame,
        formats=parse_formats(args.formats),
        precisions=parse_precisions(args.precision),
        sparse_min=args.sparse_min,
        name=args.name,
    )


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(entry())
