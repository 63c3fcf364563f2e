"""The chain: knot order, reports, strategies' effects, errors, and that COLA beats one LoRA."""

import math
import sys

import pytest
import torch
from torch import nn

import cola
from helpers import MLP, batches, make_chain, train


class Recorder:
    """A plugin that records the order of everything that happens at a knot."""

    def __init__(self, events):
        self.events = events

    @cola.hookimpl
    def cola_after_step(self, chain, step, loss):
        self.events.append(("step", step, loss))

    @cola.hookimpl
    def cola_before_merge(self, chain, link, step):
        self.events.append(("before_merge", link, step, chain.layers["fc1"].lora_B.abs().sum().item() > 0))

    @cola.hookimpl
    def cola_after_merge(self, chain, report):
        self.events.append(("after_merge", report.link, report.step, chain.link))


def test_knots_fire_in_order_with_hooks_and_reports(pm):
    events = []
    pm.register(Recorder(events), "recorder")
    try:
        model, chain = make_chain(cola.ChainConfig(total_steps=9, links=3), pm=pm)
        train(model, chain, batches(9))
    finally:
        pm.unregister("recorder")
    assert [r.step for r in chain.history] == [3, 6]
    assert chain.link == 2
    kinds = [e[0] for e in events]
    assert kinds[:5] == ["step", "step", "step", "before_merge", "after_merge"]
    assert events[3] == ("before_merge", 0, 3, True)      # the live link is still there before the merge
    assert events[4] == ("after_merge", 0, 3, 1)          # after: the chain is on link 1
    assert all(isinstance(e[2], float) for e in events if e[0] == "step")
    report = chain.history[0]
    assert set(report.norms) == {"fc1", "fc2"} and all(v > 0 for v in report.norms.values())
    assert report.seconds > 0 and report.new_rank == 4 and not report.forced
    assert report.to_dict()["link"] == 0


def test_tie_knot_forces_a_knot_and_records_it():
    model, chain = make_chain(cola.ChainConfig(total_steps=100))
    train(model, chain, batches(2))
    report = chain.tie_knot()
    assert report.forced and report.step == 2 and chain.link == 1 and chain.history == [report]


def test_merge_writes_the_link_into_the_weights_and_restarts_it():
    model, chain = make_chain(cola.ChainConfig(total_steps=4, links=2))
    train(model, chain, batches(1))
    layer = chain.layers["fc1"]
    w, delta = layer.base.weight.detach().clone(), layer.delta_weight()
    chain.tie_knot()
    torch.testing.assert_close(layer.base.weight.detach(), w + delta)
    assert torch.count_nonzero(layer.lora_B) == 0 and len(layer.links) == 1
    assert chain.history[0].norms["fc1"] == pytest.approx(float(delta.norm()), rel=1e-5)


def test_optimizer_state_reset_keep_prune():
    def state_after_knot(policy, **opts):
        model, chain = make_chain(cola.ChainConfig(total_steps=10, optimizer_policy=policy,
                                                   optimizer_policy_options=opts))
        train(model, chain, batches(3))
        chain.tie_knot()
        return chain.optimizer.state, chain.params

    state, params = state_after_knot("reset")
    assert all(p not in state for p in params)
    state, params = state_after_knot("keep")
    assert all(int(state[p]["step"]) == 3 for p in params if p.requires_grad)
    state, params = state_after_knot("prune", fraction=0.75)
    for p in params:
        avg = state[p]["exp_avg"]
        assert torch.count_nonzero(avg) <= math.ceil(0.25 * avg.numel())
        assert torch.count_nonzero(state[p]["exp_avg_sq"]) > 0


