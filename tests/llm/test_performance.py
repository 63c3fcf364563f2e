"""The performance settings of ``cola train``: gradient checkpointing, the attention kernel, torch.compile.

On the tiny Llama of conftest.py, one process (the 2-rank runs are in test_llm_distributed.py):

* gradient checkpointing gives the same losses and weights as without it over lora, cola (2 knots) and full
  runs, and really recomputes (each adapted projection runs twice per training forward); a knot between
  checkpointed steps leaves the outputs unchanged and training goes on;
* ``attn_implementation`` reaches models a loader builds from a config and ``from_pretrained``;
* a compiled decoder is not recompiled at a knot of the same rank and once at a rank change (counted with
  a compile-counting backend over ``aot_eager``: inductor's C++ compile takes minutes on this machine's two
  cores; the real-inductor version is marked slow), and ``cola train --compile`` runs its knots with the
  eager losses.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

import cola
from cola.errors import ConfigError
from cola.llm import objective, performance
from cola.llm.host import ModelHost
from cola.llm.models import load_model
from cola.llm.settings import TrainSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_run_script as script  # noqa: E402
from test_llm_distributed import _common, _loss_diff, _max_diff, _reviews  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    """Knots at steps 2 and 4 of 6 on the tiny Llama (the settings of the 2-rank tests)."""
    return _common(_reviews(tmp_path_factory.mktemp("perf-data") / "reviews.jsonl"))


def counting_loader(calls: list[int]):
    """The tiny Llama, counting the training-mode calls of layer 0's q_proj (its base under LoRA)."""
    tok = script.build_tokenizer()

    def load():
        model = script.tiny_llama(len(tok))
        q = model.model.layers[0].self_attn.q_proj
        q.register_forward_hook(lambda m, i, o: calls.append(1) if m.training and torch.is_grad_enabled() else None)
        return model, tok
    return load


# ============================================================================ gradient checkpointing

def test_gradient_checkpointing_gives_the_same_runs(common, tmp_path):
    fields = {**common, "compare": ["lora", "cola", "full"], "full_lr": 1e-3}
    plain_calls, ckpt_calls = [], []
    t0 = time.perf_counter()
    plain, plain_w = script.run({**fields, "output_dir": str(tmp_path / "plain")}, counting_loader(plain_calls))
    ckpt, ckpt_w = script.run({**fields, "output_dir": str(tmp_path / "ckpt"), "gradient_checkpointing": True},
                              counting_loader(ckpt_calls))
    loss_diff, weight_diff = _loss_diff(ckpt, plain), _max_diff(ckpt_w, plain_w)
    print(f"\n[perf] gradient checkpointing vs none over lora, cola (knots 2, 4), full: losses {loss_diff:.3g}, "
          f"weights {weight_diff:.3g}; q_proj training calls {len(ckpt_calls)} vs {len(plain_calls)} "
          f"({time.perf_counter() - t0:.1f} s)")
    assert [r["knots"] for r in ckpt["runs"]] == [[], [2, 4], []]
    assert [k["step"] for k in ckpt["runs"][1]["knot_reports"]] == [2, 4]
    assert loss_diff < TOL and weight_diff < TOL
    assert len(plain_calls) == 3 * 6 and len(ckpt_calls) == 2 * len(plain_calls)  # recomputed in the backward
    assert [r["test"]["accuracy"] for r in ckpt["runs"]] == [r["test"]["accuracy"] for r in plain["runs"]]


def test_a_knot_between_checkpointed_steps_keeps_the_function(make_model):
    model = make_model("llama")
    performance.enable_checkpointing(model)
    cola.inject_lora(model, ["q_proj", "v_proj"], 4, 8.0)
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=3e-2), cola.ChainConfig(total_steps=10, links=2))
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(0))
    model.train()

    def loss_of() -> torch.Tensor:
        return objective.hidden_states(model, ids.tolist(), 0).pow(2).mean()

    for _ in range(2):
        loss = loss_of()
        loss.backward()
        chain.step(loss)
        chain.zero_grad()
    before = objective.hidden_states(model, ids.tolist(), 0).detach()   # train mode, grad on: checkpointed
    chain.tie_knot()
    after = objective.hidden_states(model, ids.tolist(), 0).detach()
    assert len(chain.history) == 1
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5), float((before - after).abs().max())
    loss = loss_of()
    loss.backward()
    grads = [layer.lora_B.grad for layer in cola.lora_layers(model).values()]   # the new link's B starts at 0
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    chain.step(loss)
    assert torch.isfinite(loss_of())


# ============================================================================ attention kernel

