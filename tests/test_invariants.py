"""The invariants of design.md, as hypothesis properties over shapes, ranks, dtypes and strategies."""

import pytest
import torch
from hypothesis import example, given, strategies as st

import cola
from helpers import MLP, batches, make_chain, train

REINITS = {
    "lora": {}, "gaussian": {}, "pissa": {}, "rac": {"train": "bernoulli"}, "orthogonal": {},
    "fw": {"init": "both", "oversample": 2},  # both factors from the gradient: the fold-out is exercised
}
FOLDS_OUT = ("pissa", "fw")  # re-inits that put weight into both factors and fold it out

shapes = st.tuples(st.integers(2, 12), st.integers(2, 12))


def _one_layer_chain(d_in, d_out, rank, reinit, dtype, seed, **cfg):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, dtype=dtype))
    cola.inject_lora(model, ["0"], rank=rank, alpha=2 * rank)
    config = cola.ChainConfig(total_steps=100, links=1, reinit=reinit, reinit_options=REINITS[reinit], seed=seed, **cfg)
    chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.1), config)
    return model, chain


def _knot(chain, model, x):
    """Tie a knot with a closure (a loss on ``x``), so that re-inits that probe the gradient (fw) do."""
    def closure():
        chain.zero_grad()
        loss = model(x).float().pow(2).mean()
        loss.backward()
        return loss

    return chain.tie_knot(closure=closure)


def _perturb(chain, gen):
    """Give the live link a non-trivial value, as training would."""
    with torch.no_grad():
        for layer in chain.layers.values():
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=gen).to(layer.lora_A.dtype))
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=gen).to(layer.lora_B.dtype))


# 1. A knot does not change the function, for every built-in re-init strategy.
@given(shape=shapes, rank=st.integers(1, 4), reinit=st.sampled_from(sorted(REINITS)),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_knot_leaves_outputs_unchanged(shape, rank, reinit, dtype, seed):
    d_in, d_out = shape
    rank = min(rank, d_in, d_out)
    model, chain = _one_layer_chain(d_in, d_out, rank, reinit, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, d_in, generator=gen, dtype=dtype)
    for _ in range(3):
        _perturb(chain, gen)
        before = model(x).detach()
        _knot(chain, model, x)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(model(x), before, atol=tol * (1 + before.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("reinit", sorted(REINITS))
def test_knot_leaves_outputs_unchanged_in_bf16(reinit):
    model, chain = _one_layer_chain(16, 12, 4, reinit, torch.bfloat16, 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen, dtype=torch.bfloat16)
    _perturb(chain, gen)
    before = model(x).float().detach()
    _knot(chain, model, x)
    after = model(x).float()
    # bf16 has 8 bits of mantissa: agreement to a few bf16 roundings of the output scale
    assert (after - before).abs().max() <= 0.05 * (1 + before.abs().max())


# 2. After links 1..m: W = W0 + sum_j s_j B_j A_j (float64 reference); the rank can exceed r.
def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at |x| (elementwise; subnormal spacing near zero)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))) * info.eps


def _live(layer) -> torch.Tensor:
    """The live link's ``s B A`` in float64, from the factors as stored."""
    return layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@given(shape=shapes, rank=st.integers(1, 3), links=st.integers(2, 5),
       reinit_dtype=st.sampled_from([(r, d) for r in sorted(REINITS) for d in DTYPES]),
       seed=st.integers(0, 2**16))
