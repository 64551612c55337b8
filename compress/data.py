"""Training batches: random aligned LR/HR patches from whole images, with flips and 90-degree rotations.

Images come from `TrainingSet`: the bundled photos (in memory), or a folder of the user's HR images in any layout
`edgesr.datasets.sr_folder_files` knows (plain HR folder, DIV2K, BasicSR). A folder is read lazily: only image
headers are read up front (sizes, so a bad file fails before training starts), pixels are decoded when a patch
needs them and kept as uint8 in a cache bounded by `cache_bytes`, so a DIV2K-sized folder does not have to fit in
memory. LR images are the ones the layout ships, else made from the HR image with the chosen degradation
(`edgesr.images.bicubic_downscale`). Patches are cut at matching positions, as EDSR-PyTorch does. Sampling uses
its own torch.Generator, so a resumed run continues the same stream.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from edgesr.datasets import sr_folder_files, training_photos
from edgesr.errors import BadInput
from edgesr.images import bicubic_downscale, check_image_size, load_rgb, modcrop

DEFAULT_CACHE_BYTES = 1 << 30  # decoded images a folder-backed training set keeps in memory


@dataclass
class _Entry:
    name: str
    hr_size: tuple[int, int]  # (width, height) after modcrop
    hr_path: Path | None = None
    lr_path: Path | None = None
    hr: np.ndarray | None = None  # in-memory images (bundled photos)


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            check_image_size(path, img.size)
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInput(f"{path}: not a readable image ({exc.__class__.__name__})") from None


class TrainingSet:
    """HR images (and their LR partners) to cut patches from."""

    def __init__(
        self, entries: list[_Entry], scale: int, degradation: str = "pillow", cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.entries, self.scale, self.degradation, self.cache_bytes = entries, scale, degradation, cache_bytes
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0

    @classmethod
    def from_arrays(cls, images: list[np.ndarray], scale: int, degradation: str = "pillow") -> TrainingSet:
        entries = []
        for i, img in enumerate(images):
            hr = modcrop(img, scale)
            entries.append(_Entry(f"image{i}", (hr.shape[1], hr.shape[0]), hr=hr))
        return cls(entries, scale, degradation)

    @classmethod
    def from_source(
        cls, source: str | Path, scale: int, degradation: str = "pillow", cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> TrainingSet:
        """`bundled` (scikit-image's photos) or a folder of HR images (plain, DIV2K or BasicSR layout)."""
        if str(source) == "bundled":
            return cls.from_arrays([img for _, img in training_photos()], scale, degradation)
        folder = Path(source)
        if not folder.is_dir():
            raise BadInput(f"{folder}: training data folder does not exist (or use 'bundled')")
        entries = []
        for name, hr_path, lr_path in sr_folder_files(folder, scale):
            w, h = _header_size(hr_path)
            w, h = w - w % scale, h - h % scale
            if lr_path is not None and _header_size(lr_path) != (w // scale, h // scale):
                lw, lh = _header_size(lr_path)
                raise BadInput(f"{lr_path}: LR size {lw}x{lh} is not 1/{scale} of its HR image {hr_path.name}")
            entries.append(_Entry(name, (w, h), hr_path=hr_path, lr_path=lr_path))
        if not entries:
            raise BadInput(f"{folder}: no training images found")
        return cls(entries, scale, degradation, cache_bytes)

    def __len__(self) -> int:
        return len(self.entries)

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(HR, LR) of image i as uint8 CHW tensors, decoded on first use and cached within the byte budget."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        e = self.entries[i]
        hr = e.hr if e.hr is not None else modcrop(load_rgb(e.hr_path), self.scale)
        lr = load_rgb(e.lr_path) if e.lr_path is not None else bicubic_downscale(hr, self.scale, self.degradation)
        pair = (_chw(hr), _chw(lr))
        size = pair[0].numel() + pair[1].numel()
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, (a, b) = self._cache.popitem(last=False)
            self._cached_bytes -= a.numel() + b.numel()
        self._cache[i] = pair
        self._cached_bytes += size
        return pair


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


class PatchSampler:
    def __init__(
        self,
        images: TrainingSet | list[np.ndarray],
        scale: int,
        lr_patch: int,
        batch_size: int,
        seed: int,
        degradation: str = "pillow",
    ) -> None:
        self.scale, self.lr_patch, self.batch_size = scale, lr_patch, batch_size
        if not isinstance(images, TrainingSet):
            images = TrainingSet.from_arrays(images, scale, degradation)
        self.images = images
        self.usable = [i for i, e in enumerate(images.entries) if min(e.hr_size) >= lr_patch * scale]
        if not self.usable:
            raise BadInput(
                f"--patch {lr_patch}: no training image is at least {lr_patch * scale}px (x{scale}) on its short side"
            )
        areas = torch.tensor(
            [
                float((images.entries[i].hr_size[0] // scale) * (images.entries[i].hr_size[1] // scale))
                for i in self.usable
            ]
        )
        self.weights = areas / areas.sum()
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr, hr): (B, 3, p, p) and (B, 3, sp, sp), float in [0, 1]."""
        p, s, g = self.lr_patch, self.scale, self.gen
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        lrs, hrs = [], []
        for i in idx.tolist():
            hr_img, lr_img = self.images.pair(self.usable[i])
            y = int(torch.randint(0, lr_img.shape[1] - p + 1, (1,), generator=g))
            x = int(torch.randint(0, lr_img.shape[2] - p + 1, (1,), generator=g))
            lr = lr_img[:, y : y + p, x : x + p].float().div_(255.0)
            hr = hr_img[:, y * s : (y + p) * s, x * s : (x + p) * s].float().div_(255.0)
            flip, rot = torch.randint(0, 2, (1,), generator=g).item(), torch.randint(0, 4, (1,), generator=g).item()
            if flip:
                lr, hr = lr.flip(-1), hr.flip(-1)
            lrs.append(torch.rot90(lr, rot, (1, 2)))
            hrs.append(torch.rot90(hr, rot, (1, 2)))
        return torch.stack(lrs), torch.stack(hrs)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
