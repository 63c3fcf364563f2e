"""The invariants of design.md, as hypothesis properties over shapes, ranks, dtypes and strategies."""

import pytest
import torch
from hypothesis import given, strategies as st

import cola
from helpers import MLP, batches, make_chain, train

REINITS = {
    "lora": {}, "gaussian": {}, "pissa": {}, "rac": {"train": "bernoulli"}, "orthogonal": {},
}

shapes = st.tuples(st.integers(2, 12), st.integers(2, 12))


def _one_layer_chain(d_in, d_out, rank, reinit, dtype, seed, **cfg):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, dtype=dtype))
    cola.inject_lora(model, ["0"], rank=rank, alpha=2 * rank)
    config = cola.ChainConfig(total_steps=100, links=1, reinit=reinit, reinit_options=REINITS[reinit], seed=seed, **cfg)
    chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.1), config)
    return model, chain


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
        before = model(x)
        chain.tie_knot()
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(model(x), before, atol=tol * (1 + before.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("reinit", sorted(REINITS))
def test_knot_leaves_outputs_unchanged_in_bf16(reinit):
    model, chain = _one_layer_chain(16, 12, 4, reinit, torch.bfloat16, 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen, dtype=torch.bfloat16)
    _perturb(chain, gen)
    before = model(x).float()
    chain.tie_knot()
    after = model(x).float()
    # bf16 has 8 bits of mantissa: agreement to a few bf16 roundings of the output scale
    assert (after - before).abs().max() <= 0.05 * (1 + before.abs().max())


# 2. After links 1..m: W = W0 + sum_j s_j B_j A_j (float64 reference); the rank can exceed r.
@given(shape=shapes, rank=st.integers(1, 3), links=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_merged_weight_is_the_sum_of_the_links(shape, rank, links, seed):
    d_in, d_out = shape
    rank = min(rank, d_in, d_out)
    model, chain = _one_layer_chain(d_in, d_out, rank, "lora", torch.float32, seed)
    layer = chain.layers["0"]
    W0 = layer.base.weight.detach().double().clone()
    gen = torch.Generator().manual_seed(seed)
    expected = W0.clone()
    for _ in range(links):
        _perturb(chain, gen)
        expected += layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
        chain.tie_knot()
    torch.testing.assert_close(layer.base.weight.detach().double(), expected, atol=1e-4, rtol=1e-5)
    B, A = cola.stacked_factors(layer)
    torch.testing.assert_close(W0 + B.double() @ A.double(), expected, atol=1e-4, rtol=1e-5)
    accumulated_rank = torch.linalg.matrix_rank(expected - W0, rtol=1e-6)
    assert accumulated_rank == min(links * rank, d_in, d_out)


# 3. bf16/fp16 bases: the error after 20 knots is one final rounding, not 20.
def test_bf16_merge_error_does_not_grow_with_knots():
    torch.manual_seed(0)
    errors = {}
    for dtype in (torch.bfloat16, torch.float16):
        model, chain = _one_layer_chain(64, 48, 4, "lora", dtype, 0)
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


@given(cfg_index=st.integers(0, len(CONFIGS) - 1), save_at=st.integers(0, 18))
def test_save_load_continue_is_identical(cfg_index, save_at):
    T = 18
    cfg = cola.ChainConfig(total_steps=T, seed=3, **CONFIGS[cfg_index])
    data = list(batches(T))
    model, chain = make_chain(cfg, dropout=0.1)
    reference = train(model, chain, data)
    ref_weights = {k: v.clone() for k, v in model.state_dict().items()}

    model2, chain2 = make_chain(cfg, dropout=0.1)
    train(model2, chain2, data[:save_at])
    state = chain2.state_dict()
    # a fresh process would rebuild model and chain from scratch, then load
    model3, chain3 = make_chain(cfg, dropout=0.1)
    chain3.load_state_dict(state)
    resumed = train(model3, chain3, data[save_at:])
    assert resumed == reference[save_at:]
    assert [r.step for r in chain3.history] == [r.step for r in chain.history]
    for k, v in model3.state_dict().items():
        assert torch.equal(v, ref_weights[k]), k


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
