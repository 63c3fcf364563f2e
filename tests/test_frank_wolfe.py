"""The Frank-Wolfe re-init ``fw``: the new link starts in the top singular subspace of the gradient.

(That a knot with ``fw`` leaves the function unchanged is invariant 1 in test_invariants.py, with
``init="both"`` so that the fold-out is exercised.)
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import cola


def _problem(seed: int, d: int = 48, rank: int = 2, target_rank: int = 16):
    """A linear layer and a teacher whose weight moved by a rank-``target_rank`` update."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, d))
    teacher = nn.Sequential(nn.Linear(d, d))
    teacher.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        teacher[0].weight += torch.randn(d, target_rank, generator=gen) @ torch.randn(target_rank, d, generator=gen) / d ** 0.5
    X = torch.randn(1024, d, generator=gen)
    return model, X, teacher(X).detach()


def _train(reinit: str, options: dict, seed: int, steps: int = 120, links: int = 4, rank: int = 2) -> float:
    model, X, Y = _problem(seed, rank=rank)
    cola.inject_lora(model, ["0"], rank=rank, alpha=2 * rank)
    config = cola.ChainConfig(total_steps=steps, links=links, reinit=reinit, reinit_options=options, seed=seed)
    chain = cola.Chain(model, lambda p: torch.optim.Adam(p, lr=1e-2), config)
    gen = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (64,), generator=gen)

        def closure():
            chain.zero_grad()
            loss = ((model(X[idx]) - Y[idx]) ** 2).mean()
            loss.backward()
            return loss

        chain.step(closure(), closure=closure)
        chain.zero_grad()
    with torch.no_grad():
        return float(((model(X) - Y) ** 2).mean())


@pytest.mark.parametrize("init", ["A", "both"])
def test_fw_chain_reaches_a_lower_loss_than_a_lora_chain_at_the_same_steps(init):
    """4 links of rank 2 on a rank-16 target, 120 Adam steps: starting each link along the gradient's
    top subspace beats starting it at B = 0 with a random A, on every seed."""
    for seed in range(3):
        lora = _train("lora", {}, seed)
        fw = _train("fw", {"init": init}, seed)
        assert fw < 0.95 * lora, (seed, init, fw, lora)


def test_fw_starts_the_link_in_the_top_singular_subspace_of_the_gradient():
    model, X, Y = _problem(0, d=12)
    cola.inject_lora(model, ["0"], rank=3, alpha=6)
    chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.1),
                       cola.ChainConfig(total_steps=10, links=2, reinit="fw", reinit_options={"oversample": 12}))
    layer = chain.layers["0"]
    weight = layer.base.weight
    weight.requires_grad_(True)
    ((model(X[:64]) - Y[:64]) ** 2).mean().backward()  # the full-weight gradient, by autograd, for reference
    G = weight.grad.detach().double().clone()
    weight.requires_grad_(False)
    weight.grad = None

    def closure():
        chain.zero_grad()
        loss = ((model(X[:64]) - Y[:64]) ** 2).mean()
        loss.backward()
        return loss

    chain.tie_knot(closure=closure)
    _, _, Vh = torch.linalg.svd(G)
    top = Vh[:3].T @ Vh[:3]                                   # projector on the top-3 right singular vectors
    A = layer.lora_A.detach().double()
    Q, _ = torch.linalg.qr(A.T)
    assert torch.allclose(Q @ Q.T, top, atol=1e-6)          # A's rows span exactly that subspace
    assert torch.count_nonzero(layer.lora_B) == 0             # init "A": B = 0, nothing folded out


def test_without_a_closure_later_links_start_as_lora_and_a_warning_says_so(caplog):
    runs = {}
    for reinit in ("lora", "fw"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8))
        cola.inject_lora(model, ["0"], rank=2)
        chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.1),
                           cola.ChainConfig(total_steps=4, links=2, reinit=reinit))
        with caplog.at_level(logging.WARNING):
            chain.tie_knot()
        runs[reinit] = chain.layers["0"].lora_A.detach().clone()
    assert torch.equal(runs["lora"], runs["fw"])
    assert "no closure" in caplog.text


@pytest.mark.parametrize("init", ["A", "both"])
def test_a_knot_on_a_nonfinite_batch_starts_the_link_as_lora_and_leaves_the_weights_finite(caplog, init):
    """A skipped step still counts, so a knot can fall on a batch whose gradient is NaN: the probe
    must not put NaN into the factors (or, with init='both', into the weight it folds out of)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    cola.inject_lora(model, ["0"], rank=2)
    chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.1),
                       cola.ChainConfig(total_steps=4, links=2, reinit="fw", reinit_options={"init": init}))
    x = torch.randn(4, 8)

    def closure():
        chain.zero_grad()
        loss = model(x).sum() * float("nan")
        loss.backward()
        return loss

    with caplog.at_level(logging.WARNING):
        chain.tie_knot(closure=closure)
    layer = chain.layers["0"]
    assert chain.link == 1 and "not finite" in caplog.text
    assert all(bool(torch.isfinite(t).all()) for t in (layer.lora_A, layer.lora_B, layer.base.weight))
    assert not layer.lora_B.any()   # started as 'lora': B = 0


@pytest.mark.parametrize("options, message", [({"init": "B"}, "init='B'"), ({"oversample": -1}, "oversample"),
                                              ({"niter": 1.5}, "niter"), ({"scale": 0}, "scale")])
def test_bad_options_are_refused_with_the_value(options, message):
    model = nn.Sequential(nn.Linear(8, 8))
    cola.inject_lora(model, ["0"], rank=2)
    with pytest.raises(cola.ConfigError, match=message):
        cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.1),
                   cola.ChainConfig(total_steps=4, links=2, reinit="fw", reinit_options=options))


def test_power_iterations_cost_two_passes_each():
    pm = cola.get_plugin_manager()
    config = cola.ChainConfig(total_steps=4, links=2, reinit="fw")
    assert pm.create("reinit", "fw", config, {}).probe_passes == 2
    assert pm.create("reinit", "fw", config, {"niter": 2}).probe_passes == 6


def test_the_overlap_diagnostic_measures_each_links_net_update():
    """With init="both" each link starts with what it folded out; its net update (knot minus start) is
    what the overlap measures: new directions score low, like lora's, not the near 1 that comparing the
    trained factors with their own fold-out would give."""
    for init in ("A", "both"):
        model, X, Y = _problem(0, d=24)
        cola.inject_lora(model, ["0"], rank=2, alpha=4)
        chain = cola.Chain(model, lambda p: torch.optim.Adam(p, lr=1e-2),
                           cola.ChainConfig(total_steps=60, links=3, reinit="fw", diagnostics=True,
                                            reinit_options={"init": init}))
        for step in range(60):
            def closure():
                chain.zero_grad()
                loss = ((model(X[:64]) - Y[:64]) ** 2).mean()
                loss.backward()
                return loss
            chain.step(closure(), closure=closure)
            chain.zero_grad()
        overlaps = [r.overlap["0"] for r in chain.history]
        assert overlaps[0] is None and all(o < 0.6 for o in overlaps[1:]), (init, overlaps)
        assert chain.history[-1].effective_rank["0"] > 2.0
