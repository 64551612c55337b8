"""The workload vocabulary shared by convert, device_bench and budgets files: sizes, tiles and frames."""

from __future__ import annotations

import numpy as np
import pytest

from edgesr.datasets import builtin_hr_images
from edgesr.errors import BadInput
from edgesr.workload import format_size, make_frame, parse_frame, parse_tiles, tile_label, tile_size


def test_sizes_are_written_wxh_and_held_hw() -> None:
    assert parse_frame("960x540") == (540, 960) and parse_frame(" 1920 X 1080 ") == (1080, 1920)
    assert format_size((540, 960)) == "960x540" and format_size(None) == "as the test images"
    assert parse_tiles("128, 256,frame") == (128, 256, "frame") and parse_tiles(96) == (96,)
    assert tile_size("frame", (540, 960)) == (540, 960) and tile_size(128, None) == (128, 128)
    assert tile_label((128, 128)) == "128" and tile_label((540, 960), (540, 960)) == "frame (960x540)"


@pytest.mark.parametrize(
    "call, problem",
    [
        (lambda: parse_frame("960"), "expected WIDTHxHEIGHT"),
        (lambda: parse_frame("0x10"), "width must be 1..8192"),
        (lambda: parse_frame("10x9000"), "height must be 1..8192"),
        (lambda: parse_tiles("128,-4"), "each tile is a side"),
        (lambda: parse_tiles(","), "no tile given"),
        (lambda: parse_tiles("64,64"), "listed twice"),
        (lambda: tile_size("frame", None), "needs the frame size"),
    ],
)
def test_bad_workloads_are_one_line_errors(call, problem: str) -> None:
    with pytest.raises(BadInput, match=problem) as err:
        call()
    assert "\n" not in str(err.value)


def test_make_frame_crops_the_centre_of_a_larger_image() -> None:
    photo = dict(builtin_hr_images("sporco"))["monarch"]  # 512x768
    frame = make_frame(photo, (100, 200))
    top, left = (photo.shape[0] - 100) // 2, (photo.shape[1] - 200) // 2
    assert frame.shape == (100, 200, 3) and np.array_equal(frame, photo[top : top + 100, left : left + 200])


def test_make_frame_mirrors_a_smaller_image_outwards() -> None:
    photo = dict(builtin_hr_images("sporco"))["monarch"][:50, :60]
    frame = make_frame(photo, (130, 200))  # wider than twice the image: the mirror repeats
    assert frame.shape == (130, 200, 3) and frame.flags["C_CONTIGUOUS"]
    ph, pw = (130 - 50) // 2, (200 - 60) // 2
    assert np.array_equal(frame[ph : ph + 50, pw : pw + 60], photo)  # the image itself sits in the middle
    assert np.array_equal(frame[ph - 1, pw : pw + 60], photo[0])  # mirrored: the row above repeats the first
    assert np.array_equal(frame[ph : ph + 50, pw - 1], photo[:, 0])
