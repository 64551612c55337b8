"""PSNR and SSIM as the SR papers compute them; the only implementation in edgesr.

Protocol (EDSR-PyTorch `calc_psnr`, BasicSR `calculate_psnr/ssim`, MATLAB `rgb2ycbcr`):
- both images are uint8: the SR output is quantized to 8 bit *before* measuring (`images.quantize_uint8`);
- `crop_border` pixels are removed on every side (the convention is crop_border = scale);
- with `y_channel`, measure on BT.601 luma Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255;
- PSNR = 10 log10(255^2 / MSE) in float64; identical images give +inf;
- SSIM uses an 11x11 Gaussian window (sigma 1.5), C1 = (0.01*255)^2, C2 = (0.03*255)^2, 'valid' filtering.
"""

from __future__ import annotations

import math

import numpy as np

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 RGB (HxWx3) -> float64 BT.601 luma in [16, 235]."""
    return img.astype(np.float64) @ _Y_WEIGHTS + 16.0


# Images are measured in strips of about this many pixels, so a 24-megapixel photo costs a few strips' float64
# planes, not a dozen whole-image ones; an image up to this size is one strip (and bit-identical to whole-image).
STRIP_PIXELS = 1 << 22


def _cropped(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    if sr.dtype != np.uint8 or hr.dtype != np.uint8:
        raise TypeError(f"metrics take uint8 images (quantize SR first); got {sr.dtype} and {hr.dtype}")
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: {sr.shape} vs {hr.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        sr = sr[crop_border:-crop_border, crop_border:-crop_border]
        hr = hr[crop_border:-crop_border, crop_border:-crop_border]
    if sr.size == 0:
        raise ValueError("nothing left to measure after cropping the border")
    return sr, hr


def _as_float(img: np.ndarray, y_channel: bool) -> np.ndarray:
    return rgb_to_y(img) if y_channel else img.astype(np.float64)


def _row_strips(height: int, width: int, halo: int) -> list[tuple[int, int]]:
    """[start, stop) input rows of each strip; consecutive strips share `halo` rows, so a 'valid' filter of
    `halo` + 1 taps sees every window exactly once."""
    rows = max(halo + 1, STRIP_PIXELS // max(width, 1))
    strips, start = [], 0
    while True:
        stop = min(height, start + rows)
        strips.append((start, stop))
        if stop == height:
            return strips
        start = stop - halo


def psnr(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """Peak signal-to-noise ratio in dB (peak 255)."""
    sr, hr = _cropped(sr, hr, crop_border)
    total, count = 0.0, 0
    for start, stop in _row_strips(sr.shape[0], sr.shape[1], 0):
        d = _as_float(sr[start:stop], y_channel) - _as_float(hr[start:stop], y_channel)
        total += float(np.sum(d * d))
        count += d.size
    mse = total / count
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of a 2-D float64 array with the 1-D kernel g (rows, then columns)."""
    k = len(g)
    h, w = img.shape
    rows = sum(g[i] * img[i : h - k + 1 + i, :] for i in range(k))
    return sum(g[j] * rows[:, j : w - k + 1 + j] for j in range(k))


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return num / den


def ssim(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """Structural similarity; on RGB it is the mean over the three channels."""
    sr, hr = _cropped(sr, hr, crop_border)
    window = len(_gaussian_window())
    if min(sr.shape[:2]) < window:
        raise ValueError(f"image too small for SSIM's 11x11 window: {sr.shape[:2]}")
    channels = 1 if y_channel else sr.shape[2]
    totals, count = np.zeros(channels), 0
    for start, stop in _row_strips(sr.shape[0], sr.shape[1], window - 1):
        a, b = _as_float(sr[start:stop], y_channel), _as_float(hr[start:stop], y_channel)
        planes = [(a, b)] if y_channel else [(a[..., c], b[..., c]) for c in range(channels)]
        for c, (pa, pb) in enumerate(planes):
            m = _ssim_map(pa, pb)
            totals[c] += float(np.sum(m))
        count += m.size
    return float(np.mean(totals / count))


def sr_scores(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    """The figures every stage reports for one image: Y-PSNR and Y-SSIM with border = scale."""
    return {"psnr_y_db": psnr(sr, hr, scale), "ssim_y": ssim(sr, hr, scale)}


def mean_scores(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over images (the papers average PSNR in dB, not MSE)."""
    if not per_image:
        raise ValueError("no images to average")
    return {k: float(np.mean([s[k] for s in per_image])) for k in per_image[0]}


def psnr_float(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """PSNR in dB between two float arrays (e.g. a converted model's output and torch's), no quantization.

    For comparing runtimes on the same input, not for SR quality (that is `psnr` on uint8 images).
    Identical arrays give +inf.
    """
    if a.shape != b.shape:
        raise ValueError(f"array shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)
