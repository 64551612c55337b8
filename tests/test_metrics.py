"""PSNR/SSIM against values worked out by hand, and the protocol's edge cases."""

import math

import numpy as np
import pytest

from edgesr import metrics
from edgesr.images import quantize_uint8
from edgesr.metrics import mean_scores, psnr, rgb_to_y, ssim


def test_y_channel_matches_bt601_by_hand():
    # white -> 16 + 219 = 235, black -> 16, pure red -> 16 + 65.481 = 81.481
    px = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], dtype=np.uint8)
    assert np.allclose(rgb_to_y(px), [[235.0, 16.0, 81.481]])


def test_psnr_hand_computed_value():
    # Every pixel +10 on R, G and B: Y differs by 10 * 219/255 = 8.588235; MSE = 73.757785;
    # PSNR = 10 log10(255^2 / 73.757785) = 29.452725 dB.
    hr = np.full((12, 12, 3), 100, dtype=np.uint8)
    sr = hr + np.uint8(10)
    assert psnr(sr, hr, crop_border=2) == pytest.approx(29.452725, abs=1e-6)


def test_psnr_rgb_and_border_crop():
    hr = np.zeros((10, 10, 3), dtype=np.uint8)
    sr = hr.copy()
    sr[0, :, :] = 255  # only the first row is wrong: cropping 1 px removes the error
    assert psnr(sr, hr, crop_border=1, y_channel=False) == math.inf
    # Without the crop, MSE over RGB = 255^2 * (10*3) / (10*10*3) = 6502.5 -> 10 log10(10) = 10 dB.
    assert psnr(sr, hr, crop_border=0, y_channel=False) == pytest.approx(10.0)


def test_identical_images_give_inf_and_ssim_one():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert psnr(img, img, 2) == math.inf
    assert ssim(img, img, 2) == pytest.approx(1.0)


def test_ssim_constant_images_hand_computed():
    # Grey 100 vs grey 110: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with
    # a = 16 + 100*219/255, b = 16 + 110*219/255, C1 = (0.01*255)^2 -> 0.996734975.
    a = np.full((20, 20, 3), 100, dtype=np.uint8)
    b = np.full((20, 20, 3), 110, dtype=np.uint8)
    assert ssim(b, a, 2) == pytest.approx(0.9967349751, abs=1e-9)


def test_metrics_refuse_unquantized_and_mismatched_inputs():
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="quantize"):
        psnr(img.astype(np.float32), img, 2)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(img, img[:8], 2)


def test_quantize_rounds_to_nearest_and_clips():
    out = quantize_uint8(np.array([-0.1, 0.0, 0.5 / 255, 0.49 / 255, 1.0, 1.3]))
    assert out.tolist() == [0, 0, 0, 0, 255, 255]  # 0.5 rounds half to even, as np.rint does
    assert quantize_uint8(np.array([1.51 / 255]))[0] == 2


def test_mean_scores_averages_db():
    assert mean_scores([{"psnr_y_db": 30.0}, {"psnr_y_db": 40.0}]) == {"psnr_y_db": 35.0}


def test_large_images_are_measured_in_strips_with_the_whole_image_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    hr = rng.integers(0, 256, (157, 203, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(np.int16) + rng.integers(-12, 13, hr.shape), 0, 255).astype(np.uint8)
    whole = [psnr(sr, hr, 2), ssim(sr, hr, 2), psnr(sr, hr, 3, y_channel=False), ssim(sr, hr, 3, y_channel=False)]
    monkeypatch.setattr(metrics, "STRIP_PIXELS", 3000)  # 14 rows of 203 pixels per strip: a dozen strips
    assert len(metrics._row_strips(153, 199, 10)) > 10
    strips = [psnr(sr, hr, 2), ssim(sr, hr, 2), psnr(sr, hr, 3, y_channel=False), ssim(sr, hr, 3, y_channel=False)]
    assert strips == pytest.approx(whole, rel=1e-12)
