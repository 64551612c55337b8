"""Training batches: random aligned LR/HR patches from whole images, with flips and 90-degree rotations.

LR images are made once per image with the project's bicubic (`edgesr.images.bicubic_downscale`), then
patches are cut at matching positions, as EDSR-PyTorch does. Sampling uses its own torch.Generator so a
resumed run continues the same stream.
"""

from __future__ import annotations

import numpy as np
import torch

from edgesr.errors import BadInput
from edgesr.images import bicubic_downscale, modcrop


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)


class PatchSampler:
    def __init__(self, images: list[np.ndarray], scale: int, lr_patch: int, batch_size: int, seed: int) -> None:
        self.scale, self.lr_patch, self.batch_size = scale, lr_patch, batch_size
        self.hr, self.lr = [], []
        for img in images:
            hr = modcrop(img, scale)
            if min(hr.shape[:2]) < lr_patch * scale:
                continue
            self.hr.append(_chw(hr))
            self.lr.append(_chw(bicubic_downscale(hr, scale)))
        if not self.hr:
            raise BadInput(f"no training image is at least {lr_patch * scale}px on its short side")
        areas = torch.tensor([float(t.shape[1] * t.shape[2]) for t in self.lr])
        self.weights = areas / areas.sum()
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr, hr): (B, 3, p, p) and (B, 3, sp, sp), float in [0, 1]."""
        p, s, g = self.lr_patch, self.scale, self.gen
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        lrs, hrs = [], []
        for i in idx.tolist():
            lr_img, hr_img = self.lr[i], self.hr[i]
            y = int(torch.randint(0, lr_img.shape[1] - p + 1, (1,), generator=g))
            x = int(torch.randint(0, lr_img.shape[2] - p + 1, (1,), generator=g))
            lr = lr_img[:, y : y + p, x : x + p]
            hr = hr_img[:, y * s : (y + p) * s, x * s : (x + p) * s]
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
