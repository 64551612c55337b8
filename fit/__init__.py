"""edgesr fit: per target, the largest channel-pruned artifact that passes the user's per-frame budgets, measured
on the target itself. Shapes are measured before anything is trained (`fit.search`); every step is a cached
Optuna trial (`fit.trials`).

    from fit import FitConfig, run_fit
    record, code = run_fit(FitConfig(model=ModelSpec(checkpoint=Path("model.pt")), out=Path("runs/fit"),
                                     budgets=Path("budgets.yaml")))
"""

from __future__ import annotations

from typing import Any

from fit.config import FitConfig


def run_fit(cfg: FitConfig) -> tuple[dict[str, Any], int]:
    """Run a fit and write its report; (the fit.json record, the exit code)."""
    from fit.report import write_fit
    from fit.search import Fit, exit_code

    record = Fit(cfg).run()
    write_fit(cfg.out, record)
    return record, exit_code(record)


__all__ = ["FitConfig", "run_fit"]
