"""The images edgesr trains and measures on: bundled photos, a user's folder, or the DIV2K/BasicSR layout.

All of it is offline. Bundled sets come from wheels the project installs:
- test set `sporco`: the five photos shipped in sporco's `data/` (kodim23, monarch, sail, tulips, barbara);
- test set `butterfly`: Set5's butterfly, which is exactly monarch[144:400, 271:527] (pixel-exact crop);
- validation set `hopper`: matplotlib's sample photo of Grace Hopper (512x600 JPEG), held out from both
  training and test images, for checkpoint selection while pruning;
- training photos: scikit-image's bundled RGB photos (no pooch, no network).
A folder of HR images gets its LR images by bicubic downscaling (`images.bicubic_downscale`); the DIV2K /
BasicSR layout (an HR folder plus `LR_bicubic/X{scale}/<name>x{scale}.png`) uses the LR files it ships.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesr.errors import BadInput
from edgesr.images import IMAGE_SUFFIXES, bicubic_downscale, load_rgb, modcrop

SPORCO_IMAGES = ("kodim23", "monarch", "sail", "tulips", "barbara")
BUILTIN_TEST_SETS = ("sporco", "butterfly", "sporco+butterfly", "hopper")
# scikit-image photos that ship inside its wheel (the others are fetched from the network on first use).
TRAINING_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "motorcycle_left",
    "immunohistochemistry",
)


@dataclass(frozen=True)
class SRPair:
    """One test image: HR (modcropped to the scale) and its LR, both uint8 HxWx3."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


def _sporco_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("sporco") / "data"))
    except ModuleNotFoundError:
        raise BadInput("test set 'sporco' needs the sporco package (make setup installs it)") from None


def _pair(name: str, hr: np.ndarray, scale: int) -> SRPair:
    hr = modcrop(hr, scale)
    return SRPair(name, hr, bicubic_downscale(hr, scale))


def builtin_hr_images(name: str) -> list[tuple[str, np.ndarray]]:
    """HR images of a bundled test set, by name."""
    if name not in BUILTIN_TEST_SETS:
        raise BadInput(f"unknown test set '{name}'; bundled sets: {', '.join(BUILTIN_TEST_SETS)}, or a folder")
    folder = _sporco_dir() if name != "hopper" else Path()
    images: list[tuple[str, np.ndarray]] = []
    if name in ("sporco", "sporco+butterfly"):
        images += [(n, load_rgb(folder / f"{n}.png")) for n in SPORCO_IMAGES]
    if name in ("butterfly", "sporco+butterfly"):
        images.append(("butterfly", load_rgb(folder / "monarch.png")[144:400, 271:527].copy()))
    if name == "hopper":
        images.append(("grace_hopper", load_rgb(_matplotlib_sample("grace_hopper.jpg"))))
    return images


def _matplotlib_sample(name: str) -> Path:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise BadInput("the 'hopper' set needs matplotlib (make setup installs it)") from None
    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _find_lr_folder(root: Path, scale: int) -> Path | None:
    for cand in sorted(root.glob(f"*LR_bicubic*/X{scale}")) + sorted(root.glob(f"LR_bicubic/X{scale}")):
        if cand.is_dir():
            return cand
    return None


def _div2k_pairs(root: Path, scale: int) -> list[SRPair] | None:
    """DIV2K/BasicSR layout: `*HR/` next to `*LR_bicubic/X{s}/` whose files are `<stem>x{s}.<ext>`."""
    lr_dir = _find_lr_folder(root, scale)
    hr_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.endswith("HR")]
    if lr_dir is None or not hr_dirs:
        return None
    pairs = []
    for hr_path in _image_files(hr_dirs[0]):
        lr_path = lr_dir / f"{hr_path.stem}x{scale}{hr_path.suffix}"
        if not lr_path.is_file():
            raise BadInput(f"{lr_path}: missing LR image for {hr_path.name} (DIV2K layout)")
        hr, lr = modcrop(load_rgb(hr_path), scale), load_rgb(lr_path)
        if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
            raise BadInput(f"{lr_path}: LR size {lr.shape[1]}x{lr.shape[0]} is not 1/{scale} of its HR")
        pairs.append(SRPair(hr_path.stem, hr, lr))
    return pairs


def load_test_set(name_or_folder: str | Path, scale: int) -> list[SRPair]:
    """A bundled set by name, a folder of HR images, or a DIV2K/BasicSR-style folder, as HR/LR pairs."""
    if scale not in (2, 3, 4):
        raise BadInput(f"scale must be 2, 3 or 4, got {scale}")
    if str(name_or_folder) in BUILTIN_TEST_SETS:
        return [_pair(n, img, scale) for n, img in builtin_hr_images(str(name_or_folder))]
    folder = Path(name_or_folder)
    if not folder.is_dir():
        raise BadInput(f"{folder}: not a bundled test set ({', '.join(BUILTIN_TEST_SETS)}) nor a folder")
    div2k = _div2k_pairs(folder, scale)
    if div2k is not None:
        pairs = div2k
    else:
        files = [p for p in _image_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == ""]
        # Any other file is an error rather than silently skipped: the user meant every file to count.
        others = [p for p in _image_files(folder) if p not in files]
        if others:
            raise BadInput(f"{others[0]}: not an image file (suffix {others[0].suffix!r}) in test folder")
        pairs = [_pair(p.stem, load_rgb(p), scale) for p in files]
    if not pairs:
        raise BadInput(f"{folder}: no images found")
    for p in pairs:
        if min(p.lr.shape[:2]) < 12:
            raise BadInput(f"{folder / p.name}: too small for x{scale} ({p.hr.shape[1]}x{p.hr.shape[0]})")
    return pairs


def training_photos() -> list[tuple[str, np.ndarray]]:
    """The RGB photos bundled with scikit-image, as (name, uint8 HxWx3)."""
    try:
        from skimage import data
    except ModuleNotFoundError:
        raise BadInput("the bundled training photos need scikit-image (make setup installs it)") from None
    photos = []
    for name in TRAINING_PHOTOS:
        if name == "motorcycle_left":
            img = data.stereo_motorcycle()[0]
        else:
            img = getattr(data, name)()
        photos.append((name, np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
    return photos


def load_training_images(source: str | Path) -> list[tuple[str, np.ndarray]]:
    """`bundled` for scikit-image's photos, else a folder of HR images (every file must be an image)."""
    if str(source) == "bundled":
        return training_photos()
    folder = Path(source)
    if not folder.is_dir():
        raise BadInput(f"{folder}: training data folder does not exist (or use 'bundled')")
    images = [(p.stem, load_rgb(p)) for p in _image_files(folder)]
    if not images:
        raise BadInput(f"{folder}: no training images found")
    return images
