"""Weight sparsity where only file size binds.

When the widest shape that the latency and memory budgets allow misses only a file-size budget (`max_model_kb`,
`max_download_kb`), a narrower shape is not the only way in: magnitude-pruned conv weights, sparse-encoded by
convert, shrink the file while the shape stays. The probe cuts that shape's net once at each of `--sparsities`
(ascending; in the layers `compress.pruning.gates.select_layers("default")` picks: not the first and last conv),
converts it at the candidate's precision and tile, measures the sparse file on the target, and keeps the smallest
sparsity whose measured figures meet every budget with the margin. Latency and memory are measured too: a runtime
that densifies sparse tensors at load (TFLite's DENSIFY) may cost memory.

The fit then trains that candidate (gradual magnitude pruning to the sparsity during the distilled fine-tune) as
well as the narrower dense one and keeps the one with the higher measured PSNR (`fit.final`).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from compress.pruning.methods.magnitude import prune_once
from fit import select, stages

if TYPE_CHECKING:
    from fit.search import Fit

log = logging.getLogger("fit")


def size_floor(base: select.Candidate, sparsity: float) -> float:
    """A lower bound of the sparse file's bytes: every weight file keeps at least its non-zeros."""
    return (1.0 - sparsity) * float(base.predicted.get("size_bytes") or 0.0)


def choose(
    fit: Fit, target: str, bases: list[select.Candidate]
) -> tuple[select.Candidate | None, list[dict[str, Any]]]:
    """Of every base (one per precision), the candidate that fits with the fewest zero weights (ties: the higher
    precision), or None; and every probe made."""
    found, probes = [], []
    for base in bases:
        cand, made = probe(fit, target, base)
        probes += made
        if cand is not None:
            found.append(cand)
    best = min(found, key=lambda c: (c.sparsity, c.order()), default=None)
    return best, probes


def probe(fit: Fit, target: str, base: select.Candidate) -> tuple[select.Candidate | None, list[dict[str, Any]]]:
    """The smallest sparsity of `base`'s shape whose measured sparse file meets every budget on `target`, as a
    candidate (its figures are the measured one-shot cut's), or None; and every probe made."""
    limits = fit.budgets.for_target(target)
    only = (base.precision, fit.tile_spec(target, base.tile))
    source_digest, model_of = fit.shape_source(base.shape)
    probes: list[dict[str, Any]] = []
    for s in sorted(fit.cfg.sparsities):
        if "max_model_kb" in limits and size_floor(base, s) > limits["max_model_kb"] * 1024:
            continue  # cannot fit even before index overhead: no need to build it
        digest = f"{source_digest}:magnitude-{s:g}"
        at = {"base": base.to_dict(), "sparsity": s}

        def checkpoint(sparsity: float = s):
            net = copy.deepcopy(model_of())
            record = prune_once(net, sparsity, fit.cfg.sparse_layers)
            path = fit.cfg.out / "shapes" / f"{base.shape.id}-sparse-{round(100 * sparsity)}"
            return stages.save_model(net, fit.loaded, path, base.shape, {"pruning": record})

        art = fit.artifacts(checkpoint, digest, f"shape-{base.shape.id}-s{round(100 * s)}", only)
        if not art["folders"]:
            probes.append({**at, "refused": art["refused"]})
            continue
        rows = fit.measure(art["folders"], digest, target, fit.cfg.measure_test_set, only)["rows"]
        row = stages.pick_row(rows, base.precision, base.tile, "sparse")
        if row is None:  # convert wrote no sparse file: no conv tensor was smaller sparse-encoded
            probes.append({**at, "row": None, "why": "no sparse file (nothing smaller sparse-encoded)"})
            continue
        missed = select.violations(limits, row, fit.cfg.margin)
        probes.append({**at, "row": row, "rejected_by": missed})
        log.info(
            "%s: %s at %.0f%% sparsity: %.1f KB, %s",
            target,
            base.label(),
            100 * s,
            row["size_bytes"] / 1024,
            "fits" if not missed else "misses " + ", ".join(missed),
        )
        if not missed:
            predicted = {f: float(row[f]) for f in select.PREDICTED if row.get(f) is not None}
            return select.Candidate(base.shape, base.precision, base.tile, predicted, row, sparsity=s), probes
    return None, probes
