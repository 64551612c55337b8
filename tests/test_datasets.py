"""Bundled photos, the Set5 butterfly crop, user folders and the DIV2K layout — on real images."""

import numpy as np
import pytest

from edgesr.datasets import builtin_hr_images, load_test_set, load_training_images
from edgesr.errors import BadInput
from edgesr.images import bicubic_downscale, load_rgb, save_png


def test_sporco_test_set_is_five_real_photos():
    pairs = load_test_set("sporco", 2)
    assert [p.name for p in pairs] == ["kodim23", "monarch", "sail", "tulips", "barbara"]
    for p in pairs:
        assert p.hr.dtype == np.uint8 and p.hr.shape[0] % 2 == 0 and p.hr.shape[1] % 2 == 0
        assert p.lr.shape == (p.hr.shape[0] // 2, p.hr.shape[1] // 2, 3)
        assert p.hr.std() > 20  # a photo, not a flat or synthetic image


def test_butterfly_is_the_monarch_crop_and_x3_modcrops():
    ((name, img),) = builtin_hr_images("butterfly")
    assert name == "butterfly" and img.shape == (256, 256, 3)
    monarch = dict(builtin_hr_images("sporco"))["monarch"]
    assert np.array_equal(img, monarch[144:400, 271:527])
    (pair,) = load_test_set("butterfly", 3)
    assert pair.hr.shape == (255, 255, 3) and pair.lr.shape == (85, 85, 3)


def test_user_folder_and_non_image_file(tmp_path):
    monarch = dict(builtin_hr_images("sporco"))["monarch"]
    save_png(tmp_path / "a.png", monarch[:96, :128])
    save_png(tmp_path / "b.png", monarch[100:196, 200:328])
    pairs = load_test_set(tmp_path, 4)
    assert [p.name for p in pairs] == ["a", "b"] and pairs[0].lr.shape == (24, 32, 3)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BadInput, match="notes.txt: not an image file"):
        load_test_set(tmp_path, 2)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(BadInput, match="c.png: not a readable image"):
        load_test_set(tmp_path, 2)


def test_div2k_layout_uses_the_shipped_lr_files(tmp_path):
    monarch = dict(builtin_hr_images("sporco"))["monarch"]
    (tmp_path / "DIV2K_valid_HR").mkdir()
    (tmp_path / "DIV2K_valid_LR_bicubic" / "X2").mkdir(parents=True)
    hr = monarch[:64, :96]
    save_png(tmp_path / "DIV2K_valid_HR" / "0801.png", hr)
    lr = bicubic_downscale(hr, 2)
    lr[0, 0] = [1, 2, 3]  # mark it: the loader must read this file, not re-downscale the HR
    save_png(tmp_path / "DIV2K_valid_LR_bicubic" / "X2" / "0801x2.png", lr)
    (pair,) = load_test_set(tmp_path, 2)
    assert pair.name == "0801" and pair.lr[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(BadInput, match="missing LR image"):
        load_test_set(tmp_path, 2) if (tmp_path / "DIV2K_valid_HR" / "0802.png").write_bytes(
            (tmp_path / "DIV2K_valid_HR" / "0801.png").read_bytes()
        ) else None


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(BadInput, match="unknown test set|not a bundled test set"):
        load_test_set("set14", 2)
    with pytest.raises(BadInput, match="scale must be"):
        load_test_set("sporco", 5)
    with pytest.raises(BadInput, match="no such image file"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(BadInput, match="does not exist"):
        load_training_images(tmp_path / "nope")


def test_bundled_training_photos_are_rgb():
    photos = load_training_images("bundled")
    assert len(photos) == 8
    assert all(img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 for _, img in photos)