def test_merged_weight_is_the_sum_of_the_links(shape, rank, links, reinit_dtype, seed):
    _check_merged_weight(shape, rank, links, *reinit_dtype, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_weight_is_the_sum_of_the_links_pissa_low_precision(dtype):
    """PiSSA folds out exactly what its bf16/fp16 factors hold (they were once rounded after the fold-out)."""
    _check_merged_weight((8, 6), 2, 3, "pissa", dtype, 0)


def _check_merged_weight(shape, rank, links, reinit, dtype, seed):
    """W = W0 + sum_j s (B_j A_j at the knot - B_j A_j at the link's start), in float64 from the factors
    as stored: the start term is zero for LoRA-style inits (B or A zero) and is what PiSSA-style ones
    fold out of the weight. fp32 bases to fp32 accuracy; bf16/fp16 ones to one final rounding of the
    exact sum (plus 2^-8 of a rounding per knot at the entry's largest magnitude: the bf16 residual)."""
    d_in, d_out = shape
    rank = min(rank, d_in, d_out)
    torch.manual_seed(seed)  # the weight _one_layer_chain starts from, before link 0's re-init
    W0 = torch.nn.Linear(d_in, d_out, dtype=dtype).weight.detach().double()
    _, chain = _one_layer_chain(d_in, d_out, rank, reinit, dtype, seed)
    layer = chain.layers["0"]
    gen = torch.Generator().manual_seed(seed)
    expected = W0 - _live(layer)
    peak = torch.maximum(W0.abs(), expected.abs())  # largest magnitude each entry (or a term of it) had
    x = torch.randn(7, d_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    for _ in range(links):
        _perturb(chain, gen)
        learned = _live(layer)
        _knot(chain, chain.model, x)
        start = _live(layer)
        expected += learned - start
        peak = torch.maximum(peak, torch.maximum(expected.abs(), learned.abs() + start.abs()))
    stored = layer.base.weight.detach().double()
    if dtype == torch.float32:
        torch.testing.assert_close(stored, expected, atol=1e-4, rtol=1e-5)
    else:
        tol = 0.5 * _ulp(expected, dtype) + (links + 1) * (2 ** -8 * _ulp(peak, dtype) + 2 ** -22 * peak)
        worst = ((stored - expected).abs() / tol).max().item()
        assert worst <= 1.0, f"{reinit} {dtype}: error {worst:.3g} x the allowed one final rounding"
    B, A = cola.stacked_factors(layer)  # the chain as one adapter: W0 + B A is the layer's function
    atol = 1e-4 if dtype == torch.float32 else 2.0 * float(tol.max())
    torch.testing.assert_close(W0 + B.double() @ A.double(), expected + _live(layer), atol=atol, rtol=1e-5)
    if reinit not in FOLDS_OUT:  # folded-out starts add rank of their own
        accumulated_rank = torch.linalg.matrix_rank(expected - W0, rtol=1e-6)
        assert accumulated_rank == min(links * rank, d_in, d_out)


def test_the_properties_cover_every_built_in_reinit(pm):
    builtin = {name for name, reg in pm.strategies("reinit").items() if reg.factory.__module__.startswith("cola_plugins.")}
    assert set(REINITS) == builtin


# 3. bf16/fp16 bases: the error after 20 knots is one final rounding, not 20.
@pytest.mark.parametrize("compensation", ["auto", "device", "host"])
def test_bf16_merge_error_does_not_grow_with_knots(compensation):
    """The precision guarantee holds wherever the compensation buffer lives (issue 14: host memory by
    default on accelerators; on this CPU both places are host memory, so this checks the arithmetic)."""
    torch.manual_seed(0)
    errors = {}
    for dtype in (torch.bfloat16, torch.float16):
        model, chain = _one_layer_chain(64, 48, 4, "lora", dtype, 0, compensation=compensation)
        assert chain.layers["0"].compensation == ("device" if compensation == "auto" else compensation)
        layer = chain.layers["0"]
        exact = layer.base.weight.detach().double().clone()
        gen = torch.Generator().manual_seed(1)
        errs = []
        for _ in range(20):
            with torch.no_grad():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.05)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
            exact += layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
            chain.tie_knot()
            stored = layer.base.weight.detach().double()
            # the best a bf16 weight can do is round the exact value once
            one_rounding = (exact.to(dtype).double() - exact).abs().max()
            errs.append(float((stored - exact).abs().max() / one_rounding))
        errors[dtype] = errs
        # the bf16 residual carries 8 more bits: at most one rounding plus 2^-8 of one, at every knot
        assert max(errs) <= 1.0 + 2 ** -7, errs
    # and a naive in-place bf16 accumulation would be far worse: sanity-check the test's power
    naive = torch.zeros(48, 64, dtype=torch.bfloat16)
    exact = torch.zeros(48, 64, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        upd = torch.randn(48, 64, generator=gen, dtype=torch.float64) * 1e-3
        naive += upd.to(torch.bfloat16)
        exact += upd
    assert (naive.double() - exact).abs().max() > 2 * (exact.to(torch.bfloat16).double() - exact).abs().max()


# 4. Schedules give ranks in [1, min(in, out)]; knots strictly increasing inside [1, T].
@given(T=st.integers(1, 500), links=st.integers(1, 20), every=st.integers(1, 60))
def test_merge_policies_plan_strictly_increasing_knots_inside_T(T, links, every, pm):
    links = min(links, T)
    cfgs = [cola.ChainConfig(total_steps=T, links=links),
            cola.ChainConfig(total_steps=T, merge_policy="every", merge_policy_options={"every": every})]
    for cfg in cfgs:
        policy = pm.create("merge_policy", cfg.merge_policy, cfg, cfg.options("merge_policy"))
        knots = policy.planned_knots()
        assert all(1 <= k <= T for k in knots)
        assert all(b > a for a, b in zip(knots, knots[1:]))
        fired = [t for t in range(1, T + 1) if policy.is_knot(cola.StepInfo(t, T, 0, 0, None))]
        assert fired == knots
    even = pm.create("merge_policy", "even", cfgs[0])
    assert len(even.planned_knots()) == links - 1


@given(base=st.integers(1, 16), link=st.integers(0, 30),
       name_opts=st.sampled_from([("constant", {}), ("list", {"ranks": [8, 4, 2]}),
                                  ("step-down", {"later_rank": 2}), ("geometric", {"factor": 0.5}),
                                  ("geometric", {"factor": 2.0, "max_rank": 12})]))
def test_rank_schedules_give_ranks_at_least_one(base, link, name_opts, pm):
    name, opts = name_opts
    sched = pm.create("rank_schedule", name, cola.ChainConfig(total_steps=10), opts)
    r = sched.rank(link, base)
    assert isinstance(r, int) and r >= 1
    if name == "geometric" and "max_rank" in opts:
        assert r <= 12


@st.composite
def knot_configs(draw):
    """A ``knots`` merge policy: explicit steps (config.knots or the option) or ``at`` fractions."""
    T = draw(st.integers(1, 40))
    how = draw(st.sampled_from(["config", "option", "at"]))
    if how == "at":
        at = sorted(draw(st.lists(st.floats(0.01, 0.99), min_size=1, max_size=4, unique=True)))
        return T, {"merge_policy": "knots", "merge_policy_options": {"at": at}}
    knots = sorted(draw(st.lists(st.integers(1, T), min_size=1, max_size=6, unique=True)))
    if how == "config":
        return T, {"merge_policy": "knots", "knots": knots}
    return T, {"merge_policy": "knots", "merge_policy_options": {"knots": knots}}


@given(T_cfg=knot_configs())
def test_knots_policy_plans_strictly_increasing_knots_inside_T(T_cfg, pm):
    """Explicit steps are the knots; ``at`` fractions give the nearest steps, strictly increasing in
    [1, T-1], or a ConfigError that names ``at``; the policy fires exactly at its planned knots."""
    T, kwargs = T_cfg
    cfg = cola.ChainConfig(total_steps=T, links=1, **kwargs)
    at = kwargs.get("merge_policy_options", {}).get("at")
    try:
        policy = pm.create("merge_policy", "knots", cfg, cfg.options("merge_policy"))
    except cola.ConfigError as err:
        assert at is not None and "at=" in str(err), err  # only fractions may collide after rounding
        return
    knots = policy.planned_knots()
    assert knots and all(1 <= k <= T for k in knots) and all(b > a for a, b in zip(knots, knots[1:]))
    if at is None:
        assert knots == (cfg.knots or kwargs["merge_policy_options"]["knots"])
    else:
        assert len(knots) == len(at) and all(abs(k - T * a) <= 0.5 for k, a in zip(knots, at)) and knots[-1] < T
    fired = [t for t in range(1, T + 1) if policy.is_knot(cola.StepInfo(t, T, 0, 0, None))]
    assert fired == knots


def _layer_limits(chain) -> dict[str, int]:
    return {name: min(layer.in_features, layer.out_features) for name, layer in chain.layers.items()}


def _check_ranks(chain) -> None:
    for name, limit in _layer_limits(chain).items():
        layer = chain.layers[name]
        assert 1 <= layer.rank <= limit and layer.lora_A.shape[0] == layer.lora_B.shape[1] == layer.rank


# the MLP's layers: fc1 is 16x12, fc2 10x16, so min(in, out) is 12 and 10: ranks 11 (above fc2's bound
# only) and 13 (above both) now and then
rank_lists = st.lists(st.sampled_from([*range(1, 11), *range(1, 11), 11, 13]), min_size=1, max_size=5)


@given(T_cfg=knot_configs(), ranks=rank_lists)
def test_a_chain_with_planned_knots_ties_them_with_ranks_inside_the_layer_bounds(T_cfg, ranks):
    """The chain refuses up front a plan with a rank above min(in, out) (naming it), else trains
    and ties exactly the planned knots, every link's rank in [1, min(in, out)] of every layer."""
    T, kwargs = T_cfg
    cfg = cola.ChainConfig(total_steps=T, links=1, rank_schedule="list", rank_schedule_options={"ranks": ranks},
                           **kwargs)
    try:
        planned = cola.get_plugin_manager().create("merge_policy", "knots", cfg,
                                                   cfg.options("merge_policy")).planned_knots()
    except cola.ConfigError:
        return  # colliding fractions: the previous property
    wanted = [ranks[min(i, len(ranks) - 1)] for i in range(len(planned) + 1)]
    too_big = [r for r in wanted if r > 10]
    try:
        model, chain = make_chain(cfg)
    except cola.ConfigError as err:
        assert too_big and f"rank {too_big[0]}" in str(err), (wanted, err)
        return
    assert not too_big, wanted
    _check_ranks(chain)
    for step, batch in enumerate(batches(T), 1):
        train(model, chain, [batch])
        _check_ranks(chain)
        assert chain.link == sum(k <= step for k in planned)
    assert [r.step for r in chain.history] == planned
    assert [r.new_rank for r in chain.history] == wanted[1:]


@given(T=st.integers(2, 30), losses=st.lists(st.floats(0, 4), min_size=30, max_size=30),
       patience=st.integers(1, 4), min_link_steps=st.integers(1, 5), smoothing=st.sampled_from([0.0, 0.5]),
       min_delta=st.sampled_from([0.0, 0.1]), ranks=rank_lists)
def test_plateau_knots_decided_while_training_stay_inside_T_and_the_rank_bounds(
        T, losses, patience, min_link_steps, smoothing, min_delta, ranks, pm):
    """Driven by a loss sequence, the plateau policy's knots are strictly increasing inside [1, T-1],
    links at least ``min_link_steps`` long; the chain ties exactly the knots the policy decides on its
    own, each link's rank in [1, min(in, out)]; a rank above the bound, known only at its knot, is a
    ConfigError that leaves the chain as it was (weights, links, history, ranks)."""
    opts = {"patience": patience, "min_link_steps": min_link_steps, "smoothing": smoothing, "min_delta": min_delta}
    cfg = cola.ChainConfig(total_steps=T, links=1, merge_policy="plateau", merge_policy_options=opts,
                           rank_schedule="list", rank_schedule_options={"ranks": ranks})
    # the policy alone, fed the losses: the knots it decides
    policy, link, last, decided = pm.create("merge_policy", "plateau", cfg, opts), 0, 0, []
    for t in range(1, T + 1):
        if policy.is_knot(cola.StepInfo(t, T, link, last, losses[t - 1])):
            decided.append(t)
            link, last = link + 1, t
    assert all(1 <= k < T for k in decided) and all(b > a for a, b in zip(decided, decided[1:]))
    assert all(b - a >= min_link_steps for a, b in zip([0, *decided], decided))
    if ranks[0] > 10:  # link 0's rank is known up front
        with pytest.raises(cola.ConfigError, match=f"rank {ranks[0]} for link 0"):
            make_chain(cfg)
        return
    model, chain = make_chain(cfg)
    for t, (x, y) in enumerate(batches(T), 1):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        layers = list(chain.layers.values())
        before = {"link": chain.link, "history": len(chain.history), "ranks": [layer.rank for layer in layers],
                  "weights": [layer.base.weight.clone() for layer in layers]}
        next_rank = ranks[min(chain.link + 1, len(ranks) - 1)]
        if t in decided and next_rank > 10:
            with pytest.raises(cola.ConfigError, match=f"rank {next_rank} for link {chain.link + 1}"):
                chain.step(losses[t - 1])
            assert before["link"] == chain.link and before["history"] == len(chain.history)
            assert before["ranks"] == [layer.rank for layer in chain.layers.values()]
            assert all(torch.equal(w, layer.base.weight) for w, layer in zip(before["weights"], chain.layers.values()))
            _check_ranks(chain)
            return
        chain.step(losses[t - 1])
        chain.zero_grad()
        _check_ranks(chain)
        assert chain.link == sum(k <= t for k in decided)
    assert [r.step for r in chain.history] == decided


def test_chain_refuses_a_schedule_above_the_layer_rank():
    cfg = cola.ChainConfig(total_steps=10, links=2, rank_schedule="list", rank_schedule_options={"ranks": [2, 50]})
    with pytest.raises(cola.ConfigError, match="rank 50 for link 1"):
        make_chain(cfg)


def test_rank_step_down_changes_the_link_rank():
    cfg = cola.ChainConfig(total_steps=20, links=2, rank_schedule="step-down", rank_schedule_options={"later_rank": 2})
    model, chain = make_chain(cfg, rank=4)
    assert chain.planned_ranks() == [4, 2]
    train(model, chain, batches(20))
    assert all(layer.rank == 2 for layer in chain.layers.values())
    assert chain.history[0].new_rank == 2


# 5. Save at any step (including exactly at a knot), load, continue: identical on CPU.
CONFIGS = [
    dict(links=3),
    dict(merge_policy="every", merge_policy_options={"every": 4}, optimizer_policy="prune",
         lr_policy="rewarm", lr_policy_options={"steps": 3}, lr_schedule="cosine", warmup_steps=2),
    dict(merge_policy="plateau", merge_policy_options={"patience": 2, "smoothing": 0.0}, reinit="rac",
         reinit_options={"train": "bernoulli"}, optimizer_policy="keep", lr_policy="restart", lr_schedule="linear"),
    dict(links=3, reinit="orthogonal", rank_schedule="list", rank_schedule_options={"ranks": [4, 2, 3]}),
    dict(links=2, reinit="pissa", merge_rule="svd-truncate", merge_rule_options={"rank": 2}),
]


def _step_lr(optimizer):
    """A user's own LR scheduler (stepped by the chain after each step, saved and loaded with it)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)


BF16 = {"dtype": torch.bfloat16}  # a bf16 base: its compensation buffer (residual) exists from the first knot
SETUPS = [(cfg, {}) for cfg in CONFIGS] + [
    (dict(links=3), BF16),
    (dict(links=3, lr_policy="restart", optimizer_policy="keep"), {"scheduler": _step_lr}),
    (dict(merge_policy="every", merge_policy_options={"every": 5}, reinit="pissa", lr_schedule="cosine"),
     {**BF16, "scheduler": _step_lr}),
]
KNOT_OF_SETUP = {len(CONFIGS): 6, len(CONFIGS) + 1: 12, len(CONFIGS) + 2: 10}  # a knot step of each




@st.composite
def resume_points(draw):
    setup = draw(st.integers(0, len(SETUPS) - 1))
    return setup, draw(st.integers(0, 18))


@given(setup_save_at=resume_points())
@example(setup_save_at=(len(CONFIGS) + 1, 12)).via("user scheduler, saved exactly at a knot")
@example(setup_save_at=(len(CONFIGS) + 1, 13)).via("user scheduler, saved right after a knot")
def test_save_load_continue_is_identical(setup_save_at):
    _check_resume(*setup_save_at)


@pytest.mark.parametrize("setup,save_at", [(len(CONFIGS), 6), (len(CONFIGS), 9), (len(CONFIGS) + 2, 10)],
                         ids=["bf16-at-a-knot", "bf16-mid-link", "bf16-scheduler-at-a-knot"])
def test_save_load_continue_is_identical_with_a_bf16_residual(setup, save_at):
    _check_resume(setup, save_at)


def _check_resume(setup, save_at):
    T = 18
    cfg_kwargs, chain_kwargs = SETUPS[setup]
    cfg = cola.ChainConfig(total_steps=T, seed=3, **cfg_kwargs)
    dtype = chain_kwargs.get("dtype", torch.float32)
    data = [(x.to(dtype), y.to(dtype)) for x, y in batches(T)]
    model, chain = make_chain(cfg, dropout=0.1, **chain_kwargs)
    reference = train(model, chain, data)
    ref_weights = {k: v.clone() for k, v in model.state_dict().items()}
    ref_residuals = {n: layer.residual for n, layer in chain.layers.items()}

    model2, chain2 = make_chain(cfg, dropout=0.1, **chain_kwargs)
    train(model2, chain2, data[:save_at])
    if setup in KNOT_OF_SETUP and save_at == KNOT_OF_SETUP[setup]:
        assert chain2.history[-1].step == save_at  # the examples above do save exactly at a knot
    state = chain2.state_dict()
    if dtype != torch.float32 and chain2.history:  # the property covers the compensation buffer
        assert all(layer["residual"] is not None for layer in state["layers"].values())
    # a fresh process would rebuild model and chain from scratch, then load
    model3, chain3 = make_chain(cfg, dropout=0.1, **chain_kwargs)
    chain3.load_state_dict(state)
    resumed = train(model3, chain3, data[save_at:])
    assert resumed == reference[save_at:]
    assert [r.step for r in chain3.history] == [r.step for r in chain.history]
    for k, v in model3.state_dict().items():
        assert torch.equal(v, ref_weights[k]), k
    for name, layer in chain3.layers.items():  # the buffer (not in the model's state_dict) too
        assert (layer.residual is None) == (ref_residuals[name] is None)
        assert layer.residual is None or torch.equal(layer.residual, ref_residuals[name]), name
    if "scheduler" in chain_kwargs:
        assert chain3.scheduler.state_dict() == chain.scheduler.state_dict()
        assert chain3.optimizer.param_groups[0]["lr"] == chain.optimizer.param_groups[0]["lr"] == 1e-2 * 0.5 ** 4


def test_save_exactly_at_a_knot_through_a_file(tmp_path):
    cfg = cola.ChainConfig(total_steps=12, links=3)
    data = list(batches(12))
    model, chain = make_chain(cfg)
    train(model, chain, data)
    model2, chain2 = make_chain(cfg)
    train(model2, chain2, data[:4])
    assert chain2.history and chain2.history[-1].step == 4  # step 4 is a knot
    cola.save_checkpoint(tmp_path / "chain.pt", chain2.state_dict())
    model3, chain3 = make_chain(cfg)
    chain3.load_state_dict(cola.load_checkpoint(tmp_path / "chain.pt"))
    train(model3, chain3, data[4:])
    for (k, v), v3 in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(v, v3), k


def test_load_with_a_different_config_lists_the_fields():
    model, chain = make_chain(cola.ChainConfig(total_steps=12, links=3))
    state = chain.state_dict()
    _, other = make_chain(cola.ChainConfig(total_steps=12, links=2, seed=5))
    with pytest.raises(cola.ConfigError, match=r"links \(saved 3, now 2\).*seed \(saved 0, now 5\)"):
        other.load_state_dict(state)


# 6. The chain exported as one adapter (rank = sum of links) reproduces the fine-tuned model.
@given(links=st.integers(1, 4), reinit=st.sampled_from(["lora", "pissa", "orthogonal"]), seed=st.integers(0, 100))
def test_stacked_adapter_reproduces_the_model(links, reinit, seed):
    torch.manual_seed(seed)
    model = MLP()
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    cola.inject_lora(model, ["fc1", "fc2"], rank=2)
    cfg = cola.ChainConfig(total_steps=12, links=links, reinit=reinit, seed=seed)
    chain = cola.Chain(model, lambda p: torch.optim.Adam(p, lr=0.05), cfg)
    train(model, chain, batches(12, seed=seed))
    x = torch.randn(4, 12)
    expected = model(x)
    plain = MLP()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and "base." not in k},
                          strict=False)
    for name, (B, A) in chain.stacked_factors().items():
        layer = chain.layers[name]
        target = getattr(plain, name)
        target.bias.data.copy_(layer.base.bias)
        target.weight.data.copy_(W0[name] + B @ A)
        assert B.shape[1] == A.shape[0] == sum(a.shape[0] for _, a, _ in layer.links) + layer.rank
    torch.testing.assert_close(plain(x), expected, atol=1e-4, rtol=1e-4)


def test_load_onto_a_different_base_model_is_refused():
    model, chain = make_chain(cola.ChainConfig(total_steps=12, links=3), seed=0)
    state = chain.state_dict()
    assert state["versions"]["chain-of-lora"] == cola.__version__
    other_model, other = make_chain(cola.ChainConfig(total_steps=12, links=3), seed=0)
    with torch.no_grad():
        other_model.fc1.base.bias.add_(1.0)   # a frozen parameter the chain never changes
    with pytest.raises(cola.ConfigError, match=r"model differs .* fc1.base.bias"):
        other.load_state_dict(state)