def test_joint_prune_keeps_no_momentum_without_its_scale():
    # Pruning each Adam moment by its own magnitudes (ReLoRA's way, joint=False) leaves entries with momentum
    # but no second moment; the new A's gradient is zero right after a lora re-init (B = 0), so Adam moves
    # such an entry by lr * m / eps. joint=True prunes both moments with the second moment's mask.
    lr = 1e-2

    def first_step_after_knot(joint):
        model, chain = make_chain(cola.ChainConfig(total_steps=100, optimizer_policy="prune",
                                                   optimizer_policy_options={"fraction": 0.9, "joint": joint}),
                                  lr=lr)
        train(model, chain, batches(20))
        chain.tie_knot()
        state = chain.optimizer.state
        orphans = sum(int(((state[p]["exp_avg"] != 0) & (state[p]["exp_avg_sq"] == 0)).sum()) for p in chain.params)
        before = [p.detach().clone() for p in chain.params]
        train(model, chain, batches(1, seed=7))
        return orphans, max(float((p.detach() - b).abs().max()) for p, b in zip(chain.params, before))

    orphans, step = first_step_after_knot(joint=True)
    # Adam's |m| / sqrt(v) <= (1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2)) ~ 7.3 for the default betas
    assert orphans == 0 and step <= 8 * lr
    orphans, step = first_step_after_knot(joint=False)
    assert orphans > 0 and step > 100 * lr                  # the hazard joint=True removes
    with pytest.raises(cola.ConfigError, match="joint='yes'"):
        make_chain(cola.ChainConfig(total_steps=10, optimizer_policy="prune",
                                    optimizer_policy_options={"joint": "yes"}))


def test_rank_change_repoints_the_optimizer():
    cfg = cola.ChainConfig(total_steps=6, links=2, rank_schedule="list", rank_schedule_options={"ranks": [4, 2]},
                           optimizer_policy="keep")
    model, chain = make_chain(cfg)
    train(model, chain, batches(6))
    opt_params = [p for g in chain.optimizer.param_groups for p in g["params"]]
    assert all(a is b for a, b in zip(opt_params, chain.params))
    assert chain.layers["fc1"].lora_A.shape == (2, 12)
    assert all(chain.optimizer.state[p]["exp_avg"].shape == p.shape for p in chain.params)


def lr_trace(**cfg):
    model, chain = make_chain(cola.ChainConfig(**cfg), lr=1.0)
    trace = []
    for x, y in batches(cfg["total_steps"]):
        trace.append(chain.lr_multiplier())
        ((model(x) - y) ** 2).mean().backward()
        chain.step()
        chain.zero_grad()
    return trace


def test_lr_policies():
    assert lr_trace(total_steps=6, links=2) == [1.0] * 6
    cont = lr_trace(total_steps=6, links=2, lr_schedule="linear")
    assert cont == pytest.approx([1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    restart = lr_trace(total_steps=6, links=2, lr_schedule="linear", lr_policy="restart")
    assert restart == pytest.approx([1, 2 / 3, 1 / 3] * 2)
    rewarm = lr_trace(total_steps=8, links=2, lr_policy="rewarm", lr_policy_options={"steps": 2})
    assert rewarm == pytest.approx([1, 1, 1, 1, 0.5, 1, 1, 1])
    warm = lr_trace(total_steps=4, warmup_steps=2)
    assert warm == pytest.approx([0.5, 1, 1, 1])


def test_lr_multiplier_is_what_the_optimizer_sees():
    model, chain = make_chain(cola.ChainConfig(total_steps=4, lr_schedule="linear"), lr=0.5,
                              optimizer=torch.optim.SGD)
    seen = []
    original = chain.optimizer.step

    def spy(*a, **k):
        seen.append(chain.optimizer.param_groups[0]["lr"])
        return original(*a, **k)

    chain.optimizer.step = spy
    train(model, chain, batches(4))
    assert seen == pytest.approx([0.5, 0.375, 0.25, 0.125])
    assert chain.optimizer.param_groups[0]["lr"] == 0.5   # the base LR is left as it was


def test_user_scheduler_is_stepped():
    torch.manual_seed(0)
    model = MLP()
    cola.inject_lora(model, ["fc1"], rank=2)
    chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=1.0), cola.ChainConfig(total_steps=3),
                       scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    train(model, chain, batches(3))
    assert chain.optimizer.param_groups[0]["lr"] == pytest.approx(0.125)


def test_non_finite_merge_is_refused_before_anything_is_written():
    model, chain = make_chain(cola.ChainConfig(total_steps=10))
    train(model, chain, batches(2))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        chain.layers["fc2"].lora_A[0, 0] = float("nan")
    with pytest.raises(cola.NonFiniteMergeError, match=r"link 0 of layer 'fc2'.*no weight was changed"):
        chain.tie_knot()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]) or (torch.isnan(v).any() and "lora_A" in k), k
    assert chain.link == 0 and chain.history == []


