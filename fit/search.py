"""`run_fit`: shapes measured on every target first, the largest that fits chosen per target, then trained,
converted and measured there; every step a cached trial (`fit.trials`).

1. Shape stage. The L1 cut of the model at each keep fraction (`--keeps`) of each width family (`--round-to`)
   is converted (TFLite, every precision and workload tile) and benched on every target at its workload with its
   untrained weights: latency, memory and size depend on the shape, not the weights.
2. Selection. Per target, precision and tile, the shape model (`fit.predict`) predicts every shape of the family;
   the largest whose predictions meet every budget with `--margin` is chosen (`fit.select`).
3. Training. The chosen shape's L1 cut is fine-tuned for `--steps`, distilled from the unpruned model; one run per
   shape, shared by the targets that choose it.
4. Final measurement. The trained net is converted at the chosen precision and tile and benched on the target
   with the real test set; every budget, `min_psnr_db` included, is checked on what was measured. A miss the
   model did not predict moves to the next candidate (`--attempts`); a PSNR miss ends the target's search with
   the budget that binds and what the nearest feasible point costs.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from compress.data import TrainingSet
from compress.intake import load_model
from compress.pruning.coupling import find_groups
from compress.pruning.layers import check_known_layers
from device_bench import budgets as budgets_mod
from device_bench.targets import make_targets
from edgesr.datasets import load_test_set
from edgesr.errors import EXIT_BUDGET_FAILED, EXIT_OK, BadInput, TargetFailed
from edgesr.manifest import new_manifest, sha256
from edgesr.progress import progress
from edgesr.workload import Workload, tile_label, tile_size
from fit import final, select, sparse, stages
from fit.config import FitConfig
from fit.shapes import Shape, ShapeSpace
from fit.trials import TrialStore, default_storage, key_id

log = logging.getLogger("fit")
MAX_REFINE = 6  # shapes measured after the shape stage, per target, to make the chosen one a measured shape


def _workloads(cfg: FitConfig, budgets: budgets_mod.Budgets) -> dict[str, Workload]:
    out = {}
    for t in cfg.targets:
        wl = budgets.workload_for(t, cfg.frame, cfg.tiles)
        if wl.frame is None:
            raise BadInput(
                f"{cfg.budgets}: the fit needs the workload's LR frame for target {t} "
                "(workload: {frame: WxH} in the budgets file, or --frame WxH)"
            )
        if not wl.tiles:
            wl = Workload(frame=wl.frame, tiles=(128,))
        out[t] = wl
    return out


class Fit:
    def __init__(self, cfg: FitConfig) -> None:
        self.cfg = cfg
        self.budgets = budgets_mod.load_budgets(cfg.budgets)
        if not any(self.budgets.for_target(t) for t in cfg.targets):
            raise BadInput(f"{cfg.budgets}: no budget applies to {', '.join(cfg.targets)}: nothing to fit")
        make_targets(list(cfg.targets), cfg.device_python, cfg.timeout_s, "auto", cfg.targets_file)  # validates
        self.workloads = _workloads(cfg, self.budgets)
        self.loaded = load_model(cfg.model)
        if self.loaded.recipe is None:
            raise BadInput(f"{cfg.model.origin}: a .pt2 cannot be pruned or trained; give the model it came from")
        check_known_layers(self.loaded.model, cfg.model.origin)
        # every input checked before slow work: both test sets and the training data load now
        self.test_pairs = load_test_set(cfg.test_set, self.loaded.scale, cfg.degradation)
        load_test_set(cfg.measure_test_set, self.loaded.scale, cfg.degradation)
        self.images = TrainingSet.from_source(cfg.data, self.loaded.scale, cfg.degradation)
        try:
            self.space = ShapeSpace(
                self.loaded.model, find_groups(self.loaded.model), self.loaded.scale, cfg.min_channels
            )
        except ValueError as exc:
            raise BadInput(f"{cfg.model.origin}: {exc}") from None
        self.digest = stages.model_digest(self.loaded.model)
        self.target_ids = {t: self._target_id(t) for t in cfg.targets}
        if cfg.storage:  # a database of the user's: opened (and refused) before --out is made
            self.store = TrialStore(cfg.storage)
        cfg.out.mkdir(parents=True, exist_ok=True)
        if not cfg.storage:
            self.store = TrialStore(default_storage(cfg.out))
        self.refused: dict[str, str] = {}  # precision -> why convert refused it (for some shape)

    def trial_dir(self, key: dict[str, Any]) -> Path:
        """Where a trial writes its files (absolute: the store may be read from another working directory)."""
        return self.cfg.out.absolute() / "trials" / key_id(key)

    def _target_id(self, name: str) -> dict[str, Any]:
        tf = self.cfg.targets_file
        return {"name": name, "targets_file": sha256(tf) if tf else None}

    def _tiles(self) -> tuple[int | str, ...]:
        """Every tile any target's workload allows (one artifact set serves all targets)."""
        seen: dict[Any, None] = {}
        for wl in self.workloads.values():
            for t in wl.tiles:
                seen.setdefault(t, None)
        return tuple(seen)

    # ------------------------------------------------------------------ cached units of work

    def artifacts(
        self, checkpoint_of: Any, digest: str, tag: str, only: tuple[str, int | str] | None = None
    ) -> dict[str, Any]:
        """Convert (cached): `checkpoint_of()` gives the checkpoint path when the trial has to run. Every
        precision at every workload tile, or `only` one (precision, tile)."""
        tiles = self._tiles() if only is None else (only[1],)
        precisions = self.cfg.precisions if only is None else (only[0],)
        frames = sorted({wl.frame for wl in self.workloads.values()})
        if "frame" in tiles and len(frames) > 1:
            raise BadInput("tile 'frame' needs one frame size for every target (their workloads differ)")
        key = {"kind": "convert", "model": digest, "tiles": list(map(str, tiles)), "frame": frames[0]}
        key["precisions"] = list(precisions)
        folder = self.trial_dir(key) / "convert"

        def work() -> dict[str, Any]:
            wl = Workload(frame=frames[0], tiles=tiles)
            name = f"{self.loaded.name}-{tag}"
            return stages.make_artifacts(checkpoint_of(), folder, name, tiles, wl, precisions)

        return self.store.run(key, work)

    def measure(
        self, folders: list[str], digest: str, target: str, test_set: str, only: tuple[str, int | str] | None = None
    ) -> dict[str, Any]:
        """Bench a convert folder on `target` at its workload (cached); `only`: the folder holds one (precision,
        tile) of it."""
        wl = self.workloads[target]
        if only is not None:
            wl = Workload(frame=wl.frame, tiles=(only[1],))
        key = {
            "kind": "measure",
            "model": digest,
            "target": self.target_ids[target],
            "workload": wl.to_dict(),
            "test_set": test_set,
            "precisions": list(self.cfg.precisions),
            "settings": {k: getattr(self.cfg, k) for k in ("runs", "warmup", "min_seconds", "threads")},
        }
        if only is not None:
            key["only"] = list(only)
        out = self.trial_dir(key) / "bench"

        def work() -> dict[str, Any]:
            result = stages.measure(folders, out, self.cfg, target, wl, test_set)
            if result["failed"]:
                raise TargetFailed(result["failed"][0]["reason"])
            return {**result, "bench": str(out)}

        return self.store.run(key, work, value="frame_ms_p90")

    def shape_checkpoint(self, shape: Shape) -> Path:
        path = self.cfg.out / "shapes" / shape.id
        return stages.save_model(self.space.compact(shape), self.loaded, path, shape)

    def _train_key(self, kind: str, **what: Any) -> dict[str, Any]:
        """A training trial's key: what it trains, and the model, budget, data, test set and seed of the fit."""
        return {"kind": kind, "model": self.digest, **what, "steps": self.cfg.steps, "data": self.cfg.data,
                "test_set": self.cfg.test_set, "seed": self.cfg.seed}  # fmt: skip

    def trained(self, shape: Shape, sparsity: float = 0.0) -> dict[str, Any]:
        key = self._train_key("train", shape=shape.to_dict()["kept"], method="channel-l1")
        if sparsity:
            key["sparsity"] = {"target": sparsity, "layers": self.cfg.sparse_layers}
        out = self.trial_dir(key) / "train"

        def work() -> dict[str, Any]:
            compact = self.space.compact(shape)
            return stages.train_shape(
                compact, self.loaded, shape, self.cfg, out, self.test_pairs, self.images, sparsity
            )

        return self.store.run(key, work, value="psnr_y_db")

    def trained_method(self, method: str, params_fraction: float) -> dict[str, Any]:
        """Another structured method of compress at a parameter fraction, within the same training budget."""
        key = self._train_key("train-method", method=method, params=round(params_fraction, 6))
        out = self.trial_dir(key) / "train"

        def work() -> dict[str, Any]:
            return stages.train_method(
                method, self.loaded, params_fraction, self.cfg, out, self.test_pairs, self.images
            )

        return self.store.run(key, work, value="psnr_y_db")

    # ------------------------------------------------------------------ the stages

    def shape_stage(self) -> tuple[dict[int, list[Shape]], dict[str, dict[str, list[dict[str, Any]]]]]:
        families = {r: [self.space.shape(k, r) for k in self.cfg.keeps] for r in self.cfg.round_to}
        unique = {s.id: s for fam in families.values() for s in fam}
        log.info(
            "shape stage: %d shapes (%s) x %d precisions x %d tiles on %s",
            len(unique),
            ", ".join(s.label() for s in sorted(unique.values(), key=lambda s: -s.fraction)),
            len(self.cfg.precisions),
            len(self._tiles()),
            ", ".join(self.cfg.targets),
        )
        rows: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in self.cfg.targets}
        bar = progress(None, desc="fit: shapes", total=len(unique) * len(self.cfg.targets), unit="shape")
        for shape in unique.values():
            for t in self.cfg.targets:
                rows[t][shape.id] = self.measure_shape(shape, t)
                bar.update()
        bar.close()
        return families, rows

    def shape_source(self, shape: Shape) -> tuple[str, Any]:
        """(digest, a function giving the net) of a shape's untrained net: the model itself or its L1 cut."""
        if shape.dense:
            return self.digest, lambda: self.loaded.model
        return f"{self.digest}:{shape.id}:l1", lambda: self.space.compact(shape)

    def tile_spec(self, target: str, tile: tuple[int, int]) -> int | str:
        """The workload's tile entry (a side or 'frame') that gives `tile` on `target`."""
        wl = self.workloads[target]
        return next(t for t in wl.tiles if tuple(tile_size(t, wl.frame)) == tuple(tile))

    def measure_shape(self, shape: Shape, target: str) -> list[dict[str, Any]]:
        """The rows of one shape's artifacts (every precision and tile) on one target, untrained weights."""
        if shape.dense:  # the model itself: its artifacts serve the final measurement too
            digest, art = self.digest, self.artifacts(self.dense_checkpoint, self.digest, "dense")
        else:  # the L1 cut of a known model at known widths
            digest = self.shape_source(shape)[0]
            art = self.artifacts(lambda: self.shape_checkpoint(shape), digest, f"shape-{shape.id}")
        for precision, reason in art["refused"].items():
            self.refused.setdefault(precision, reason)
        return self.measure(art["folders"], digest, target, self.cfg.measure_test_set)["rows"]

    def refine(
        self, target: str, families: dict[int, list[Shape]], rows: dict[str, list[dict[str, Any]]]
    ) -> tuple[list[select.Candidate], list[dict[str, Any]]]:
        """Selection, measuring the best candidate's shape first whenever it was only interpolated (until the
        best candidate is a measured shape, at most MAX_REFINE extra shapes)."""
        for _ in range(MAX_REFINE):
            cands, curves = self.select_target(target, families, rows)
            best = select.ranked(cands)[:1]
            if not best or best[0].measured is not None:
                return cands, curves
            shape = best[0].shape
            log.info("%s: measuring %s before training it (it was interpolated)", target, shape.label())
            rows[shape.id] = self.measure_shape(shape, target)
            families[shape.round_to].append(shape)
        return self.select_target(target, families, rows)

    def select_target(
        self, target: str, families: dict[int, list[Shape]], rows: dict[str, list[dict[str, Any]]]
    ) -> tuple[list[select.Candidate], list[dict[str, Any]]]:
        limits = self.budgets.for_target(target)
        sizes = self.workloads[target].tile_sizes() or []
        cands: list[select.Candidate] = []
        curves: list[dict[str, Any]] = []
        for r, family in families.items():
            smallest = min(s.fraction for s in family)  # the shape model interpolates; it never extrapolates
            grid = [s for s in self.space.grid(r) if s.fraction >= smallest - 1e-9]
            for precision in self.cfg.precisions:
                for tile in sizes:
                    tile = tuple(tile)
                    c = select.curves_for(rows, family, precision, tile)
                    if not c:
                        continue
                    curves.append(
                        {
                            "label": f"round_to {r}, {precision}, tile {tile_label(tile)}",
                            "round_to": r,
                            "precision": precision,
                            "tile": list(tile),
                            "figures": {
                                f: {
                                    "knots": [[round(k, 6), round(y, 4)] for k, y in cv.knots],
                                    "loo_error": cv.loo_error,
                                }
                                for f, cv in c.items()
                            },
                        }
                    )
                    cands += select.candidates(grid, c, precision, tile, limits, self.cfg.margin, rows)
        unique: dict[tuple, select.Candidate] = {}
        for c in cands:  # one shape from two families: the same candidate
            unique.setdefault((c.shape.id, c.precision, c.tile), c)
        return list(unique.values()), curves

    def dense_checkpoint(self) -> Path:
        shape = self.space.shape(1.0, 1)
        return stages.save_model(self.loaded.model, self.loaded, self.cfg.out / "shapes" / "dense", shape)

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        families, rows = self.shape_stage()
        targets = {}
        for t in self.cfg.targets:
            cands, curves = self.refine(t, families, rows[t])
            log.info("%s: %d candidates, %d feasible by prediction", t, len(cands), len(select.ranked(cands)))
            best = select.ranked(cands)
            bases = select.sparse_bases(cands, best[0] if best else None) if self.cfg.sparsities else []
            sparse_cand, probes = sparse.choose(self, t, bases)
            outcome = final.final(self, t, cands, sparse_cand)
            targets[t] = {
                "workload": self.workloads[t].to_dict(),
                "budgets": self.budgets.for_target(t),
                "curves": curves,
                "candidates": [c.to_dict() for c in sorted(cands, key=select.Candidate.order)],
                "sparse_probes": {"bases": [b.to_dict() for b in bases], "probes": probes} if bases else None,
                **outcome,
            }
            if outcome["status"] == "pass":
                self._publish(t, outcome["chosen"])
        return new_manifest(
            "fit",
            model=self.loaded.name,
            source=self.loaded.source,
            settings=settings(self.cfg),
            budgets=self.budgets.to_dict(),
            refused_precisions=self.refused,
            targets=targets,
            trials={"storage": self.store.storage, "ran": len(self.store.ran), "reused": len(self.store.reused)},
            seconds=round(time.monotonic() - t0, 1),
        )

    def _publish(self, target: str, chosen: dict[str, Any]) -> None:
        """`<out>/<target>/`: the chosen artifact's convert folder and its bench report."""
        dest = self.cfg.out / target
        staging = self.cfg.out / f".{target}.publish"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(chosen["artifact_folder"], staging / "artifact")
        shutil.copytree(chosen["bench"], staging / "bench")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
        chosen["published"] = str(dest)


def settings(cfg: FitConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["model"] = {"origin": cfg.model.origin}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def exit_code(record: dict[str, Any]) -> int:
    statuses = [t["status"] for t in record["targets"].values()]
    return EXIT_OK if all(s == "pass" for s in statuses) else EXIT_BUDGET_FAILED
