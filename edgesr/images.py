"""Image I/O and the LR degradation: the one place images are read, written, cropped and downscaled.

Images are HxWx3 uint8 RGB numpy arrays at the edges of the system; models see float32 in [0, 1].
LR images are made with Pillow's bicubic filter (`Image.resize(..., Image.BICUBIC)`, Keys a = -0.5 with
antialiasing when downscaling). That is not MATLAB's `imresize`, so PSNR figures are comparable with other
Pillow-bicubic results, not with MATLAB-bicubic tables in papers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgesr.errors import BadInput
from edgesr.manifest import atomic_output

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (grey and RGBA are converted)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadInput(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def save_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write an HxWx3 uint8 array as PNG atomically (temp file in the same folder, then rename)."""
    if img.dtype != np.uint8:
        raise TypeError(f"save_png expects uint8, got {img.dtype}")
    with atomic_output(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop bottom/right so height and width are multiples of `scale` (the SR papers' `modcrop`)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def bicubic_resize(img: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 RGB array to (width, height) with Pillow's bicubic filter."""
    return np.array(Image.fromarray(img).resize(size_wh, Image.BICUBIC), dtype=np.uint8)  # owned, writable


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """The LR image of a modcropped HR image: Pillow bicubic, exactly 1/scale of each side."""
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {w}x{h} is not a multiple of scale {scale}; modcrop first")
    return bicubic_resize(hr, (w // scale, h // scale))


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline every SR model must beat."""
    h, w = lr.shape[:2]
    return bicubic_resize(lr, (w * scale, h * scale))


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 in [0, 1]."""
    return img.astype(np.float32) / 255.0


def quantize_uint8(img: np.ndarray) -> np.ndarray:
    """float image in [0, 1] -> uint8, rounding to nearest as the SR papers do before measuring."""
    return np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
