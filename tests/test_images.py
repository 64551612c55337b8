"""MATLAB-compatible bicubic `imresize`: hand-worked examples, properties, and agreement with resize-right on photos.

The independent implementation is resize-right (assafshocher/ResizeRight, PyPI `resize-right`, pinned in
constraints.txt): its own formulation of MATLAB's antialiased cubic resampling (a projected grid from "From Discrete
to Continuous Convolutions", a field of view per output pixel, numpy padding), sharing no code with edgesr. With
`pad_mode="symmetric"` its borders are MATLAB's (a b c | c b a). It has no uint8 path of its own, so MATLAB's uint8
behaviour (imresizemex returns its input's class: round and saturate after each dimension) is emulated here with a
textbook half-up rounding between its two passes.

Measured on the five sporco photos (768x512 class), x2/x3/x4, numpy 2.4.6:
- float64 input: max |ours - resize-right| = 0.0 at every scale (bit-identical: same weights, same tap order);
- uint8 input vs resize-right rounded after each pass: 0 pixels differ at every scale;
- uint8 input vs resize-right rounded once at the end (not what MATLAB does): up to 5 levels apart, on 10-15 % of
  pixels, from the intermediate rounding and the clipping of overshoot after the first pass.
The bounds below leave room only for last-bit float differences (1e-9 on a 0..255 scale; a wrong weight, index or
border would show as >= 1e-3) and for ties at exactly .5 that such a difference could flip (1 level on 1e-5 of
pixels; none measured).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgesr.datasets import builtin_hr_images, training_photos
from edgesr.errors import BadInput
from edgesr.images import (
    DEGRADATION_INFO,
    DEGRADATIONS,
    bicubic_downscale,
    degradation_label,
    matlab_contributions,
    matlab_imresize,
    modcrop,
)

resize_right = pytest.importorskip("resize_right", reason="dev dependency resize-right (make setup installs it)")

FLOAT_TOL = 1e-9  # on values in [0, 255]
TIE_FRACTION = 1e-5


def _rr(img: np.ndarray, scale_factors: list[float]) -> np.ndarray:
    return resize_right.resize(img, scale_factors=scale_factors, pad_mode="symmetric")


def _half_up_uint8(x: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(x, 0, 255) + 0.5).astype(np.uint8)


def _reference_uint8(hr: np.ndarray, s: int) -> np.ndarray:
    """MATLAB's uint8 imresize from resize-right: rows, round + saturate, columns, round + saturate."""
    rows = _half_up_uint8(_rr(hr.astype(np.float64), [1 / s, 1]))
    return _half_up_uint8(_rr(rows.astype(np.float64), [1, 1 / s]))


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, np.ndarray]]:
    # the five sporco photos plus one odd-sized scikit-image photo (chelsea, 451x300) for the borders
    return builtin_hr_images("sporco") + [p for p in training_photos() if p[0] == "chelsea"]


