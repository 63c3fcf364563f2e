"""Statistics for comparing fine-tuning methods over a handful of seeds, without fooling anyone.

A comparison is *paired*: method and baseline run on the same seeds, and a seed fixes the
train/validation draw, the LoRA initialisation and the data order (the test set is the same for
every seed), so the per-seed difference removes what the two runs share. What is reported:

* the mean paired difference and its standard deviation over seeds;
* a confidence interval of the mean difference, either Student's t (the default: exact when the
  differences are normal, honest about how little 3 seeds say: the 95 % t factor is 4.30 for
  n = 3) or a paired percentile bootstrap (resampling seeds; with very few seeds it has only a
  few distinct resamples and comes out too narrow, which the report says);
* a verdict: ``"better"`` / ``"worse"`` when the interval excludes zero, ``"within noise"`` when it
  covers zero, ``"no interval"`` with fewer than two paired seeds, ``"not finite"`` when a run
  diverged (a NaN or infinite score on a seed: no interval is drawn).

The distributions are scipy's: the t quantile and cdf are :data:`scipy.stats.t`, the bootstrap is
:func:`scipy.stats.bootstrap` (percentile method, seeded; it draws the same resamples as
``rng.integers(0, n, (n_boot, n))`` on ``numpy.random.default_rng(seed)``). A sample whose values
are all equal has the interval ``[mean, mean]`` under either method.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cola.errors import ConfigError

CI_METHODS = ("t", "bootstrap")

def _scipy_stats():
    """``scipy.stats``, imported when first needed (about a second: a ``cola train`` that compares nothing, and
    every subprocess of the tests, is spared it)."""
    import scipy.stats

    return scipy.stats


def _rng_keyword() -> str:
    """scipy 1.15 renamed ``random_state`` to ``rng`` (both take a numpy Generator)."""
    return "rng" if "rng" in inspect.signature(_scipy_stats().bootstrap).parameters else "random_state"


# ============================================================================ summaries

def describe(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, ``std`` (sample, ddof 1; None for n < 2), ``sem``, ``n`` and the ``values``."""
    vals = [float(v) for v in values]
    n = len(vals)
    with np.errstate(invalid="ignore"):   # a diverged (infinite) score: the std is NaN, quietly
        mean = float(np.mean(vals)) if n else None
        std = float(np.std(vals, ddof=1)) if n > 1 else None
    return {"mean": mean, "std": std, "sem": std / math.sqrt(n) if std is not None else None, "n": n,
            "values": vals}


# ============================================================================ Student's t

def _check_df(df: float) -> None:
    if df <= 0:
        raise ConfigError(f"df={df}: degrees of freedom must be > 0")


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    _check_df(df)
    return float(_scipy_stats().t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"p={p}: a quantile needs 0 < p < 1")
    _check_df(df)
    return float(_scipy_stats().t.ppf(p, df))


# ============================================================================ paired comparison

