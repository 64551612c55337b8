"""Bundled photos, the Set5 butterfly crop, user folders and the DIV2K / BasicSR layouts — on real images."""

import numpy as np
import pytest

from edgesr.datasets import builtin_hr_images, load_test_set, load_training_images, lr_degradation, sr_folder_files
from edgesr.errors import BadInput
from edgesr.images import bicubic_downscale, load_rgb, matlab_imresize, modcrop, save_png


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


def _crops() -> dict[str, np.ndarray]:
    """Three real photo crops, 12-aligned (as BasicSR's GTmod12 images are): 96x120, 72x84, 108x96."""
    photos = dict(builtin_hr_images("sporco"))
    return {
        "baby": photos["kodim23"][100:196, 200:320],
        "bird": photos["monarch"][150:222, 300:384],
        "butterfly": photos["tulips"][40:148, 500:596],
    }


def test_bundled_set_and_plain_folder_with_matlab_lr(tmp_path):
    (pair,) = load_test_set("butterfly", 2, degradation="matlab")
    np.testing.assert_array_equal(pair.lr, matlab_imresize(pair.hr, 0.5))
    assert lr_degradation("butterfly", 2) == "pillow-bicubic"
    assert lr_degradation("sporco", 4, degradation="matlab") == "matlab-bicubic"
    for name, img in _crops().items():
        save_png(tmp_path / f"{name}.png", img)
    pairs = load_test_set(tmp_path, 3, degradation="matlab")
    assert [p.name for p in pairs] == ["baby", "bird", "butterfly"]
    for p in pairs:
        np.testing.assert_array_equal(p.lr, bicubic_downscale(p.hr, 3, degradation="matlab"))
    assert not np.array_equal(pairs[0].lr, load_test_set(tmp_path, 3)[0].lr)  # the default is still Pillow's
    assert lr_degradation(tmp_path, 3, "matlab") == "matlab-bicubic"
    assert sr_folder_files(tmp_path, 3) == [(n, tmp_path / f"{n}.png", None) for n in ("baby", "bird", "butterfly")]
    with pytest.raises(BadInput, match="unknown LR degradation 'cv2'"):
        load_test_set(tmp_path, 3, degradation="cv2")


def test_basicsr_layout_uses_its_lr_files(tmp_path):
    root = tmp_path / "Set5"
    for sub in ("GTmod12", "LRbicx2", "LRbicx4"):
        (root / sub).mkdir(parents=True)
    crops = _crops()
    for name, hr in crops.items():
        save_png(root / "GTmod12" / f"{name}.png", hr)
        for s in (2, 4):
            save_png(root / f"LRbicx{s}" / f"{name}.png", matlab_imresize(hr, 1 / s))
    files = sr_folder_files(root, 4)
    assert files == [(n, root / "GTmod12" / f"{n}.png", root / "LRbicx4" / f"{n}.png") for n in sorted(crops)]
    for s in (2, 4):
        pairs = load_test_set(root, s, degradation="pillow")  # shipped files win over the degradation asked for
        assert [p.name for p in pairs] == sorted(crops)
        for p in pairs:
            assert p.hr.shape == crops[p.name].shape and p.lr.shape == (p.hr.shape[0] // s, p.hr.shape[1] // s, 3)
            np.testing.assert_array_equal(p.lr, matlab_imresize(crops[p.name], 1 / s))
        assert (
            lr_degradation(root, s, "pillow") == lr_degradation(root, s, "matlab") == f"shipped LR files (LRbicx{s}/)"
        )
    with pytest.raises(BadInput, match=r"LRbicx3: missing; a BasicSR folder \(GTmod12/\) needs LRbicx3/ for x3"):
        load_test_set(root, 3)
    with pytest.raises(BadInput, match="LRbicx3: missing"):
        lr_degradation(root, 3)
    (root / "LRbicx2" / "bird.png").unlink()
    with pytest.raises(BadInput, match=r"LRbicx2/bird.png: missing LR image for bird.png \(basicsr layout\)"):
        sr_folder_files(root, 2)
    (root / "GTmod12" / "Thumbs.db").write_bytes(b"\0" * 16)
    with pytest.raises(BadInput, match=r"GTmod12/Thumbs.db: not an image file \(suffix '.db'\)"):
        sr_folder_files(root, 4)


def test_div2k_layout_with_matlab_lr_files(tmp_path):
    (tmp_path / "DIV2K_valid_HR").mkdir()
    lr_dir = tmp_path / "DIV2K_valid_LR_bicubic" / "X3"
    lr_dir.mkdir(parents=True)
    crops = {f"08{i:02d}": img for i, img in enumerate(_crops().values(), start=1)}
    for stem, hr in crops.items():
        save_png(tmp_path / "DIV2K_valid_HR" / f"{stem}.png", hr)
        save_png(lr_dir / f"{stem}x3.png", matlab_imresize(modcrop(hr, 3), 1 / 3))
    files = sr_folder_files(tmp_path, 3)
    assert [(n, hr.name, lr.name) for n, hr, lr in files] == [(s, f"{s}.png", f"{s}x3.png") for s in crops]
    pairs = load_test_set(tmp_path, 3)
    assert [p.name for p in pairs] == list(crops)
    for p in pairs:
        np.testing.assert_array_equal(p.lr, bicubic_downscale(p.hr, 3, "matlab"))
    assert lr_degradation(tmp_path, 3) == "shipped LR files (DIV2K_valid_LR_bicubic/X3/)"
    with pytest.raises(BadInput, match=r"has DIV2K_valid_HR/ but no \*LR_bicubic/X2/ for x2"):
        load_test_set(tmp_path, 2)


def test_sr_folder_files_reads_nothing(tmp_path):
    """The trainer resolves a folder up front and loads lazily: a broken image only fails when it is read."""
    save_png(tmp_path / "a.png", _crops()["bird"])
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert [n for n, _, _ in sr_folder_files(tmp_path, 2)] == ["a", "b"]
    with pytest.raises(BadInput, match="b.png: not a readable image"):
        load_test_set(tmp_path, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="empty: no images found"):
        sr_folder_files(tmp_path / "empty", 2)
    with pytest.raises(BadInput, match="scale must be 2, 3 or 4"):
        sr_folder_files(tmp_path, 8)
