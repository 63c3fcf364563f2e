"""Hypothesis strategies shared by the theory tests: small random problem instances."""
from __future__ import annotations

from hypothesis import strategies as st

from cola_theory.problems import cauchy_regression, least_squares, logistic_regression


@st.composite
def problems(draw, kinds=("squares", "cauchy", "softmax")):
    """A small random problem of one of the kinds."""
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 10_000))
    d = draw(st.integers(2, 7))
    n = draw(st.integers(d, 30))
    norm = draw(st.sampled_from(["nuclear", "frobenius"]))
    cond = draw(st.floats(1.0, 100.0))
    if kind == "squares":
        k = draw(st.integers(2, 7))
        return least_squares(
            n=n, d=d, k=k, target_rank=draw(st.integers(1, min(d, k))), x_condition=cond,
            target_condition=draw(st.floats(1.0, 20.0)), noise=draw(st.floats(0.0, 1.0)), norm=norm, seed=seed,
        )
    if kind == "cauchy":
        k = draw(st.integers(1, 6))
        return cauchy_regression(
            n=n, d=d, k=k, target_rank=draw(st.integers(1, min(d, k))), scale=draw(st.floats(0.1, 3.0)),
            outlier_fraction=draw(st.floats(0.0, 0.4)), x_condition=cond, norm=norm, seed=seed,
        )
    return logistic_regression(
        n=n, d=d, classes=draw(st.integers(2, 5)), reg=draw(st.floats(0.01, 1.0)),
        separation=draw(st.floats(0.0, 5.0)), x_condition=cond, norm=norm, seed=seed,
    )