@pytest.mark.parametrize("s", [2, 3, 4])
def test_agrees_with_resize_right_on_photos(photos: list, s: int) -> None:
    worst_float, differing, total = 0.0, 0, 0
    for name, hr in photos:
        hr = modcrop(hr, s)
        ours = matlab_imresize(hr.astype(np.float64), 1 / s)
        ref = _rr(hr.astype(np.float64), [1 / s, 1 / s])
        assert ours.shape == ref.shape == (hr.shape[0] // s, hr.shape[1] // s, 3), name
        worst_float = max(worst_float, float(np.abs(ours - ref).max()))
        ours_u8 = matlab_imresize(hr, 1 / s)
        assert ours_u8.dtype == np.uint8
        diff = np.abs(ours_u8.astype(int) - _reference_uint8(hr, s))
        assert diff.max() <= 1, name
        differing, total = differing + int((diff > 0).sum()), total + diff.size
    assert worst_float <= FLOAT_TOL, f"x{s}: float max abs diff {worst_float:.3e}"
    assert differing <= TIE_FRACTION * total, f"x{s}: {differing} of {total} uint8 values differ"


def test_uint8_rounds_after_each_pass_as_matlab_does(photos: list) -> None:
    """Rounding only once at the end is a different (non-MATLAB) image: many pixels move, some by several levels."""
    _, hr = photos[1]  # monarch
    once = _half_up_uint8(matlab_imresize(hr.astype(np.float64), 0.5))
    diff = np.abs(matlab_imresize(hr, 0.5).astype(int) - once)
    assert diff.max() >= 2 and (diff > 0).mean() > 0.05


def test_x2_weights_worked_by_hand() -> None:
    """x2 down: width 8, output 1 at u = 1.5, taps at distances +-0.5 .. +-3.5 weigh 0.5 * cubic(d / 2).

    cubic(0.25) = 1.5/64 - 2.5/16 + 1 = 0.8671875, cubic(0.75) = 0.2265625, cubic(1.25) = -0.0703125,
    cubic(1.75) = -0.0234375; halved they sum to 1, so no renormalisation. The three taps left of pixel 0 mirror
    onto pixels 2, 1, 0 (0-based); the taps at distance 4.5 weigh 0 and are dropped.
    """
    weights, indices = matlab_contributions(4, 2, 0.5)
    half = [-0.01171875, -0.03515625, 0.11328125, 0.43359375]
    np.testing.assert_array_equal(weights, [half + half[::-1]] * 2)
    np.testing.assert_array_equal(indices, [[2, 1, 0, 0, 1, 2, 3, 3], [0, 0, 1, 2, 3, 3, 2, 1]])


def test_small_images_worked_by_hand() -> None:
    """Folding the mirrored taps, x2 down of 4 pixels v is [35 v0 + 25.5 v1 + 6.5 v2 - 3 v3] / 64 and its mirror."""
    m = np.array([[35, 25.5, 6.5, -3], [-3, 6.5, 25.5, 35]]) / 64
    a = np.arange(16, dtype=np.float64).reshape(4, 4) ** 2
    np.testing.assert_allclose(matlab_imresize(a, 0.5), m @ a @ m.T, rtol=0, atol=1e-12)
    # rows [96, 0, 0, 0]: 35/64 * 96 = 52.5 and -3/64 * 96 = -4.5; uint8 rounds half away from zero and saturates
    rows = np.tile(np.array([96, 0, 0, 0], np.uint8), (4, 1))
    np.testing.assert_array_equal(matlab_imresize(rows.astype(np.float64), 0.5), [[52.5, -4.5]] * 2)
    np.testing.assert_array_equal(matlab_imresize(rows, 0.5), [[53, 0]] * 2)
    # rows [255, 255, 255, 0]: 255 * 134/128 = 266.953125 saturates to 255; 255 * 58/128 = 115.546875 -> 116
    rows = np.tile(np.array([255, 255, 255, 0], np.uint8), (4, 1))
    np.testing.assert_array_equal(matlab_imresize(rows, 0.5), [[255, 116]] * 2)


def test_constant_stays_constant_and_sizes() -> None:
    for s in (2, 3, 4):
        flat = np.full((24, 36, 3), 137, np.uint8)
        np.testing.assert_array_equal(matlab_imresize(flat, 1 / s), np.full((24 // s, 36 // s, 3), 137))
        out = matlab_imresize(flat.astype(np.float64), 1 / s)
        np.testing.assert_allclose(out, 137.0, rtol=0, atol=1e-12)
    img = np.random.default_rng(0).random((10, 7))
    assert matlab_imresize(img, 1 / 3).shape == (4, 3)  # ceil, as MATLAB sizes the output
    assert matlab_imresize(img, 2).shape == (20, 14)
    assert matlab_imresize(img, output_shape=(5, 2)).shape == (5, 2)
    assert matlab_imresize(img.astype(np.float32), 0.5).dtype == np.float64


def test_any_scale_and_output_shape_agree_with_resize_right() -> None:
    """Non-integer factors whose output covers the input exactly (out / factor == in).

    Elsewhere resize-right centres the output on the input while MATLAB lines up the top-left pixel edges
    (u = x / scale + 0.5 * (1 - 1 / scale)), so the two are not meant to agree there.
    """
    hr = dict(builtin_hr_images("butterfly"))["butterfly"].astype(np.float64)  # 256x256
    for kwargs, factors in (
        ({"scale": 0.375}, [0.375, 0.375]),  # 8/3 down: 96x96
        ({"scale": 1.5}, [1.5, 1.5]),  # upscaling: no antialiasing, plain cubic
        ({"output_shape": (128, 85)}, [128 / 256, 85 / 256]),  # per-side factors; the smaller goes first
    ):
        ours = matlab_imresize(hr, **kwargs)
        ref = _rr(hr, factors)
        assert ours.shape == ref.shape, kwargs
        assert np.abs(ours - ref).max() <= FLOAT_TOL, kwargs


def test_bicubic_downscale_degradations() -> None:
    assert DEGRADATIONS == ("pillow", "matlab") and set(DEGRADATION_INFO) == set(DEGRADATIONS)
    assert [degradation_label(d) for d in DEGRADATIONS] == ["pillow-bicubic", "matlab-bicubic"]
    hr = modcrop(dict(builtin_hr_images("butterfly"))["butterfly"], 3)
    pillow, matlab = bicubic_downscale(hr, 3), bicubic_downscale(hr, 3, degradation="matlab")
    assert pillow.shape == matlab.shape == (85, 85, 3) and pillow.dtype == matlab.dtype == np.uint8
    np.testing.assert_array_equal(matlab, matlab_imresize(hr, 1 / 3))
    assert not np.array_equal(pillow, matlab)  # the two filters really differ
    with pytest.raises(BadInput, match="unknown LR degradation 'opencv'; choose one of pillow, matlab"):
        bicubic_downscale(hr, 3, degradation="opencv")
    with pytest.raises(ValueError, match="not a multiple of scale 2"):
        bicubic_downscale(hr, 2, degradation="matlab")


def test_bad_arguments() -> None:
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="exactly one of scale and output_shape"):
        matlab_imresize(img)
    with pytest.raises(ValueError, match="scale must be > 0"):
        matlab_imresize(img, 0)
    with pytest.raises(TypeError, match="uint8 or floating-point"):
        matlab_imresize(img.astype(np.int32), 0.5)
    with pytest.raises(ValueError, match="HxW or HxWxC"):
        matlab_imresize(np.zeros((1, 8, 8, 3)), 0.5)
