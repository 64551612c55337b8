"""How every converted file is checked: its output against a reference (torch's, or the dense file's) on the
parity tile, within a tolerance. One comparison for TFLite and Core ML, one record shape in the manifest
(`max_abs_error`, `psnr_db`, `tolerance`), one one-line failure message."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgesr.errors import CheckFailed
from edgesr.metrics import psnr_float

FP32_MAX_ABS_ERROR = 1e-4  # float reassociation costs ~1e-6 on SR outputs in [0, 1]; two orders of margin


@dataclass(frozen=True)
class Tolerance:
    """The worst accepted agreement with the reference (outputs in [0, 1]); None: not limited."""

    max_abs_error: float | None = None
    psnr_db_min: float | None = None


def figures(output: np.ndarray, reference: np.ndarray) -> tuple[float, float | None]:
    """Max abs error and PSNR (peak 1.0; None when identical: JSON has no infinity)."""
    err = float(np.max(np.abs(output.astype(np.float64) - reference.astype(np.float64))))
    psnr = psnr_float(output, reference, peak=1.0)
    return err, (psnr if math.isfinite(psnr) else None)


def check(
    name: str, what: str, output: np.ndarray, reference: np.ndarray, tol: Tolerance, image: str
) -> dict[str, Any]:
    """The manifest's parity record of `output` against torch's `reference`; CheckFailed, one line naming the file,
    `what` was compared, the figure and its limit, when outside `tol` (NaN always is)."""
    if output.shape != reference.shape:
        raise CheckFailed(f"{name}: output shape {output.shape}, torch gives {reference.shape}")
    err, psnr = figures(output, reference)
    too_far = not math.isfinite(err) or (tol.max_abs_error is not None and not err <= tol.max_abs_error)
    too_noisy = tol.psnr_db_min is not None and psnr is not None and not psnr >= tol.psnr_db_min
    if too_far or too_noisy:
        limit_err = "" if tol.max_abs_error is None else f" (limit {tol.max_abs_error:g})"
        limit_psnr = "" if tol.psnr_db_min is None else f" (limit >= {tol.psnr_db_min:g} dB)"
        psnr_text = "inf" if psnr is None else f"{psnr:.1f}"
        raise CheckFailed(
            f"{name}: {what} vs torch: max abs error {err:.3g}{limit_err}, PSNR {psnr_text} dB{limit_psnr} on {image}"
        )
    return {"reference": "torch", "image": image, "max_abs_error": err, "psnr_db": psnr, "tolerance": asdict(tol)}


def bit_identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bits (so -0.0 vs 0.0 or differing NaNs count as different)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_identical(name: str, output: np.ndarray, dense_output: np.ndarray) -> None:
    """A sparse file must compute exactly what its dense twin computes (same runtime, same kernels)."""
    if not bit_identical(output, dense_output):
        diff = float(np.max(np.abs(output.astype(np.float64) - dense_output.astype(np.float64))))
        raise CheckFailed(f"{name}: output is not bit-identical to the dense file's (max diff {diff:.3g})")
