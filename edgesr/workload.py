"""The workload a user ships: the LR frame size and the tile (or whole frame) the model runs at.

  frame "960x540"          LR frame width x height in pixels (what the app feeds the model, before upscaling)
  tiles "128,256,frame"    square tile sides in LR pixels, or `frame`: the model takes the whole frame at once

Sizes are written WxH (as video sizes are) and held as (height, width), the order arrays use. One parser for
convert, device_bench and the budgets file, so `960x540` means the same everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgesr.errors import BadInput

FRAME_TILE = "frame"
MAX_SIDE = 8192  # no workload may make a runner allocate without bound: 8K is the largest frame we accept
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")

Size = tuple[int, int]  # (height, width)


def parse_frame(text: str, where: str = "--frame") -> Size:
    """'960x540' (width x height) -> (540, 960)."""
    m = _SIZE.match(str(text))
    if not m:
        raise BadInput(f"{where}: expected WIDTHxHEIGHT in LR pixels such as 960x540, got {text!r}")
    width, height = int(m[1]), int(m[2])
    for name, side in (("width", width), ("height", height)):
        if not 1 <= side <= MAX_SIDE:
            raise BadInput(f"{where}: frame {name} must be 1..{MAX_SIDE} pixels, got {side}")
    return height, width


def format_size(size: Size | list[int] | None) -> str:
    """(540, 960) -> '960x540'; None -> 'as the test images'."""
    if size is None:
        return "as the test images"
    return f"{size[1]}x{size[0]}"


def parse_tiles(text: str | int, where: str = "--tile") -> tuple[int | str, ...]:
    """'128,256,frame' -> (128, 256, 'frame'); each entry a side in LR pixels or 'frame'."""
    tiles: list[int | str] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part == FRAME_TILE:
            tiles.append(FRAME_TILE)
        elif part.isdigit() and 1 <= int(part) <= MAX_SIDE:
            tiles.append(int(part))
        else:
            raise BadInput(f"{where}: each tile is a side in LR pixels (1..{MAX_SIDE}) or 'frame', got {part!r}")
    if not tiles:
        raise BadInput(f"{where}: no tile given")
    if len(set(tiles)) != len(tiles):
        raise BadInput(f"{where}: a tile is listed twice in {text!r}")
    return tuple(tiles)


def as_size(tile: int | Size | list[int]) -> Size:
    """A tile given as a side N (square) or as (height, width), as (height, width)."""
    if isinstance(tile, int):
        return tile, tile
    h, w = tile
    return int(h), int(w)


def tile_size(tile: int | str, frame: Size | None, where: str = "--tile") -> Size:
    """A tile entry as (height, width): a side N is NxN; 'frame' is the frame size (which must then be known)."""
    if tile == FRAME_TILE:
        if frame is None:
            raise BadInput(
                f"{where}: tile 'frame' needs the frame size (--frame WIDTHxHEIGHT or the budgets' workload)"
            )
        return frame
    return int(tile), int(tile)


def tile_label(size: Size | list[int], frame: Size | None = None) -> str:
    """How a report names a tile: '128' for 128x128, 'frame (960x540)' for the whole frame, else WxH."""
    h, w = size
    if frame is not None and (h, w) == tuple(frame):
        return f"frame ({format_size(frame)})"
    return str(h) if h == w else format_size((h, w))


@dataclass(frozen=True)
class Workload:
    """What one measurement runs: LR frames of `frame` size (None: the test images as they are) cut into tiles
    of `tiles` (None: whatever size each artifact was converted for)."""

    frame: Size | None = None
    tiles: tuple[int | str, ...] | None = None

    def tile_sizes(self) -> list[Size] | None:
        return None if self.tiles is None else [tile_size(t, self.frame) for t in self.tiles]

    def to_dict(self) -> dict:
        return {
            "frame": format_size(self.frame) if self.frame else None,
            "tiles": list(self.tiles) if self.tiles else None,
        }


def make_frame(lr: np.ndarray, frame: Size) -> np.ndarray:
    """A frame of real picture content at `frame` size from an LR image: its centre crop where the image is
    larger, mirrored outwards (symmetric padding, repeated as needed) where it is smaller."""
    h, w = frame
    ih, iw = lr.shape[:2]
    top, left = max(0, (ih - h) // 2), max(0, (iw - w) // 2)
    crop = lr[top : top + h, left : left + w]
    ph, pw = h - crop.shape[0], w - crop.shape[1]
    if ph or pw:
        crop = np.pad(crop, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(crop)
