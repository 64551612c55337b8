"""The final step of a target: train the chosen candidate, convert it at its precision and tile only, measure it on
the target with the real test set, and check every budget (`min_psnr_db` included) on what was measured.

Dense candidates are tried best first: a miss the shape model did not predict moves to the next (`--attempts`); a
PSNR miss ends the search with the budget that binds and what the nearest feasible point costs. When only file
size stops a wider shape, its sparse candidate (`fit.sparse`) is trained and measured as well, and of the passing
artifacts the one with the higher measured PSNR is chosen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.intake import ModelSpec, load_model
from device_bench import budgets as budgets_mod
from edgesr.errors import TargetFailed
from fit import select, stages
from fit.predict import relative_error

if TYPE_CHECKING:
    from fit.search import Fit

log = logging.getLogger("fit")


def attempt(fit: Fit, target: str, c: select.Candidate, method: str = "channel-l1") -> dict[str, Any]:
    """Train (unless dense), convert and measure one candidate on `target`. Another `method` prunes the model to
    the candidate's parameter count its own way (its widths, not the candidate's). When convert refuses the file,
    the record has `refused` (convert's reason) and nothing else was measured."""
    only = (c.precision, fit.tile_spec(target, c.tile))
    if method == "channel-l1" and c.shape.dense and not c.sparsity:
        psnr, run = fit.loaded.source.get("psnr_y_db"), None
        digest = fit.digest
        art = fit.artifacts(fit.dense_checkpoint, digest, "dense", only)
    else:
        if method == "channel-l1":
            run, tag = fit.trained(c.shape, c.sparsity), c.shape.id
        else:
            run, tag = fit.trained_method(method, c.shape.params_fraction), method
        ckpt, psnr = Path(run["checkpoint"]), run["psnr_y_db"]
        digest = stages.model_digest(load_model(ModelSpec(checkpoint=ckpt)).model)
        art = fit.artifacts(lambda p=ckpt: p, digest, f"fit-{tag}", only)
    if not art["folders"]:
        log.warning("%s: %s refused by convert: %s", target, c.label(), art["refused"].get(c.precision))
        return {"candidate": c.to_dict(), "method": method, "refused": art["refused"]}
    measured = fit.measure(art["folders"], digest, target, fit.cfg.test_set, only)
    row = stages.pick_row(measured["rows"], c.precision, c.tile, c.encoding)
    if row is None:
        raise TargetFailed(f"target {target}: no measurement of {c.label()} came back")
    checks = budgets_mod.check(fit.budgets, target, row)
    return {
        "candidate": c.to_dict(),
        "label": c.label() if method == "channel-l1" else f"{method} at {c.shape.params_fraction:.3f} of the params",
        "method": method,
        "train": run,
        "row": row,
        "budgets": checks,
        "pass": all(v["pass"] for v in checks.values()),
        "prediction_error": {
            f: relative_error(c.predicted.get(f), row.get(f)) for f in ("frame_ms_p90", "peak_rss_mb", "size_bytes")
        },
        "artifact_folder": art["folders"][0],
        "bench": measured["bench"],
        "torch_psnr_y_db": psnr,
    }


def size_budgets(fit: Fit, target: str) -> list[str]:
    """The file-size budgets `target` has (what binds when sparsity is what made a candidate fit)."""
    return [k for k in select.SIZE_BUDGETS if k in fit.budgets.for_target(target)]


def failed(a: dict[str, Any]) -> list[str]:
    return [k for k, v in a["budgets"].items() if not v["pass"]]


def psnr_of(a: dict[str, Any]) -> float:
    return float(a["row"].get("psnr_y_db") or 0.0)


def dense_search(
    fit: Fit, target: str, cands: list[select.Candidate]
) -> tuple[dict[str, Any], select.Candidate | None]:
    """The best dense candidates in turn (at most `--attempts`) until one passes or misses only on quality; the
    outcome and that candidate (None when every attempt missed another budget)."""
    out: dict[str, Any] = {"attempts": []}
    for c in select.ranked(cands)[: fit.cfg.attempts]:
        a = attempt(fit, target, c)
        if "refused" in a:
            out.setdefault("refused", []).append(a)
            continue
        out["attempts"].append(a)
        # what stops the shape growing: the next larger one's predicted misses, and what larger attempts missed
        bind = sorted(
            set(select.binding(c, cands)) | {k for prev in out["attempts"][:-1] for k in failed(prev)} - {"min_psnr_db"}
        )
        if not failed(a):
            out.update(status="pass", chosen=a, binding=bind)
            return out, c
        if failed(a) == ["min_psnr_db"]:
            what = f"the largest shape within the budgets ({c.label()})"
            out.update(quality(fit, target, c, a, bind, what))
            return out, c
        log.warning("%s: %s missed %s as measured; trying the next candidate", target, c.label(), failed(a))
    if out["attempts"] or out.get("refused"):
        out.update(
            status="none",
            binding=sorted({k for a in out["attempts"] for k in failed(a)}),
            reason=f"on {target}, the {len(out['attempts'])} best predicted candidates missed budgets as measured",
        )
    return out, None


def quality(
    fit: Fit, target: str, c: select.Candidate, a: dict[str, Any], bind: list[str], what: str
) -> dict[str, Any]:
    """The outcome when the candidate the budgets allow misses only `min_psnr_db`: what binds, what it costs."""
    floor = fit.budgets.for_target(target)["min_psnr_db"]
    return {
        "status": "quality",
        "binding": bind,
        "nearest": c.to_dict(),
        "reason": (
            f"on {target}, {what} reaches {psnr_of(a):.3f} dB < min_psnr_db {floor:g} after {fit.cfg.steps} steps; "
            f"{', '.join(bind) or 'no budget'} binds; the nearest feasible point costs {floor - psnr_of(a):.3f} dB"
        ),
    }


def no_shape(fit: Fit, target: str, cands: list[select.Candidate]) -> dict[str, Any]:
    near = select.nearest(cands)
    worst = max(near.violations.items(), key=lambda kv: kv[1]["excess"])
    return {
        "status": "none",
        "binding": sorted(near.violations),
        "nearest": near.to_dict(),
        "reason": (
            f"no shape meets the budgets on {target}: the nearest, {near.label()}, has {worst[0]} "
            f"{worst[1]['value']:.1f} (predicted) against a limit of {worst[1]['limit']:g} "
            f"(+{worst[1]['excess']:.0%} with the {fit.cfg.margin:.0%} margin)"
        ),
    }


def final(fit: Fit, target: str, cands: list[select.Candidate], sparse: select.Candidate | None) -> dict[str, Any]:
    """The target's outcome: status pass (with `chosen`), quality or none, every attempt, the binding budgets.

    After the dense search, the contenders are trained and measured: the sparse candidate (when only file size
    stops a wider shape) and every other `--methods` entry at the parameter count of the shape the search ended
    on. Of the passing artifacts, the highest measured PSNR is chosen."""
    out, base = dense_search(fit, target, cands) if select.ranked(cands) else ({"attempts": []}, None)
    contenders: list[tuple[str, select.Candidate]] = [("sparse", sparse)] if sparse is not None else []
    if base is not None and not base.shape.dense:  # the unpruned net needs no pruning method
        contenders += [(m, base) for m in fit.cfg.methods if m != "channel-l1"]
    contest = []
    for name, c in contenders:
        a = attempt(fit, target, c, "channel-l1" if name == "sparse" else name)
        a["contender"] = name
        if "refused" in a:
            out.setdefault("refused", []).append(a)
            continue
        out["attempts"].append(a)
        contest.append(a)
    ours = [out["chosen"]] if out.get("status") == "pass" else []
    if contest:
        out["contest"] = [
            {
                "contender": a.get("contender", "channel-l1"),
                "label": a["label"],
                "params": (a.get("train") or {}).get("params") or a["candidate"]["shape"]["params"],
                "psnr_y_db": psnr_of(a),
                "frame_ms_p90": a["row"].get("frame_ms_p90"),
                "size_bytes": a["row"].get("size_bytes"),
                "pass": a["pass"],
            }
            for a in ours + contest
        ]
    passing = [a for a in ours + contest if a["pass"]]
    if passing:
        best = max(passing, key=psnr_of)
        if best is not out.get("chosen"):
            bind = out.get("binding") or []
            if best.get("contender") == "sparse":
                bind = sorted(set(select.binding(sparse, cands)) | set(size_budgets(fit, target)))
            out.update(status="pass", chosen=best, binding=bind, reason=None)
        return out
    if "status" in out:
        return out
    a = next((a for a in contest if a.get("contender") == "sparse"), None)
    if a is None:
        return {**out, **no_shape(fit, target, cands)}
    if failed(a) == ["min_psnr_db"]:
        bind = size_budgets(fit, target)
        what = (
            f"the widest shape within the other budgets made to fit the file budget with {sparse.sparsity:.0%} "
            f"zero weights ({sparse.label()})"
        )
        out.update(quality(fit, target, sparse, a, bind, what))
        return out
    out.update(
        status="none",
        binding=failed(a),
        reason=f"on {target}, the sparse candidate {sparse.label()} missed {', '.join(failed(a))} as measured",
    )
    return out
