"""Load idealo ISR RDN weights from a Keras .h5 into edgesr's `RDN`, with h5py alone (no TensorFlow).

Why: ISR's pretrained "psnr-small" x2 (`compress.pretrained` fetches it) is the one real pretrained photo-SR
model available, and edgesr prunes PyTorch networks. The h5 is read as plain tensors: the architecture (C, D,
G, G0, scale, upscaling) is inferred from the layer names and kernel shapes and cross-checked against the
file's `model_config`, every tensor is mapped by name onto an `RDN` module and shape-checked, and the load
fails unless every h5 tensor is used and every model tensor filled. Anything else is a one-line `BadInput`.

Names (ISR -> RDN): F_m1 -> f_m1, F_0 -> f_0, F_{d}_{c} -> rdbs.{d-1}.convs.{c-1}, LFF_{d} -> rdbs.{d-1}.lff,
GFF_1/GFF_2 -> gff.0/gff.1, UPN1/UPN2/UPN3 -> upn.0/upn.2/upn.4, SR -> sr. Keras kernels are HWIO; PyTorch
wants OIHW, hence the transpose (3, 2, 0, 1). The model takes RGB in [0, 1] and gives RGB in [0, 1] (clip),
as ISR's psnr-small does (research/data.md B: feeding [0, 255] measures 1-2 dB worse).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import h5py
import numpy as np
import torch

from compress.models.rdn import RDN, RDNConfig
from edgesr.errors import BadInput
from edgesr.manifest import sha256

MAX_TENSOR_BYTES = 1 << 30  # refuse files whose datasets add up to more (checked before reading any)
FIXED_NAMES = {
    "F_m1": "f_m1",
    "F_0": "f_0",
    "GFF_1": "gff.0",
    "GFF_2": "gff.1",
    "UPN1": "upn.0",
    "UPN2": "upn.2",
    "UPN3": "upn.4",
    "SR": "sr",
}
WEIGHT_KINDS = {"kernel": "weight", "bias": "bias"}


def torch_module_name(layer: str) -> str | None:
    """The RDN module an ISR layer's weights belong to, or None for a name ISR's RDN does not have."""
    if layer in FIXED_NAMES:
        return FIXED_NAMES[layer]
    if m := re.fullmatch(r"F_([1-9]\d*)_([1-9]\d*)", layer):
        return f"rdbs.{int(m[1]) - 1}.convs.{int(m[2]) - 1}"
    if m := re.fullmatch(r"LFF_([1-9]\d*)", layer):
        return f"rdbs.{int(m[1]) - 1}.lff"
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _H5:
    """The weight tensors of a Keras h5 (`model.save` or `save_weights` layout), as datasets not yet read."""

    def __init__(self, f: h5py.File, fail: Callable[[str], NoReturn]) -> None:
        self.fail = fail
        total = 0

        def add(_name: str, obj: Any) -> None:
            nonlocal total
            if isinstance(obj, h5py.Dataset):
                total += obj.size * obj.dtype.itemsize

        f.visititems(add)
        if total > MAX_TENSOR_BYTES:
            fail(f"datasets total {total / 2**30:.1f} GiB, over the {MAX_TENSOR_BYTES / 2**30:.0f} GiB limit")
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            fail("not a Keras weights file (no layer_names attribute)")
        # layer -> {"kernel"|"bias": dataset}, for the layers that have weights.
        self.layers: dict[str, dict[str, h5py.Dataset]] = {}
        for layer in map(_text, group.attrs["layer_names"]):
            if layer not in group:
                fail(f"layer {layer} is listed but has no group")
            names = [_text(n) for n in group[layer].attrs.get("weight_names", [])]
            tensors = {}
            for wname in names:
                kind = wname.rsplit("/", 1)[-1].split(":")[0]
                if kind not in WEIGHT_KINDS or kind in tensors:
                    fail(f"layer {layer} has an unexpected weight {wname}")
                tensors[kind] = self._dataset(group[layer], wname)
            if tensors:
                self.layers[layer] = tensors
        raw = f.attrs.get("model_config")
        self.config = json.loads(_text(raw)) if raw is not None else None
        self.keras_version = _text(f.attrs.get("keras_version", "unknown"))

    def _dataset(self, group: h5py.Group, name: str) -> h5py.Dataset:
        # Only plain datasets stored in this file: no soft/external links, virtual or external storage.
        link = group.get(name, getlink=True)
        ds = group.get(name)
        if not isinstance(link, h5py.HardLink) or not isinstance(ds, h5py.Dataset):
            self.fail(f"weight {group.name}/{name} is not a dataset stored in the file")
        if ds.is_virtual or ds.external:
            self.fail(f"weight {ds.name} refers to data outside the file")
        if ds.dtype.kind != "f":
            self.fail(f"weight {ds.name} is {ds.dtype}, not floating point")
        return ds

    def shape(self, layer: str, kind: str = "kernel") -> tuple[int, ...]:
        if layer not in self.layers or kind not in self.layers[layer]:
            self.fail(f"not an idealo ISR RDN file (no {kind} for layer {layer})")
        return tuple(self.layers[layer][kind].shape)


def _count(layers: dict, pattern: str) -> int:
    """n for layers named pattern % 1 .. pattern % n, requiring no gaps."""
    n = 0
    while pattern % (n + 1) in layers:
        n += 1
    return n


def _infer_config(h5: _H5) -> RDNConfig:
    fail = h5.fail
    kernels = {}
    for layer in ("F_m1", "F_0", "F_1_1", "UPN1", "UPN2", "UPN3", "SR"):
        shape = h5.shape(layer)
        if len(shape) != 4:
            fail(f"layer {layer} kernel has shape {shape}, not 4-D HWIO")
        kernels[layer] = shape
    n_colors, g0 = kernels["F_m1"][2:]
    g = kernels["F_1_1"][3]
    d, c = _count(h5.layers, "LFF_%d"), _count(h5.layers, "F_1_%d")
    if d == 0 or c == 0:
        fail("not an idealo ISR RDN file (no residual dense blocks LFF_1 / F_1_1)")
    s = math.isqrt(kernels["UPN3"][3] // n_colors)
    if s not in (2, 3, 4) or kernels["UPN3"][3] != n_colors * s * s:
        fail(f"UPN3 has {kernels['UPN3'][3]} outputs, not {n_colors} * scale^2 for a scale of 2, 3 or 4")
    sr_in = kernels["SR"][2]
    upscaling = {n_colors * s * s: "nearest", n_colors: "shuffle"}.get(sr_in)
    if upscaling is None:
        fail(f"SR reads {sr_in} channels, neither {n_colors * s * s} (nearest) nor {n_colors} (pixel shuffle)")
    if h5.config is not None:
        _check_model_config(h5, s, upscaling)
    try:
        return RDNConfig(
            C=c,
            D=d,
            G=g,
            G0=g0,
            scale=s,
            n_colors=n_colors,
            upscaling=upscaling,
            upn_channels=(kernels["UPN1"][3], kernels["UPN2"][3]),
        )
    except ValueError as exc:
        fail(str(exc))


def _check_model_config(h5: _H5, scale: int, upscaling: str) -> None:
    """The topology the file records agrees with the one the weights imply: plain same-padded convs, the upsampler."""
    try:
        layers = {layer["config"]["name"]: layer for layer in h5.config["config"]["layers"]}
    except (KeyError, TypeError):
        h5.fail("model_config is not a Keras functional model")
    for name, layer in layers.items():
        cfg = layer["config"]
        if layer["class_name"] == "Conv2D" and (
            # A 1x1 conv (ISR's LFF / GFF_1) is the same with "valid" padding.
            (cfg.get("padding") != "same" and tuple(cfg.get("kernel_size", ())) != (1, 1))
            or tuple(cfg.get("strides", (1, 1))) != (1, 1)
            or tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1)
            or cfg.get("activation", "linear") != "linear"
        ):
            h5.fail(f"conv {name} is not a plain stride-1 same-padded linear conv, as ISR's RDN has")
    ups = [layer for layer in layers.values() if layer["class_name"] == "UpSampling2D"]
    if upscaling == "nearest":
        size = [tuple(u["config"].get("size", ())) for u in ups]
        modes = [u["config"].get("interpolation", "nearest") for u in ups]
        if size != [(scale, scale)] or modes != ["nearest"]:
            h5.fail(f"model_config has no single nearest UpSampling2D of size {scale} that the SR conv implies")
    elif ups:
        h5.fail("model_config upsamples with UpSampling2D but the SR conv implies pixel shuffle")


def load_isr_rdn(path: str | Path) -> tuple[RDN, dict[str, Any]]:
    """An idealo ISR RDN Keras .h5 -> (RDN with its weights, info for manifests). Takes/gives RGB in [0, 1]."""
    path = Path(path)

    def fail(msg: str) -> NoReturn:
        raise BadInput(f"{path}: {msg}")

    if not path.is_file():
        fail("no such file")
    try:
        with h5py.File(path, "r") as f:
            h5 = _H5(f, fail)
            cfg = _infer_config(h5)
            model = RDN(cfg)
            state = model.state_dict()
            filled: dict[str, torch.Tensor] = {}
            for layer, tensors in h5.layers.items():
                module = torch_module_name(layer)
                if module is None:
                    fail(f"layer {layer} has weights but is not part of ISR's RDN")
                for kind, ds in tensors.items():
                    key = f"{module}.{WEIGHT_KINDS[kind]}"
                    value = np.asarray(ds[()], dtype=np.float32)
                    if kind == "kernel":
                        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
                    if key not in state or tuple(state[key].shape) != value.shape:
                        want = tuple(state[key].shape) if key in state else "no such tensor"
                        fail(f"{layer}/{kind} has shape {value.shape} as {key}, RDN({cfg}) wants {want}")
                    filled[key] = torch.from_numpy(np.ascontiguousarray(value))
            n_tensors = len(filled)
    except BadInput:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:  # h5py's errors for broken / non-HDF5 files
        fail(f"not a readable Keras .h5 file ({' '.join(str(exc).split())})")
    missing = [key for key in state if key not in filled]
    if missing:
        fail(f"no weights for {len(missing)} RDN tensors, first {missing[0]}")
    model.load_state_dict(filled, strict=True)
    model.eval()
    info = {
        "source": str(path.resolve()),
        "sha256": sha256(path),
        "format": "keras-h5 (idealo ISR RDN)",
        "keras_version": h5.keras_version,
        "layout": "Keras HWIO kernels transposed to PyTorch OIHW; input NCHW RGB in [0, 1], output RGB in [0, 1]",
        "arch": {
            "C": cfg.C,
            "D": cfg.D,
            "G": cfg.G,
            "G0": cfg.G0,
            "scale": cfg.scale,
            "upscaling": cfg.upscaling,
            "upn_channels": list(cfg.upn_channels),
        },
        "tensors": n_tensors,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, info
