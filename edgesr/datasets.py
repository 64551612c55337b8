"""The images edgesr trains and measures on: bundled photos, a user's folder, or the DIV2K/BasicSR layout.

All of it is offline. Bundled sets come from wheels the project installs:
- test set `sporco`: the five photos shipped in sporco's `data/` (kodim23, monarch, sail, tulips, barbara);
- test set `butterfly`: Set5's butterfly, which is exactly monarch[144:400, 271:527] (pixel-exact crop);
- validation set `hopper`: matplotlib's sample photo of Grace Hopper (512x600 JPEG), held out from both
  training and test images, for checkpoint selection while pruning;
- training photos: scikit-image's bundled RGB photos (no pooch, no network).
Bundled sets and a folder of HR images get their LR images from `images.bicubic_downscale` with the chosen
degradation (`pillow`, the default, or `matlab`, the papers' MATLAB imresize). Two folder layouts ship their own LR
files, and those are used as they are, whatever the degradation asked for:
- DIV2K: `<root>/*HR/<stem>.png` + `<root>/*LR_bicubic/X{s}/<stem>x{s}.png`;
- BasicSR benchmark sets (Set5, Set14, B100, Urban100, Manga109 as BasicSR distributes them):
  `<root>/GTmod12/<name>.png` + `<root>/LRbicx{s}/<name>.png`, the HR images already modcropped to 12.
`lr_degradation` says which LR a set gets (for manifests and reports); `sr_folder_files` resolves a folder into
file pairs without reading them (the trainer loads lazily).
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesr.errors import BadInput
from edgesr.images import (
    IMAGE_SUFFIXES,
    bicubic_downscale,
    check_degradation,
    degradation_label,
    load_rgb,
    modcrop,
)

SPORCO_IMAGES = ("kodim23", "monarch", "sail", "tulips", "barbara")
BUILTIN_TEST_SETS = ("sporco", "butterfly", "sporco+butterfly", "hopper")
SCALES = (2, 3, 4)
BASICSR_HR = "GTmod12"  # BasicSR benchmark folders: GTmod12/ and LRbicx{s}/, the same file names
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


def _pair(name: str, hr: np.ndarray, scale: int, degradation: str) -> SRPair:
    hr = modcrop(hr, scale)
    return SRPair(name, hr, bicubic_downscale(hr, scale, degradation))


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
    """The files of `folder`, sorted; hidden names and sub-folders are skipped, anything else that is not a
    regular file (a FIFO, a device, a dangling or looping link) is an error rather than silently dropped."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if not p.is_file():
            raise BadInput(f"{p}: not a regular file (a FIFO, device or broken link?); remove it from {folder}")
        files.append(p)
    return files


def _find_lr_folder(root: Path, scale: int) -> Path | None:
    for cand in sorted(root.glob(f"*LR_bicubic*/X{scale}")) + sorted(root.glob(f"LR_bicubic/X{scale}")):
        if cand.is_dir():
            return cand
    return None


def _layout(folder: Path, scale: int) -> tuple[str, Path, Path | None]:
    """(layout, HR folder, shipped LR folder or None) of a test or training folder: 'basicsr', 'div2k' or 'plain'."""
    if not folder.is_dir():
        raise BadInput(f"{folder}: not a bundled test set ({', '.join(BUILTIN_TEST_SETS)}) nor a folder")
    if (folder / BASICSR_HR).is_dir():
        lr_dir = folder / f"LRbicx{scale}"
        if not lr_dir.is_dir():
            raise BadInput(f"{lr_dir}: missing; a BasicSR folder ({BASICSR_HR}/) needs LRbicx{scale}/ for x{scale}")
        return "basicsr", folder / BASICSR_HR, lr_dir
    hr_dirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and d.name.endswith("HR")]
    if hr_dirs:
        lr_dir = _find_lr_folder(folder, scale)
        if lr_dir is None:
            raise BadInput(
                f"{folder}: has {hr_dirs[0].name}/ but no *LR_bicubic/X{scale}/ for x{scale} "
                f"(DIV2K layout; give {hr_dirs[0]} itself to downscale its HR images)"
            )
        return "div2k", hr_dirs[0], lr_dir
    return "plain", folder, None