def check_ci(method: str, confidence: float) -> None:
    """Raise :class:`ConfigError` unless ``method`` and ``confidence`` are usable."""
    problems = []
    if method not in CI_METHODS:
        problems.append(f"ci={method!r}: allowed {', '.join(CI_METHODS)}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1.0:
        problems.append(f"confidence={confidence!r}: must be a number in [0.5, 1), e.g. 0.95")
    if problems:
        raise ConfigError(problems)


def mean_interval(values: Sequence[float], confidence: float = 0.95, method: str = "t",
                  n_boot: int = 10000, seed: int = 0) -> tuple[float | None, float | None]:
    """A ``confidence`` interval of the mean of ``values`` (None, None for fewer than two)."""
    check_ci(method, confidence)
    x = np.asarray(values, dtype=float)
    n = x.size
    if n < 2:
        return None, None
    mean = float(x.mean())
    if np.all(x == x[0]):  # no spread: scipy's bootstrap would warn; the t half-width is 0
        return mean, mean
    if method == "t":
        sd = float(x.std(ddof=1))
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
        return mean - half, mean + half
    res = _scipy_stats().bootstrap((x,), np.mean, n_resamples=n_boot, vectorized=True, axis=-1,
                                confidence_level=confidence, method="percentile",
                                **{_rng_keyword(): np.random.default_rng(seed)})
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


#: metrics where a lower value is better (losses, perplexities, forgetting); every other metric: higher is better
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "bits_per_byte", "forgetting", "reference_loss",
                             "reference_perplexity", "reference_bits_per_byte", "answer_loss",
                             "paraphrase_answer_loss"})


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def verdict(low: float | None, high: float | None, higher_better: bool = True) -> str:
    """``better`` / ``worse`` when the interval of (method - baseline) excludes 0, ``within noise``
    when it covers it; with ``higher_better=False`` (perplexity, forgetting) a negative difference
    is the better one."""
    if low is None or high is None:
        return "no interval"
    if low > 0:
        return "better" if higher_better else "worse"
    if high < 0:
        return "worse" if higher_better else "better"
    return "within noise"


def paired_difference(method: Mapping[Any, float], baseline: Mapping[Any, float], confidence: float = 0.95,
                      ci: str = "t", n_boot: int = 10000, seed: int = 0, higher_better: bool = True) -> dict[str, Any]:
    """Paired comparison of ``method`` with ``baseline``, both ``{seed: score}``.

    Only seeds present in both count; ``higher_better`` says which sign of the difference wins. Returns ``n``, ``seeds``, the per-seed ``differences``,
    their ``mean`` and ``std``, the interval ``ci_low``/``ci_high`` of the mean difference
    (``ci`` = ``"t"`` or ``"bootstrap"``), ``verdict`` and, for information, the other method's
    interval too (``t_interval``, ``bootstrap_interval``) and ``unpaired_seeds`` left out.
    """
    check_ci(ci, confidence)
    seeds = sorted(set(method) & set(baseline), key=str)
    diffs = [float(method[s]) - float(baseline[s]) for s in seeds]
    finite = all(math.isfinite(d) for d in diffs)   # a diverged run (NaN or inf) has no interval, and says so
    t_low, t_high = mean_interval(diffs, confidence, "t") if finite else (None, None)
    b_low, b_high = mean_interval(diffs, confidence, "bootstrap", n_boot, seed) if finite else (None, None)
    low, high = (t_low, t_high) if ci == "t" else (b_low, b_high)
    d = describe(diffs)
    return {
        "n": len(seeds), "seeds": seeds, "differences": diffs, "mean": d["mean"], "std": d["std"],
        "ci": ci, "confidence": confidence, "ci_low": low, "ci_high": high,
        "verdict": verdict(low, high, higher_better) if finite else "not finite",
        "t_interval": [t_low, t_high], "bootstrap_interval": [b_low, b_high],
        "unpaired_seeds": sorted((set(method) | set(baseline)) - set(seeds), key=str),
    }


def interval_text(comp: Mapping[str, Any], digits: int = 3) -> str:
    """``+0.012 [-0.020, +0.044]``: a :func:`paired_difference`'s mean and interval (– without a mean)."""
    if comp.get("mean") is None:
        return "–"
    text = f"{comp['mean']:+.{digits}f}"
    if comp.get("ci_low") is not None:
        text += f" [{comp['ci_low']:+.{digits}f}, {comp['ci_high']:+.{digits}f}]"
    return text


def format_difference(comp: Mapping[str, Any], digits: int = 3) -> str:
    """``+0.012 [-0.020, +0.044] within noise (n=3, 95% t)`` for a :func:`paired_difference` result."""
    if comp.get("mean") is None:
        return "no paired seeds"
    conf = int(round(100 * comp["confidence"]))
    return f"{interval_text(comp, digits)} {comp['verdict']} (n={comp['n']}, {conf}% {comp['ci']})"
