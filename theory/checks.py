"""Checks: run an algorithm, evaluate the bound its theorem states, compare.

A check returns :class:`CheckResult` rows (observed value, bound, ratio, pass/fail). A
violated bound is reported as a failed row with its ratio; nothing is loosened to pass.
``kind`` says what a row compares: ``theorem`` (a proved bound under assumptions the problem
meets), ``constant`` (a certified constant against what is measured), ``rate`` (the fitted
exponent of the mean gap against the theorem's T^(-1/2)), ``claim`` (an empirical statement
of a paper, e.g. "COLA gets below LoRA's rank floor").

Check groups are registered in :data:`CHECKS` (name -> function of a :class:`Context`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import numpy as np

from . import bounds
from .algorithms import frank_wolfe, rac_expected_next_value, rac_projected_gd
from .chains import chain_frank_wolfe, rac_chain, train_chain, train_full
from .problems import Problem, standard_problems

__all__ = ["CheckResult", "Context", "CHECKS", "run_checks", "to_jsonable"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CheckResult:
    """One compared quantity: passes when ``observed <relation> bound``."""

    name: str
    claim: str
    observed: float
    bound: float
    relation: str = "<="
    kind: str = "theorem"
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.bound == 0.0:
            return 0.0 if self.observed == 0.0 else math.inf
        return self.observed / self.bound

    @property
    def passed(self) -> bool:
        """NaN never passes; an infinite observation (a diverged run) never meets an upper bound."""
        o, b = float(self.observed), float(self.bound)
        if math.isnan(o) or math.isnan(b):
            return False
        if self.relation == "<=":
            return o != math.inf and o <= b
        return o >= b

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(ratio=self.ratio, passed=self.passed)
        return to_jsonable(out)


@dataclasses.dataclass
class Context:
    """What every check group shares: seed, size, problems, and curves for the plots."""

    seed: int = 0
    full: bool = False
    rank: int = 4  # link rank of the COLA / LoRA runs
    rac_rank: int = 2  # sketch rank of the RAC-LoRA runs
    problems: dict[str, Problem] = dataclasses.field(default_factory=dict)
    curves: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.problems:
            self.problems = standard_problems(seed=self.seed, full=self.full)

    def size(self, default: int, full: int) -> int:
        return full if self.full else default


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: arrays to lists, numpy scalars to Python, inf/nan to strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Constants


def check_constants(ctx: Context) -> list[CheckResult]:
    """beta >= ||Hessian|| and (PL problems) mu <= lambda_min(Hessian) at sampled points."""
    rng = np.random.default_rng(ctx.seed + 101)
    out = []
    for key, p in ctx.problems.items():
        points = [p.W0]
        if p.minimiser is not None:
            points.append(p.minimiser)
        scale = p.ball.radius / math.sqrt(p.W0.size)
        points += [scale * rng.standard_normal(p.shape) for _ in range(ctx.size(4, 16))]
        eigs = [np.linalg.eigvalsh(p.hessian(W)) for W in points]
        top = max(max(abs(e[0]), abs(e[-1])) for e in eigs)
        out.append(CheckResult(
            f"beta/{key}", "max sampled ||Hessian||_2 <= certified beta", top, p.beta, "<=", "constant",
            {"points": len(points), "problem": p.name},
        ))
        if p.mu is not None:
            low = min(e[0] for e in eigs)
            out.append(CheckResult(
                f"mu/{key}", "min sampled lambda_min(Hessian) >= mu (strong convexity => PL)", low, p.mu,
                ">=", "constant", {"points": len(points), "problem": p.name},
            ))
    return out


# --------------------------------------------------------------------------------------------
# COLA Theorem 4.1


def _fw_result(name: str, p: Problem, traj, claim: str, extra: dict | None = None) -> CheckResult:
    T = len(traj.gaps)
    eps = max(0.0, float(np.max(traj.eps)))
    bound = bounds.fw_gap_bound(p.M, p.beta, p.D, T, eps)
    details = {
        "problem": p.name, "T": T, "eta": traj.step, "M": p.M, "beta": p.beta, "D": p.D,
        "eps_max": eps, "eps_mean": float(np.mean(traj.eps)),
        "bound_with_mean_eps": bounds.fw_gap_bound(p.M, p.beta, p.D, T, float(np.mean(traj.eps))),
        "final_gap": float(traj.gaps[-1]), "f_final_minus_fstar": float(traj.losses[-1] - p.f_star),
        "K": p.ball.to_dict(),
    }
    details.update(extra or {})
    return CheckResult(name, claim, traj.mean_gap, bound, "<=", "theorem", details)


def check_fw_exact(ctx: Context) -> list[CheckResult]:
    """Theorem 4.1 with the exact linear minimiser (eps = 0) on every problem."""
    T = ctx.size(200, 1000)
    out = []
    for key, p in ctx.problems.items():
        traj = frank_wolfe(p, T)
        out.append(_fw_result(f"thm4.1-exact/{key}", p, traj,
                              "(1/T) sum g_t <= 2 sqrt(M beta) D / sqrt(T)  [exact LMO]"))
    # the same on a Frobenius ball
    p = ctx.problems["cauchy"]
    fro = dataclasses.replace(p, ball=type(p.ball)("frobenius", p.ball.radius))
    traj = frank_wolfe(fro, T)
    out.append(_fw_result("thm4.1-exact/cauchy-frobenius", fro, traj,
                          "(1/T) sum g_t <= 2 sqrt(M beta) D / sqrt(T)  [Frobenius ball]"))
    return out


def check_fw_stochastic(ctx: Context) -> list[CheckResult]:
    """Theorem 4.1 with a minibatch-gradient linear minimiser; eps measured on the full gradient."""
    T = ctx.size(200, 1000)
    out = []
    for key in ("ls-high", "cauchy"):
        p = ctx.problems[key]
        batch = max(1, p.n // 4)
        traj = frank_wolfe(p, T, batch_size=batch, seed=ctx.seed)
        out.append(_fw_result(f"thm4.1-stochastic/{key}", p, traj,
                              "(1/T) sum g_t <= 2 sqrt(M beta) D / sqrt(T) + eps  [minibatch LMO]",
                              {"batch_size": batch}))
    return out


def check_fw_chain(ctx: Context) -> list[CheckResult]:
    """Theorem 4.1 where each linear minimiser is a rank-r LoRA link trained by cola.Chain."""
    T = ctx.size(50, 200)
    out = []
    runs = [("ls-high", "linear"), ("ls-low", "linear"), ("ls-high", "loss")]
    for key, objective in runs:
        p = ctx.problems[key]
        run = chain_frank_wolfe(p, T, ctx.rank, inner_steps=10, lr=1.0, objective=objective, seed=ctx.seed)
        traj = run.trajectory
        name = f"thm4.1-chain/{key}" + ("" if objective == "linear" else "-loss")
        out.append(_fw_result(
            name, p, traj, f"(1/T) sum g_t <= 2 sqrt(M beta) D / sqrt(T) + eps  [rank-{ctx.rank} LoRA links]",
            {"objective": objective, "inner_steps": 10, "link_rank": ctx.rank,
             "target_rank": p.info.get("target_rank"),
             "recursion_error": traj.extra["recursion_error"]},
        ))
        ctx.curves.setdefault("fw_chain", {})[name] = {"eps": traj.eps, "gaps": traj.gaps}
    return out


#: how much shallower than -1/2 a fitted exponent may be and still count as the T^(-1/2) rate
RATE_TOLERANCE = 0.05


def check_fw_rate(ctx: Context) -> list[CheckResult]:
    """Fitted exponent of (1/T) sum g_t against T (each T with its own proof step) vs -1/2.

    The fit uses the upper half of the sweep: at small T the mean gap is still in its transient
    (its ratio to the bound rises before it levels off), which flattens a fit over the whole
    sweep; that slope is reported too (``slope_all``). Passes when slope <= -1/2 + 0.05.
    """
    Ts = [25 * 2 ** i for i in range(ctx.size(8, 10))]
    tail = len(Ts) // 2
    out = []
    for key in ("ls-high", "cauchy"):
        p = ctx.problems[key]
        means = [frank_wolfe(p, T).mean_gap for T in Ts]
        slope, stderr = bounds.fit_rate_exponent(Ts[tail:], means[tail:])
        slope_all, stderr_all = bounds.fit_rate_exponent(Ts, means)
        curve = [bounds.fw_gap_bound(p.M, p.beta, p.D, T) for T in Ts]
        ctx.curves.setdefault("fw_rate", {})[key] = {"T": Ts, "mean_gap": means, "bound": curve, "slope": slope,
                                                     "label": p.name, "fit_from": Ts[tail]}
        out.append(CheckResult(
            f"rate-exponent/{key}",
            f"slope of log mean gap vs log T (T >= {Ts[tail]}) <= -1/2 + {RATE_TOLERANCE:g}", slope,
            -0.5 + RATE_TOLERANCE, "<=", "rate",
            {"problem": p.name, "T": Ts, "mean_gap": means, "bound": curve, "stderr": stderr,
             "slope_all": slope_all, "stderr_all": stderr_all,
             "ratio_to_bound": [m / b for m, b in zip(means, curve)]},
        ))
    return out


# --------------------------------------------------------------------------------------------
# RAC-LoRA


def _rac_runs(p: Problem, T: int, rank: int, seeds: int, base_seed: int):
    return [rac_projected_gd(p, T, rank, seed=base_seed + s) for s in range(seeds)]


def check_rac_nonconvex(ctx: Context) -> list[CheckResult]:
    """RAC-LoRA smooth non-convex bound (Monte Carlo over sketch seeds) and its pathwise core."""
    T, seeds = ctx.size(200, 1000), ctx.size(16, 64)
    out = []
    for key in ("cauchy", "logistic"):
        p = ctx.problems[key]
        runs = _rac_runs(p, T, ctx.rac_rank, seeds, ctx.seed * 1000)
        gamma, lam = runs[0].step, runs[0].extra["lambda"]
        gap0 = p.value(p.W0) - p.f_star
        mean_sq = np.mean([r.grad_sq[:T] for r in runs], axis=0)
        bound = bounds.rac_nonconvex_bound(gap0, lam, gamma, T)
        out.append(CheckResult(
            f"rac-nonconvex/{key}", "min_t E||grad f(W_t)||^2 <= 2 (f(W0) - f*) / (lambda gamma T)",
            float(mean_sq.min()), bound, "<=", "theorem",
            {"problem": p.name, "T": T, "seeds": seeds, "lambda": lam, "gamma": gamma, "rank": ctx.rac_rank,
             "mean_over_t": float(mean_sq.mean()), "f_star_exact": p.f_star_exact},
        ))
        descent = max(0.5 * gamma * float(np.sum(r.extra["quad"])) for r in runs)
        out.append(CheckResult(
            f"rac-descent/{key}", "pathwise (gamma/2) sum_t <g_t, H_t g_t> <= f(W0) - f*",
            descent, gap0, "<=", "theorem", {"problem": p.name, "T": T, "seeds": seeds},
        ))
    return out


def _pl_result(name: str, p: Problem, losses: np.ndarray, gamma: float, lam: float, extra: dict) -> CheckResult:
    """Worst t of E f(W_t) - f* against (1 - gamma mu lambda)^t (f(W0) - f*)."""
    gap = losses - p.f_star
    t = np.arange(len(gap))
    curve = np.array([bounds.rac_pl_bound(gap[0], lam, gamma, p.mu, int(s)) for s in t])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(np.isfinite(gap), gap / curve, np.inf)
    worst = 1 + int(np.argmax(ratios[1:]))  # t = 0 is equality by definition
    return CheckResult(
        name, "max_(t>=1) [E f(W_t) - f*] / [(1 - gamma mu lambda)^t (f(W0) - f*)] <= 1",
        float(gap[worst]), float(curve[worst]), "<=", "theorem",
        {"problem": p.name, "worst_t": worst, "T": len(gap) - 1, "final_gap": float(gap[-1]),
         "final_bound": float(curve[-1]), "gamma": gamma, "mu": p.mu, "lambda": lam, **extra},
    )


def check_rac_pl(ctx: Context) -> list[CheckResult]:
    """RAC-LoRA linear rate under PL: numpy projected GD and the real chain (rac re-init)."""
    T, seeds = ctx.size(200, 1000), ctx.size(16, 64)
    out = []
    for key in ("ls-low", "logistic", "quadratic"):
        p = ctx.problems[key]
        runs = _rac_runs(p, T, ctx.rac_rank, seeds, ctx.seed * 1000 + 7)
        mean_losses = np.mean([r.losses for r in runs], axis=0)
        res = _pl_result(f"rac-pl/{key}", p, mean_losses, runs[0].step, runs[0].extra["lambda"],
                         {"seeds": seeds, "rank": ctx.rac_rank, "f_star_exact": p.f_star_exact})
        out.append(res)
        gap = mean_losses - p.f_star
        ctx.curves.setdefault("rac_pl", {})[key] = {
            "gap": gap, "label": p.name,
            "bound_curve": [bounds.rac_pl_bound(gap[0], res.details["lambda"], res.details["gamma"], p.mu, t)
                            for t in range(len(gap))],
        }
    for key in ("ls-low", "quadratic"):  # the per-step inequality, with the exact expectation
        p = ctx.problems[key]
        traj = rac_projected_gd(p, T, ctx.rac_rank, seed=ctx.seed, keep_iterates=True)
        gamma, lam = traj.step, traj.extra["lambda"]
        worst = (-math.inf, 0.0, 0.0, 0)
        for t, (W, f) in enumerate(zip(traj.extra["iterates"], traj.losses)):
            expected = rac_expected_next_value(p, W, ctx.rac_rank, gamma) - p.f_star
            allowed = (1.0 - gamma * p.mu * lam) * (f - p.f_star)
            if expected / allowed > worst[0]:
                worst = (expected / allowed, expected, allowed, t)
        out.append(CheckResult(
            f"rac-pl-step/{key}", "max_t E[f(W_t+1) | W_t] - f* <= (1 - gamma mu lambda)(f(W_t) - f*)  [exact E]",
            worst[1], worst[2], "<=", "theorem",
            {"problem": p.name, "worst_t": worst[3], "T": T, "gamma": gamma, "mu": p.mu, "lambda": lam,
             "rank": ctx.rac_rank},
        ))
    p = ctx.problems["quadratic"]
    chain_seeds = ctx.size(6, 24)
    runs = [rac_chain(p, T, ctx.rac_rank, seed=ctx.seed * 1000 + s).trajectory for s in range(chain_seeds)]
    mean_losses = np.mean([r.losses for r in runs], axis=0)
    out.append(_pl_result("rac-pl/quadratic-chain", p, mean_losses, runs[0].step, runs[0].extra["lambda"],
                          {"seeds": chain_seeds, "rank": ctx.rac_rank, "via": "cola.Chain, reinit rac, SketchedGD"}))
    return out


def check_counterexample(ctx: Context) -> list[CheckResult]:
    """RAC-LoRA's toy quadratic, everything at step 1/L through cola.Chain (LoRA scaling 2).

    LoRA (one link) and COLA (10 links) train both factors with SGD; asymmetric LoRA keeps one
    random B for the whole run; RAC-LoRA re-draws it every step. The first row passes when
    RAC-LoRA ends below all three. The second row is COLA with a knot after every step: from
    B = 0 a single step trains only B against the random A (grad_A = 0 at B = 0), a randomised
    sketched step much like RAC-LoRA's; it is compared with RAC-LoRA's PL bound.
    """
    p = ctx.problems["quadratic"]
    T, r = ctx.size(300, 1000), ctx.rac_rank
    lr = 1.0 / p.beta
    runs = {
        "LoRA": train_chain(p, T, 1, r, optimizer="sgd", lr=lr, seed=ctx.seed),
        "COLA (10 links)": train_chain(p, T, 10, r, optimizer="sgd", lr=lr, seed=ctx.seed),
        "asymmetric LoRA": rac_chain(p, T, r, train="A", link_steps=T, seed=ctx.seed),
        "RAC-LoRA": rac_chain(p, T, r, seed=ctx.seed),
        "COLA (knot every step)": train_chain(p, T, T, r, optimizer="sgd", lr=lr, seed=ctx.seed),
    }
    finals, status = {}, {}
    for label, run in runs.items():
        traj = run.trajectory
        gap = traj.losses - p.f_star
        diverged = traj.extra.get("diverged_at")
        finals[label] = math.inf if diverged is not None else float(gap[-1])
        status[label] = f"diverged at step {diverged}" if diverged is not None else f"final f - f* = {gap[-1]:.3g}"
    ctx.curves["counterexample"] = {label: run.trajectory.losses - p.f_star for label, run in runs.items()}
    ctx.curves["counterexample_floor"] = p.low_rank_floor(r) - p.f_star
    baselines = ("LoRA", "COLA (10 links)", "asymmetric LoRA")
    rac = runs["RAC-LoRA"].trajectory
    pl_bound = bounds.rac_pl_bound(p.M, rac.extra["lambda"], rac.step, p.mu, T)
    details = {"problem": p.name, "T": T, "rank": r, "lr": lr, "lora_scaling": 2.0, "status": status,
               "lora_rank_floor": p.low_rank_floor(r) - p.f_star}
    return [
        CheckResult(
            "counterexample/quadratic",
            "at step 1/L, RAC-LoRA's final f - f* <= best of LoRA, COLA (10 links), asymmetric LoRA",
            finals["RAC-LoRA"], min(finals[b] for b in baselines), "<=", "claim", details,
        ),
        CheckResult(
            "counterexample/cola-every-step",
            "COLA with a knot every step, at step 1/L: final f - f* <= RAC-LoRA's PL bound",
            finals["COLA (knot every step)"], pl_bound, "<=", "claim", details,
        ),
    ]


# --------------------------------------------------------------------------------------------
# The practical chain


def _restricted_rank(p: Problem, rank: int) -> int:
    """The link rank, lowered where needed so that one link cannot reach every W (LoRA is rank-limited)."""
    return max(1, min(rank, min(p.shape) // 2))


def check_practical_chain(ctx: Context) -> list[CheckResult]:
    """LoRA vs COLA (Adam, even links, same budget) on every problem; on least squares of target
    rank > r also 2/3 links, the full update and LoRA's exact rank-r floor."""
    T = ctx.size(600, 2000)
    lr = 1e-2
    out = []
    p = ctx.problems["ls-high"]
    r = _restricted_rank(p, ctx.rank)
    runs = {m: train_chain(p, T, m, r, optimizer="adam", lr=lr, seed=ctx.seed) for m in (1, 2, 3, 5)}
    full = train_full(p, T, optimizer="adam", lr=lr, seed=ctx.seed)
    floor = p.low_rank_floor(r)
    ctx.curves["practical"] = {
        "LoRA (1 link)" if m == 1 else f"COLA, {m} links": run.trajectory.losses - p.f_star for m, run in runs.items()
    }
    ctx.curves["practical"]["full update"] = full.trajectory.losses - p.f_star
    ctx.curves["practical_floor"] = floor - p.f_star
    eff = {m: [h.get("effective_rank", {}).get("linear") for h in run.history] for m, run in runs.items()}
    finals = {m: float(run.trajectory.losses[-1] - p.f_star) for m, run in runs.items()}
    details = {"problem": p.name, "T": T, "rank": r, "lr": lr, "target_rank": p.info["target_rank"],
               "final_f_minus_fstar": {str(m): v for m, v in finals.items()}, "f_star": p.f_star,
               "full_update_final_f_minus_fstar": float(full.trajectory.losses[-1] - p.f_star),
               "effective_rank_at_knots": {str(m): v for m, v in eff.items()}}
    out += [
        CheckResult("lora-floor/ls-high",
                    f"LoRA (rank {r}) final f - f* >= rank-{r} floor (1/2n) sum_(i>{r}) sigma_i(X W_ls)^2",
                    finals[1], floor - p.f_star, ">=", "theorem", details),
        CheckResult("cola-beats-floor/ls-high", f"COLA (5 links of rank {r}) final f - f* <= LoRA's rank-{r} floor",
                    finals[5], floor - p.f_star, "<=", "claim", details),
        CheckResult("cola-vs-lora/ls-high", "COLA (5 links) final f - f* <= LoRA's, same steps",
                    finals[5], finals[1], "<=", "claim", details),
    ]
    for key in ("ls-low", "cauchy", "logistic", "quadratic"):
        p = ctx.problems[key]
        r = _restricted_rank(p, ctx.rank)
        lora = train_chain(p, T, 1, r, optimizer="adam", lr=lr, seed=ctx.seed).trajectory
        cola5 = train_chain(p, T, 5, r, optimizer="adam", lr=lr, seed=ctx.seed).trajectory
        out.append(CheckResult(
            f"cola-vs-lora/{key}", "COLA (5 links) final f - f* <= LoRA's, same steps",
            float(cola5.losses[-1] - p.f_star), float(lora.losses[-1] - p.f_star), "<=", "claim",
            {"problem": p.name, "T": T, "rank": r, "lr": lr, "f_star": p.f_star,
             "target_rank": p.info.get("target_rank")},
        ))
    return out


CHECKS: dict[str, Callable[[Context], list[CheckResult]]] = {
    "constants": check_constants,
    "fw-exact": check_fw_exact,
    "fw-stochastic": check_fw_stochastic,
    "fw-chain": check_fw_chain,
    "fw-rate": check_fw_rate,
    "rac-nonconvex": check_rac_nonconvex,
    "rac-pl": check_rac_pl,
    "counterexample": check_counterexample,
    "practical-chain": check_practical_chain,
}


def run_checks(names: list[str] | None = None, ctx: Context | None = None,
               progress: Callable[[str], None] | None = None) -> tuple[list[CheckResult], Context]:
    """Run the named check groups (all by default); returns the rows and the context (curves)."""
    ctx = ctx or Context()
    names = list(CHECKS) if not names else names
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    results = []
    for name in names:
        start = time.perf_counter()
        rows = CHECKS[name](ctx)
        seconds = time.perf_counter() - start
        for row in rows:
            row.details.setdefault("group", name)
            row.details.setdefault("group_seconds", seconds)
        log.info("check %s: %d rows, %d failed, %.2f s", name, len(rows), sum(not r.passed for r in rows), seconds)
        results += rows
        if progress is not None:
            progress(name)
    return results, ctx