def test_overflowing_merge_is_refused_for_fp16():
    model, chain = make_chain(cola.ChainConfig(total_steps=10), dtype=torch.float16)
    with torch.no_grad():
        chain.layers["fc1"].lora_A.fill_(200.0)
        chain.layers["fc1"].lora_B.fill_(200.0)
    with pytest.raises(cola.NonFiniteMergeError, match="fc1"):
        chain.tie_knot()


def test_config_reports_every_problem_at_once():
    with pytest.raises(cola.ConfigError) as err:
        cola.ChainConfig(total_steps=0, links=0, knots=[3, 2], lr_schedule="cosin", warmup_steps=-1,
                         merge_policy_options=[1])
    text = str(err.value)
    for fragment in ["total_steps=0", "links=0", "strictly increasing", "lr_schedule='cosin'", "closest: cosine",
                     "warmup_steps=-1", "merge_policy_options"]:
        assert fragment in text
    with pytest.raises(cola.ConfigError, match="links=5 > total_steps=3"):
        cola.ChainConfig(total_steps=3, links=5)
    with pytest.raises(cola.ConfigError, match=r"every knot must lie in \[1, total_steps=10\]"):
        cola.ChainConfig(total_steps=10, knots=[0, 11])


def test_config_from_dict_suggests_closest_keys():
    with pytest.raises(cola.ConfigError, match=r"unknown setting 'lnks' \(closest: links"):
        cola.ChainConfig.from_dict({"total_steps": 10, "lnks": 2})
    assert cola.ChainConfig.from_dict({"total_steps": 10, "links": 2}).links == 2


def test_unknown_strategies_all_reported_with_closest_first_and_plugins():
    cfg = cola.ChainConfig(total_steps=10, reinit="pisa", merge_policy="evn")
    with pytest.raises(cola.UnknownStrategyError) as err:
        make_chain(cfg)
    text = str(err.value)
    assert "unknown reinit 'pisa'; closest: pissa" in text
    assert "unknown merge_policy 'evn'; closest: even" in text
    assert "pissa (reinit_strategies)" in text


def test_bad_strategy_options_are_config_errors():
    with pytest.raises(cola.ConfigError, match="every=0"):
        make_chain(cola.ChainConfig(total_steps=10, merge_policy="every", merge_policy_options={"every": 0}))
    with pytest.raises(cola.ConfigError, match="rejected options"):
        make_chain(cola.ChainConfig(total_steps=10, reinit="lora", reinit_options={"nope": 1}))
    with pytest.raises(cola.ConfigError, match="needs knot steps"):
        make_chain(cola.ChainConfig(total_steps=10, merge_policy="knots"))


def test_knots_at_fractions_of_the_run():
    _, chain = make_chain(cola.ChainConfig(total_steps=60, merge_policy="knots", merge_policy_options={"at": [0.6]}))
    assert chain.planned_knots() == [36]
    _, chain = make_chain(cola.ChainConfig(total_steps=10, merge_policy="knots",
                                           merge_policy_options={"at": [0.25, 0.5]}))
    assert chain.planned_knots() == [3, 5]
    for at, match in (([1.0], r"at=1.0: must be a number in \(0, 1\)"), ([0.5, 0.52], "strictly increasing"),
                      (0.5, "non-empty list of fractions"), ([0.01], r"in \[1, 9\]")):
        with pytest.raises(cola.ConfigError, match=match):
            make_chain(cola.ChainConfig(total_steps=10, merge_policy="knots", merge_policy_options={"at": at}))
    with pytest.raises(cola.ConfigError, match="not both"):
        make_chain(cola.ChainConfig(total_steps=10, merge_policy="knots",
                                    merge_policy_options={"at": [0.5], "knots": [3]}))