def test_attn_implementation_reaches_loaded_and_built_models(tmp_path, common):
    tok = script.build_tokenizer()
    script.tiny_llama(len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    model, _ = load_model(str(tmp_path / "tiny"), "float32", "cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="attn_implementation='bogus'"):
        load_model(str(tmp_path / "tiny"), "float32", "cpu", attn_implementation="bogus")
    settings = TrainSettings(**{**common, "attn_implementation": "eager"})
    host = ModelHost(script.tiny_loader(), settings=settings)     # a model built from a config (sdpa)
    assert host.get()[0].config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="attn_implementation='bogus'"):
        ModelHost(script.tiny_loader(), settings=settings.replace(attn_implementation="bogus")).get()


def test_eager_attention_trains_like_sdpa(common, tmp_path):
    sdpa, _ = script.run({**common, "output_dir": str(tmp_path / "sdpa")})
    eager, _ = script.run({**common, "output_dir": str(tmp_path / "eager"), "attn_implementation": "eager"})
    assert eager["settings"]["attn_implementation"] == "eager"
    assert _loss_diff(eager, sdpa) < 1e-4


# ============================================================================ torch.compile

def _chain_compiles(backend, rank_schedule: str = "constant", options: dict | None = None, compiled: bool = True):
    """6 steps of a 3-link chain (knots at 2 and 4) on a compiled tiny Llama decoder, fixed batch shape:
    the compile count after each step and the losses."""
    model = script.tiny_llama(len(script.build_tokenizer()))
    cola.inject_lora(model, ["q_proj", "v_proj"], 4, 8.0)
    model.train()
    if compiled:
        performance.COMPILE_BACKEND, saved = backend, performance.COMPILE_BACKEND
        try:
            performance.compile_decoder(model)
        finally:
            performance.COMPILE_BACKEND = saved
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-2), cola.ChainConfig(
        total_steps=6, links=3, seed=0, rank_schedule=rank_schedule, rank_schedule_options=options or {}))
    ids = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    counts, losses = [], []
    for _ in range(6):
        hidden = model.get_decoder()(input_ids=ids, use_cache=False)[0]
        loss = model.get_output_embeddings()(hidden).float().logsumexp(-1).mean()
        loss.backward()
        chain.step(loss)
        chain.zero_grad()
        counts.append(backend.frame_count if compiled else 0)
        losses.append(float(loss.detach()))
    assert [r.step for r in chain.history] == [2, 4]
    return counts, losses, [layer.rank for layer in cola.lora_layers(model).values()][0]


@pytest.mark.parametrize("schedule, options, extra", [("constant", None, 0), ("step-down", {"later_rank": 2}, 1)])
def test_knots_do_not_recompile_the_decoder(schedule, options, extra):
    from torch._dynamo.testing import CompileCounterWithBackend

    # dynamo's own "eager" backend: the recompiles are dynamo's guards; AOTAutograd's numbers through knots are
    # test_cola_train_compile_runs_its_knots_with_the_eager_losses's (aot_eager), inductor's the slow test below
    counter = CompileCounterWithBackend("eager")
    counts, losses, rank = _chain_compiles(counter, schedule, options)
    _, eager, _ = _chain_compiles(None, schedule, options, compiled=False)
    diff = max(abs(a - b) for a, b in zip(losses, eager))
    print(f"\n[perf] compiled decoder, {schedule} ranks (last {rank}), knots at 2 and 4: compiles after each "
          f"step {counts}; losses vs eager {diff:.3g}")
    assert counts[0] == 1 and counts[-1] == 1 + extra       # the first step's compile, + one at a rank change
    assert diff < TOL


@pytest.mark.slow
def test_knots_do_not_recompile_with_inductor():
    """The same with the real backend (inductor's C++ kernels: about 40 s cold here, seconds with its cache warm)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    counts, losses, _ = _chain_compiles(counter, "step-down", {"later_rank": 2})
    _, eager, _ = _chain_compiles(None, "step-down", {"later_rank": 2}, compiled=False)
    assert counts == [1, 1, 2, 2, 2, 2]
    assert max(abs(a - b) for a, b in zip(losses, eager)) < 1e-4


def test_cola_train_compile_runs_its_knots_with_the_eager_losses(common, tmp_path, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(performance, "COMPILE_BACKEND", counter)
    full_batches = {**common, "n_val": 3, "n_test": 6}   # evaluation in whole batches of 3: no batch of one to compile
    eager, eager_w = script.run({**full_batches, "output_dir": str(tmp_path / "eager")})
    compiled, compiled_w = script.run({**full_batches, "output_dir": str(tmp_path / "compiled"), "compile": True})
    loss_diff, weight_diff = _loss_diff(compiled, eager), _max_diff(compiled_w, eager_w)
    print(f"\n[perf] cola train --compile (aot_eager) vs eager: losses {loss_diff:.3g}, weights {weight_diff:.3g}; "
          f"{counter.frame_count} compiles in the run (train and eval modes, dynamic lengths)")
    assert compiled["runs"][0]["knots"] == [2, 4] and [k["step"] for k in compiled["runs"][0]["knot_reports"]] == [2, 4]
    assert loss_diff < TOL and weight_diff < TOL
    # the first step's compile, one for the training batches' varying lengths (dynamic from then on), one
    # for evaluation (no grad): none at the knots
    assert 1 <= counter.frame_count <= 3
