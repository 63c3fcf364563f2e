"""cola_theory: numerical checks of the convergence theory behind Chain of LoRA.

One idea a module:

- :mod:`~cola_theory.problems`: synthetic matrix problems with exactly computable constants
  (least squares, Cauchy robust regression, logistic regression, RAC-LoRA's quadratic) and
  the Frank-Wolfe set K (nuclear or Frobenius ball);
- :mod:`~cola_theory.bounds`: the bounds (COLA Theorem 4.1, RAC-LoRA non-convex and PL) as
  pure functions;
- :mod:`~cola_theory.algorithms`: float64 reference algorithms (idealised COLA = Frank-Wolfe,
  RAC-LoRA as projected GD, full GD);
- :mod:`~cola_theory.chains`: the same algorithms through the real ``cola.Chain``;
- :mod:`~cola_theory.checks`: run, compare with the bound, report (observed, bound, ratio);
- :mod:`~cola_theory.plots`, :mod:`~cola_theory.cli`: figures and the ``cola theory`` command.

    from cola_theory.checks import run_checks
    rows, _ = run_checks(["fw-exact"])
    for row in rows:
        print(row.name, row.observed, row.bound, row.passed)
"""

from .bounds import (
    fit_rate_exponent,
    fw_gap_bound,
    fw_gap_bound_for_step,
    fw_step_size,
    rac_lambda_gaussian,
    rac_nonconvex_bound,
    rac_pl_bound,
)
from .problems import (
    Ball,
    Problem,
    cauchy_regression,
    counterexample_quadratic,
    least_squares,
    logistic_regression,
    standard_problems,
)

__all__ = [
    "Ball", "Problem", "least_squares", "cauchy_regression", "logistic_regression", "counterexample_quadratic",
    "standard_problems", "fw_step_size", "fw_gap_bound", "fw_gap_bound_for_step", "rac_lambda_gaussian",
    "rac_nonconvex_bound", "rac_pl_bound", "fit_rate_exponent",
]