def test_plateau_needs_the_loss():
    model, chain = make_chain(cola.ChainConfig(total_steps=10, merge_policy="plateau"))
    x, y = next(batches(1))
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(cola.ConfigError, match=r"chain.step\(loss=loss\)"):
        chain.step()


def test_plateau_ties_knots_when_loss_stalls():
    model, chain = make_chain(cola.ChainConfig(total_steps=30, merge_policy="plateau",
                                               merge_policy_options={"patience": 3, "smoothing": 0.0}))
    for step in range(30):
        loss = torch.tensor(1.0)  # never improves
        chain.step(loss)
    assert [r.step for r in chain.history][:3] == [4, 8, 12]


def test_plateau_ignores_a_skipped_steps_nonfinite_loss():
    """A skipped step still reaches the merge policy (it counts toward the schedule); its NaN loss
    must not enter the plateau's moving average (a NaN there would never compare below the best)."""
    model, chain = make_chain(cola.ChainConfig(total_steps=40, merge_policy="plateau",
                                               merge_policy_options={"patience": 3, "smoothing": 0.5}))
    for step in range(20):
        x, y = next(batches(1))
        ((model(x) - y) ** 2).mean().backward()
        chain.step(torch.tensor(float("nan")) if step == 2 else torch.tensor(1.0 / (step + 1)))
        chain.zero_grad()
    policy = chain.strategies["merge_policy"]
    assert chain.nonfinite_steps == 1 and math.isfinite(policy.ema)
    assert chain.history == []   # the loss kept improving: no plateau, no knot


def test_model_without_lora_and_bad_optimizer_factory():
    with pytest.raises(cola.ConfigError, match="inject_lora"):
        cola.Chain(MLP(), lambda p: torch.optim.SGD(p, lr=1), cola.ChainConfig(total_steps=2, links=1))
    model = MLP()
    cola.inject_lora(model, ["fc1"])
    with pytest.raises(cola.ConfigError, match="not a torch.optim.Optimizer"):
        cola.Chain(model, lambda p: object(), cola.ChainConfig(total_steps=2, links=1))


def test_rac_freezes_one_side_and_trains_the_other():
    model, chain = make_chain(cola.ChainConfig(total_steps=4, links=1, reinit="rac", reinit_options={"train": "A"}))
    layer = chain.layers["fc1"]
    assert layer.lora_A.requires_grad and not layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0
    B0 = layer.lora_B.detach().clone()
    train(model, chain, batches(2))
    assert torch.equal(layer.lora_B, B0) and torch.count_nonzero(layer.lora_A) > 0


def test_orthogonal_reinit_avoids_previous_row_spaces():
    model, chain = make_chain(cola.ChainConfig(total_steps=9, links=3, reinit="orthogonal"), rank=2)
    train(model, chain, batches(6))
    layer = chain.layers["fc1"]
    previous = torch.cat([a for _, a, _ in layer.links])
    assert layer.lora_A.detach() @ previous.T == pytest.approx(torch.zeros(2, previous.shape[0]), abs=1e-5)


def test_svd_truncate_folds_only_the_top_part():
    model, chain = make_chain(cola.ChainConfig(total_steps=9, merge_rule="svd-truncate",
                                               merge_rule_options={"rank": 1}))
    train(model, chain, batches(3))
    layer = chain.layers["fc1"]
    w0, delta = layer.base.weight.detach().clone(), layer.delta_weight()
    chain.tie_knot()
    folded = layer.base.weight.detach() - w0
    U, S, Vh = torch.linalg.svd(delta)
    torch.testing.assert_close(folded, S[0] * torch.outer(U[:, 0], Vh[0]), atol=1e-5, rtol=1e-4)


def test_diagnostics_record_grad_norm_and_effective_rank():
    model, chain = make_chain(cola.ChainConfig(total_steps=12, links=3, diagnostics=True), rank=2)
    for x, y in batches(12):
        ((model(x) - y) ** 2).mean().backward()
        chain.step()
        # no zero_grad before the knot fires: the gradient of the last step is still there
    assert all(r.grad_norm > 0 for r in chain.history)
    ranks = [r.effective_rank["fc1"] for r in chain.history]
    assert 1 <= ranks[0] <= 2 + 1e-6 and ranks[1] > ranks[0]


