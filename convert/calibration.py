"""Calibration input for full-int8 conversion: real LR patches from the bundled training photos.

Static int8 quantization fixes every activation's range from the inputs it sees while calibrating, so those
inputs must look like what the model will get: LR photos in [0, 1]. The patches come from scikit-image's bundled
photos (`edgesr.datasets.training_photos`), never from the test sets the PSNR figures are measured on, so
calibration does not see the images it is scored on.
"""

from __future__ import annotations

import numpy as np

from edgesr.datasets import training_photos
from edgesr.errors import BadInput
from edgesr.images import bicubic_downscale, modcrop, to_float
from edgesr.workload import Size, as_size

# The LR patches are cut from the photos downscaled by this factor (bicubic, as the SR test pairs are made).
CALIBRATION_DOWNSCALE = 2


def calibration_patches(tile: int | Size, count: int = 16, seed: int = 0) -> np.ndarray:
    """`count` random LR patches of the tile's size (a side, or (H, W)) as float32 NHWC (count, H, W, 3) in
    [0, 1], photo by photo."""
    th, tw = as_size(tile)
    if min(th, tw) < 1 or count < 1:
        raise BadInput(f"calibration needs a positive tile and count, got tile {tile}, count {count}")
    rng = np.random.default_rng(seed)
    lrs = []
    for _, photo in training_photos():
        lr = bicubic_downscale(modcrop(photo, CALIBRATION_DOWNSCALE), CALIBRATION_DOWNSCALE)
        if lr.shape[0] >= th and lr.shape[1] >= tw:
            lrs.append(lr)
    if not lrs:
        raise BadInput(
            f"calibration tile {tw}x{th} is larger than every bundled training photo's LR image; int8 needs a "
            "smaller tile (or another precision)"
        )
    patches = np.empty((count, th, tw, 3), dtype=np.float32)
    for i in range(count):
        lr = lrs[i % len(lrs)]  # every photo in turn, so a handful of patches already spans them all
        top = int(rng.integers(0, lr.shape[0] - th + 1))
        left = int(rng.integers(0, lr.shape[1] - tw + 1))
        patches[i] = to_float(lr[top : top + th, left : left + tw])
    return patches
