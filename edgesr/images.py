"""Image I/O and the LR degradation: the one place images are read, written, cropped and downscaled.

Images are HxWx3 uint8 RGB numpy arrays at the edges of the system; models see float32 in [0, 1].
LR images are made by one of the `DEGRADATIONS`:
- `pillow` (the default): Pillow's bicubic filter (`Image.resize(..., Image.BICUBIC)`, Keys a = -0.5 with
  antialiasing when downscaling). PSNR figures are comparable with other Pillow-bicubic results only;
- `matlab`: MATLAB's `imresize(hr, 1/s, 'bicubic')` (`matlab_imresize` here), which is how SR papers, BasicSR
  and DIV2K make their LR images. Use it for figures meant to sit next to paper tables.
Both use Keys' kernel with the same pixel-centre mapping, so they are close but not equal: Pillow renormalises the
kernel at the borders where MATLAB mirrors the image, and rounds in fixed point. On the sporco photos 16-21 % of LR
pixels differ (x2-x4), by up to 10 levels at the borders and 2-5 inside; bicubic Y-PSNR moves by under 0.001 dB.
A figure still says which one it used (`datasets.lr_degradation`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgesr.errors import BadInput
from edgesr.manifest import atomic_output

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

# The LR degradations `bicubic_downscale` can make: the one place that names and describes them.
DEGRADATION_INFO: dict[str, str] = {
    "pillow": "Pillow bicubic (Keys a = -0.5, antialiased); edgesr's default, not the papers' LR",
    "matlab": "MATLAB imresize(hr, 1/s, 'bicubic'), as SR papers, BasicSR and DIV2K make LR images",
}
DEGRADATIONS = tuple(DEGRADATION_INFO)


# The largest image edgesr reads (a 8K frame is 33 Mpx): a header claiming more is refused before decoding, so no
# image file, a "decompression bomb" included, makes a command allocate without bound.
MAX_IMAGE_PIXELS = 40_000_000


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array: grey and RGBA are converted, 16-bit images are scaled to
    8 bit (their high byte, as Pillow reads 16-bit RGB), anything else not 8-bit is refused, never clipped."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            check_image_size(path, img.size)
            img.load()
            return _to_rgb8(path, img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInput(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def check_image_size(path: Path, size_wh: tuple[int, int]) -> None:
    """BadInput if an image of `size_wh` (from its header) is larger than edgesr reads."""
    w, h = size_wh
    if w * h > MAX_IMAGE_PIXELS:
        raise BadInput(
            f"{path}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS // 1_000_000} Mpx edgesr reads; "
            "crop or downscale it first"
        )


def _to_rgb8(path: Path, img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey (PNG/TIFF), or 32-bit integer
        grey = np.asarray(img).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise BadInput(f"{path}: {img.mode} pixels outside 0..65535; save it as an 8- or 16-bit image")
        grey8 = (grey >> 8).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise BadInput(f"{path}: floating-point pixels (mode F) have no fixed range; save it as an 8- or 16-bit image")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


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


def check_degradation(degradation: str) -> str:
    """`degradation` if it is one of `DEGRADATIONS`, else a one-line `BadInput`."""
    if degradation not in DEGRADATION_INFO:
        raise BadInput(f"unknown LR degradation {degradation!r}; choose one of {', '.join(DEGRADATIONS)}")
    return degradation


def degradation_label(degradation: str) -> str:
    """What a manifest or report records for LR made by `bicubic_downscale`: 'pillow-bicubic' or 'matlab-bicubic'."""
    return f"{check_degradation(degradation)}-bicubic"


def bicubic_downscale(hr: np.ndarray, scale: int, degradation: str = "pillow") -> np.ndarray:
    """The LR image of a modcropped HR image, exactly 1/scale of each side, by `degradation` (see DEGRADATIONS)."""
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"HR size {w}x{h} is not a multiple of scale {scale}; modcrop first")
    if check_degradation(degradation) == "matlab":
        lr = matlab_imresize(hr, 1 / scale)  # the scale MATLAB's imresize(hr, 1/s) is given, not (h/s)/h
        assert lr.shape[:2] == (h // scale, w // scale), lr.shape  # ceil(h * (1/s)) == h/s for h a multiple of s
        return lr
    return bicubic_resize(hr, (w // scale, h // scale))


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline every SR model must beat."""
    h, w = lr.shape[:2]
    return bicubic_resize(lr, (w * scale, h * scale))


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 in [0, 1]."""
    return img.astype(np.float32) / 255.0


def quantize_uint8(img: np.ndarray) -> np.ndarray:
    """float image in [0, 1] -> uint8, rounding to nearest as the SR papers do before measuring. In float64, a band
    of rows at a time (a 24-megapixel SR output never has a whole float64 copy)."""
    img = np.asarray(img)
    if img.ndim == 0:
        return np.clip(np.rint(np.float64(img) * 255.0), 0, 255).astype(np.uint8)
    out = np.empty(img.shape, dtype=np.uint8)
    rows = max(1, (1 << 22) // max(1, img[0].size))
    for r in range(0, img.shape[0], rows):
        out[r : r + rows] = np.clip(np.rint(img[r : r + rows].astype(np.float64) * 255.0), 0, 255)
    return out


# ------------------------------------------------------------------------------ MATLAB's imresize, bicubic


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, written as MATLAB's imresize writes it."""
    absx = np.abs(x)
    absx2 = absx**2
    absx3 = absx**3
    return (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1) + (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * (
        (1 < absx) & (absx <= 2)
    )


def matlab_contributions(
    in_length: int, out_length: int, scale: float, antialiasing: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB imresize's `contributions` for the bicubic kernel: per output index, its weights and input indices.

    Returns `(weights, indices)`, both `(out_length, taps)`; row i says output pixel i (0-based) is
    `sum(weights[i] * in[indices[i]])`. The steps are MATLAB's, in float64 and in its order:

    - a downscale (scale < 1) with antialiasing stretches the kernel: h(x) = scale * cubic(scale * x), width 4 / scale;
    - output pixel x (1-based) sits at input coordinate u = x / scale + 0.5 * (1 - 1 / scale), so pixel edges line up;
    - the taps are P = ceil(width) + 2 pixels from floor(u - width / 2), each weighted h(u - index), then normalised
      to sum to 1 per row;
    - indices off the image are mirrored with the edge pixel repeated (a b c | c b a ...), MATLAB's symmetric padding;
    - tap columns whose weight is 0 in every row are dropped.

    Worked example, x2 down (scale 0.5): width 8, u = 2x - 0.5, so output 1 sits at u = 1.5; its taps at distances
    +-0.5, +-1.5, +-2.5, +-3.5 get 0.5 * cubic(0.25, 0.75, 1.25, 1.75) = 0.43359375, 0.11328125, -0.03515625,
    -0.01171875 (these already sum to 1); the taps left of pixel 1 mirror onto pixels 1, 2, 3.
    """
    kernel_width = 4.0
    if scale < 1 and antialiasing:
        h = lambda x: scale * _cubic(scale * x)  # MATLAB: h = @(x) scale * kernel(scale * x)
        kernel_width = kernel_width / scale
    else:
        h = _cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)  # 1-based, may fall off either end
    weights = h(u[:, None] - indices)
    weights = weights / np.sum(weights, axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])  # 0-based [1:n, n:-1:1]
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    used = np.any(weights != 0, axis=0)
    return weights[:, used], indices[:, used]


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8: saturate to [0, 255], round half away from zero (np.rint would round half to even).

    Works in place: `x` (a float64 array of this module's own) is overwritten.
    """
    np.clip(x, 0.0, 255.0, out=x)
    floor = np.floor(x)
    x -= floor  # exact: the fractional part
    floor += x >= 0.5
    return floor.astype(np.uint8)


def _resize_along(img: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One pass of MATLAB's `imresizemex`: float64 weighted sums over `axis`, taps accumulated in order.

    A uint8 input gives a uint8 output (rounded and saturated), as MATLAB's does, so a uint8 image is rounded
    after each pass. Memory: the float64 output plus about two temporaries of its size, one tap at a time.
    """
    src = np.moveaxis(img, axis, 0)
    out = np.zeros((weights.shape[0], *src.shape[1:]), dtype=np.float64)
    term = np.empty_like(out)
    w_shape = (-1,) + (1,) * (src.ndim - 1)
    for k in range(weights.shape[1]):
        np.multiply(weights[:, k].reshape(w_shape), src[indices[:, k]], out=term)
        out += term
    del term
    out = np.moveaxis(out, 0, axis)
    return _round_uint8(out) if img.dtype == np.uint8 else out


def matlab_imresize(
    img: np.ndarray,
    scale: float | None = None,
    output_shape: tuple[int, int] | None = None,
    antialiasing: bool = True,
) -> np.ndarray:
    """MATLAB's `imresize(img, scale, 'bicubic')` (or `imresize(img, output_shape, 'bicubic')`), in numpy.

    Parameters
    ----------
    img : HxW or HxWxC array, uint8 or floating point.
    scale : one factor for both sides (0.5 halves them); the output is ceil(scale * side), as MATLAB sizes it.
    output_shape : (height, width) instead of `scale`; each side then has its own factor out / in.
    antialiasing : MATLAB's 'Antialiasing' (true by default for bicubic): widen the kernel when downscaling.

    Returns
    -------
    uint8 for a uint8 input, rounded half away from zero and saturated after each pass (MATLAB's imresizemex returns
    its input's class, so the intermediate image is uint8 too); float64 for a floating-point input, unclipped (bicubic
    overshoots a little beyond the input's range at sharp edges).

    Dimensions are resized one at a time, the one with the smaller factor first and rows first on a tie (MATLAB's
    `dimensionOrder`, a stable sort of the factors), each with `matlab_contributions` weights. For a 4x4 image whose
    rows are all [96, 0, 0, 0], x2 down gives rows [52.5, -4.5] in float (35/64 * 96 and -3/64 * 96; see
    `matlab_contributions` for the weights) and [53, 0] in uint8.
    """
    if img.ndim not in (2, 3):
        raise ValueError(f"matlab_imresize takes an HxW or HxWxC image, got shape {img.shape}")
    if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"matlab_imresize takes uint8 or floating-point images, got {img.dtype}")
    if (scale is None) == (output_shape is None):
        raise ValueError("give exactly one of scale and output_shape")
    in_shape = img.shape[:2]
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        scales = (float(scale), float(scale))
        out_shape = tuple(math.ceil(scale * n) for n in in_shape)
    else:
        out_shape = tuple(int(n) for n in output_shape)
        if len(out_shape) != 2 or min(out_shape) < 1:
            raise ValueError(f"output_shape must be (height, width) >= 1, got {output_shape}")
        scales = (out_shape[0] / in_shape[0], out_shape[1] / in_shape[1])
    if min(out_shape) < 1:
        raise ValueError(f"scale {scale} leaves no pixels of a {in_shape[1]}x{in_shape[0]} image")
    out = img if img.dtype == np.uint8 else np.asarray(img, dtype=np.float64)  # read only: no copy of float64
    for axis in sorted(range(2), key=lambda d: scales[d]):  # stable: rows first when the factors tie
        if scales[axis] == 1 and out_shape[axis] == in_shape[axis]:
            continue  # the cubic kernel at integer offsets is the identity
        weights, indices = matlab_contributions(in_shape[axis], out_shape[axis], scales[axis], antialiasing)
        out = _resize_along(out, axis, weights, indices)
    return out.copy() if out is img else np.ascontiguousarray(out)