def test_works_with_sgd_and_a_tiny_transformers_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    cola.inject_lora(model, rank=2, alpha=4)
    chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                       cola.ChainConfig(total_steps=6, links=3))
    ids = torch.randint(0, 50, (2, 8))
    for _ in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        chain.step()
        chain.zero_grad()
    assert len(chain.history) == 2 and chain.link == 2


# ---------------------------------------------------------------- COLA beats a single LoRA
def regression_loss(make_model, targets, links, rank, steps, lr, inputs, seed=0):
    """Fit a model to a teacher whose targeted weights moved by a rank-4r update."""
    torch.manual_seed(seed)
    student = make_model()
    teacher = make_model()
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name in targets:
            w = teacher.get_submodule(name).weight
            out_f, in_f = w.shape
            w += (torch.randn(out_f, 4 * rank, generator=gen) @ torch.randn(4 * rank, in_f, generator=gen)) / in_f ** 0.5
    cola.inject_lora(student, targets, rank=rank, alpha=2 * rank)
    chain = cola.Chain(student, lambda p: torch.optim.Adam(p, lr=lr), cola.ChainConfig(total_steps=steps, links=links))
    gen = torch.Generator().manual_seed(seed + 2)
    X = inputs(gen, 512)
    with torch.no_grad():
        Y = teacher(X)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (32,), generator=gen)
        loss = ((student(X[idx]) - Y[idx]) ** 2).mean()
        loss.backward()
        chain.step(loss)
        chain.zero_grad()
    with torch.no_grad():
        return float(((student(X) - Y) ** 2).mean())


def test_cola_beats_one_lora_on_a_rank_4r_target_mlp():
    make = lambda: nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))  # noqa: E731
    inputs = lambda gen, n: torch.randn(n, 32, generator=gen)  # noqa: E731
    lora = regression_loss(make, ["0", "2"], links=1, rank=2, steps=450, lr=2e-2, inputs=inputs)
    chain = regression_loss(make, ["0", "2"], links=3, rank=2, steps=450, lr=2e-2, inputs=inputs)
    assert chain < 0.7 * lora, (chain, lora)


def test_cola_beats_one_lora_on_a_rank_4r_target_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)

    class Hidden(nn.Module):
        """The Llama's last hidden state as a regression output."""

        def __init__(self):
            super().__init__()
            self.llama = transformers.LlamaForCausalLM(cfg)

        def forward(self, ids):
            return self.llama.model(input_ids=ids).last_hidden_state

    targets = [f"llama.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    inputs = lambda gen, n: torch.randint(0, 40, (n // 4, 12), generator=gen)  # noqa: E731
    lora = regression_loss(Hidden, targets, links=1, rank=2, steps=240, lr=1e-2, inputs=inputs)
    chain = regression_loss(Hidden, targets, links=3, rank=2, steps=240, lr=1e-2, inputs=inputs)
    assert chain < lora, (chain, lora)


def _optimizer_state(chain):
    return {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in chain.optimizer.state[p].items()}
            for p in chain.params if p in chain.optimizer.state}


