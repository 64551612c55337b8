"""`convert --tile 128,256,frame --frame 960x540`: one model converted for several tiles, all or nothing.

A single tile converts straight into the output folder (`convert_model`). Several tiles each get a subfolder
`tile-<size>/` (`tile-128`, `tile-256`, `tile-960x540` for the whole frame) with its own artifacts and manifest,
which `device_bench bench` reads as one folder (its --tile picks among them). Every tile is built in a hidden
staging folder first; only when all succeeded are the subfolders moved into place, so a failure at any tile
leaves the output folder as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from compress.intake import ModelSpec
from convert.pipeline import DEFAULT_PRECISIONS, FORMATS, check_out_dir, convert_model, staged
from convert.sparse_tflite import MIN_SPARSITY
from edgesr.errors import BadInput
from edgesr.manifest import MANIFEST_NAME
from edgesr.workload import Size, format_size, tile_size

log = logging.getLogger("convert")


def tile_folder(size: Size) -> str:
    """tile-128 for a 128x128 tile, tile-960x540 for any other (the whole frame)."""
    return f"tile-{size[0]}" if size[0] == size[1] else f"tile-{format_size(size)}"


def convert_tiles(
    spec: ModelSpec,
    out_dir: str | os.PathLike,
    tiles: tuple[int | str, ...] | None = None,
    frame: Size | None = None,
    formats: Iterable[str] = FORMATS,
    precisions: Iterable[str] = DEFAULT_PRECISIONS,
    sparse_min: float = MIN_SPARSITY,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Convert for every tile in `tiles` (sides or "frame", which needs `frame`); None: the default tile. Returns
    the manifests written, in the order of `tiles`."""
    out_dir = Path(out_dir)
    sizes = [tile_size(t, frame) for t in tiles] if tiles else [None]
    if len(sizes) == 1:
        return [convert_model(spec, out_dir, formats, precisions, sizes[0], sparse_min, name, frame)]
    folders = [tile_folder(s) for s in sizes]
    check_out_dir(out_dir)
    if (out_dir / MANIFEST_NAME).is_file():
        raise BadInput(
            f"{out_dir}: holds a single-tile conversion ({MANIFEST_NAME}); write a tile list into another --out"
        )
    manifests = []
    with staged(out_dir, ".tiles-") as staging:
        for i, (size, folder) in enumerate(zip(sizes, folders, strict=True), 1):
            log.info("tile %d of %d: %s", i, len(sizes), format_size(size))
            manifests.append(convert_model(spec, staging / folder, formats, precisions, size, sparse_min, name, frame))
        for folder in folders:
            if (out_dir / folder).exists():
                shutil.rmtree(out_dir / folder)
            os.replace(staging / folder, out_dir / folder)
    log.info("wrote %d tile folders into %s: %s", len(folders), out_dir, ", ".join(folders))
    return manifests
