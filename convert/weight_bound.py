"""The reference size every sparse encoding is measured against, for TFLite and Core ML alike.

The bound is what an ideal bitmap encoding would take: the non-zero values at the width the file stores them,
plus 1 bit per weight saying where they are. Index-based formats (TFLite's CSR: at least one index byte per
non-zero) cannot reach it at low sparsity; bitmap formats (Core ML's constexpr_sparse_to_dense) come within a
few bytes of tensor headers.
"""

from __future__ import annotations

import math


def bound_bytes(conv_weights: int, nonzero_bits: int) -> int:
    """The non-zero values' bits (count x stored width, summed over tensors) in bytes, plus a 1-bit-per-weight mask."""
    return math.ceil(nonzero_bits / 8) + math.ceil(conv_weights / 8)