@pytest.mark.parametrize("fused", [False, True], ids=["masked", "fused"])
def test_non_finite_loss_or_gradient_skips_the_step_and_is_counted(fused):
    """A non-finite step leaves weights and optimizer state alone, counts as a step of the schedule
    (as with GradScaler, so knots need no host read) and is counted; both optimizer paths."""
    torch.manual_seed(0)
    model = MLP()
    cola.inject_lora(model, ["fc1", "fc2"], rank=2)
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-2, fused=fused),
                       cola.ChainConfig(total_steps=10, links=2))
    train(model, chain, batches(2))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = _optimizer_state(chain)
    x, y = next(batches(1))
    loss = ((model(x) - y) ** 2).mean() * float("nan")
    loss.backward()
    verdict = chain.step(loss)
    assert not verdict and verdict == False  # noqa: E712 (a Verdict compares with bools)
    chain.zero_grad()
    assert chain.step_count == 3 and chain.nonfinite_steps == 1 and chain.nonfinite_in_row == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = _optimizer_state(chain)
    assert after.keys() == state.keys()
    for pid, entries in state.items():
        assert all(torch.equal(v, after[pid][k]) if torch.is_tensor(v) else v == after[pid][k]
                   for k, v in entries.items())
    for p in chain.params:  # a finite loss with an infinite gradient is caught too
        p.grad = torch.full_like(p, float("inf"))
    assert not chain.step(torch.tensor(1.0)) and chain.nonfinite_in_row == 2
    chain.zero_grad()
    train(model, chain, batches(1))
    assert chain.step_count == 5 and chain.nonfinite_in_row == 0 and chain.nonfinite_steps == 2
    assert not all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert [r.step for r in chain.history] == [5]  # the knot at 5 counts the skipped steps


def test_a_skipped_first_step_leaves_no_optimizer_state_behind():
    """State that the skipped step created (Adam's moments on the very first step) is reset to zero:
    the next step starts as from fresh state."""
    runs = []
    for skip_first in (False, True):
        torch.manual_seed(0)
        model = MLP()
        cola.inject_lora(model, ["fc1"], rank=2)
        chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-2), cola.ChainConfig(total_steps=10, links=1))
        data = list(batches(3))
        if skip_first:
            x, y = data[0]
            (((model(x) - y) ** 2).mean() * float("inf")).backward()
            assert not chain.step()
            chain.zero_grad()
        for x, y in data[1:]:
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            assert chain.step(loss)
            chain.zero_grad()
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.allclose(v, runs[1][k], atol=1e-7) for k, v in runs[0].items())


HOST_READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy")


def test_an_ordinary_step_reads_nothing_back_to_the_host(monkeypatch):
    """Issue 14: with the default skip_nonfinite, chain.step makes no host read on a step that is not
    a knot (counted: every Tensor.item/tolist/cpu/__bool__/__float__/__int__/numpy called from cola's
    own code during chain.step); a knot may read (once, for its finiteness checks)."""
    torch.manual_seed(0)
    model = MLP()
    cola.inject_lora(model, ["fc1", "fc2"], rank=2)
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-2), cola.ChainConfig(total_steps=6, links=2))
    assert chain.config.skip_nonfinite
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(("cola", "cola_plugins")):
                reads.append(f"{_name} from {caller}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step = []
    for x, y in batches(6):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        reads.clear()
        chain.step(loss)
        per_step.append(list(reads))
        chain.zero_grad()
    monkeypatch.undo()
    knots = {r.step for r in chain.history}
    assert knots == {3}
    assert all(not r for step, r in enumerate(per_step, 1) if step not in knots), per_step
    assert per_step[2], "the checker sees the knot's read"


def test_external_optimizer_loop_with_advance():
    """How an outside loop (transformers' Trainer) drives a chain: it steps, the chain counts and ties."""
    torch.manual_seed(0)
    model = MLP()
    cola.inject_lora(model, ["fc1", "fc2"], rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = cola.ChainConfig(total_steps=6, links=2, rank_schedule="step-down",
                           rank_schedule_options={"first_rank": 2, "later_rank": 3})
    chain = cola.Chain(model, lambda params: opt, cfg)
    assert chain.optimizer is opt and chain.layers["fc1"].rank == 2
    assert [p for g in opt.param_groups for p in g["params"]] == chain.params
    for x, y in batches(6):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        chain.advance()
    assert [r.step for r in chain.history] == [3] and chain.layers["fc1"].rank == 3


def test_skip_nonfinite_off_steps_through_whatever_comes():
    model, chain = make_chain(cola.ChainConfig(total_steps=10, skip_nonfinite=False))
    x, y = next(batches(1))
    ((model(x) - y) ** 2).mean().backward()
    assert chain.step(torch.tensor(float("nan"))) and chain.step_count == 1 and chain.nonfinite_steps == 0