def _check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise BadInput(f"scale must be 2, 3 or 4, got {scale}")


def sr_folder_files(folder: str | Path, scale: int) -> list[tuple[str, Path, Path | None]]:
    """A folder's images as (name, HR path, shipped LR path or None), sorted by file name; nothing is read.

    Plain HR folders give None for the LR (make it with `bicubic_downscale`); the DIV2K layout pairs
    `*HR/0801.png` with `*LR_bicubic/X2/0801x2.png`, the BasicSR layout `GTmod12/baby.png` with `LRbicx2/baby.png`.
    Every file in the HR folder must be an image (by suffix) with its LR partner; hidden files are skipped.
    """
    _check_scale(scale)
    folder = Path(folder)
    layout, hr_dir, lr_dir = _layout(folder, scale)
    files: list[tuple[str, Path, Path | None]] = []
    for hr_path in _image_files(hr_dir):
        # Any other file is an error rather than silently skipped: the user meant every file to count.
        if hr_path.suffix.lower() not in IMAGE_SUFFIXES and hr_path.suffix != "":
            raise BadInput(f"{hr_path}: not an image file (suffix {hr_path.suffix!r}); every HR file must be an image")
        lr_path = None
        if lr_dir is not None:
            lr_name = f"{hr_path.stem}x{scale}{hr_path.suffix}" if layout == "div2k" else hr_path.name
            lr_path = lr_dir / lr_name
            if not lr_path.is_file():
                raise BadInput(f"{lr_path}: missing LR image for {hr_path.name} ({layout} layout)")
        files.append((hr_path.stem, hr_path, lr_path))
    if not files:
        raise BadInput(f"{hr_dir}: no images found")
    return files


def lr_degradation(name_or_folder: str | Path, scale: int, degradation: str = "pillow") -> str:
    """What the LR images of `load_test_set(name_or_folder, scale, degradation)` are, for manifests and reports.

    'pillow-bicubic' or 'matlab-bicubic' where edgesr downscales the HR images itself (bundled sets, plain
    folders); 'shipped LR files (LRbicx2/)' or 'shipped LR files (DIV2K_valid_LR_bicubic/X2/)' (the LR folder
    relative to the set's root) where the set brings its own, which are used whatever `degradation` says.
    """
    _check_scale(scale)
    label = degradation_label(degradation)
    if str(name_or_folder) in BUILTIN_TEST_SETS:
        return label
    folder = Path(name_or_folder)
    _, _, lr_dir = _layout(folder, scale)
    return label if lr_dir is None else f"shipped LR files ({lr_dir.relative_to(folder).as_posix()}/)"


def load_test_set(name_or_folder: str | Path, scale: int, degradation: str = "pillow") -> list[SRPair]:
    """A bundled set by name, a folder of HR images, or a DIV2K / BasicSR folder, as HR/LR pairs.

    `degradation` (see `images.DEGRADATIONS`) makes the LR of bundled sets and plain folders; DIV2K and BasicSR
    folders use the LR files they ship. `lr_degradation` says which of the two a set got.
    """
    _check_scale(scale)
    check_degradation(degradation)
    if str(name_or_folder) in BUILTIN_TEST_SETS:
        return [_pair(n, img, scale, degradation) for n, img in builtin_hr_images(str(name_or_folder))]
    folder = Path(name_or_folder)
    pairs = []
    for name, hr_path, lr_path in sr_folder_files(folder, scale):
        if lr_path is None:
            pair = _pair(name, load_rgb(hr_path), scale, degradation)
        else:
            hr, lr = modcrop(load_rgb(hr_path), scale), load_rgb(lr_path)
            if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
                raise BadInput(f"{lr_path}: LR size {lr.shape[1]}x{lr.shape[0]} is not 1/{scale} of its HR")
            pair = SRPair(name, hr, lr)
        if min(pair.lr.shape[:2]) < 12:
            h, w = pair.lr.shape[:2]
            raise BadInput(f"{hr_path}: too small a test image for x{scale} (LR {w}x{h}; at least 12 px a side)")
        pairs.append(pair)
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
