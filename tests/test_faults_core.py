"""Issue 19, item 4: the two knot paths check everything a knot needs before anything is written, under
FSDP-sharded LoRA factors too; full fine-tuning (``cola train --method full``) skips a non-finite step
on the device (``cola.guard``: no host read per step) and otherwise steps as plain AdamW does.

The FSDP part runs in this process, in a one-rank gloo group: FSDP2 shards onto one rank as onto many
(the factors become DTensors), which is all the refusals look at.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch

import cola
import cola.distributed as cd

dist = torch.distributed


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, 61, (4, 8), generator=torch.Generator().manual_seed(500 + step))


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    store = tmp_path_factory.mktemp("group") / "store"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def _sharded_model():
    model = _tiny_llama()
    cola.inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    model = cd.fsdp(model, shard_lora=True)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.lora_A).__name__ == "DTensor"   # the factors are sharded
    return model


def _weights(model) -> dict[str, torch.Tensor]:
    """Every LoRA layer's base weight and factors, gathered, as plain tensors."""
    out = {}
    for name, layer in cola.lora_layers(model).items():
        for part, t in (("W", layer.base.weight), ("A", layer.lora_A), ("B", layer.lora_B)):
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[f"{name}.{part}"] = t.detach().clone()
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("changes,message", [
    (dict(reinit="fw"), r"reinit 'fw' cannot probe LoRA factors that FSDP shards \(4 layers, such as "),
    (dict(rank_schedule="list", rank_schedule_options={"ranks": [4, 2]}),
     r"rank schedule 'list' gives the links of .* rank \[4, 2\], but FSDP shards its LoRA factors \(rank 4\)"),
], ids=["fw", "rank-change"])
def test_a_chain_whose_knots_cannot_work_on_sharded_factors_is_refused_when_built(one_rank_group, changes, message):
    """fw (its probe sets factors of rank r + oversample) and a schedule that changes the rank cannot tie a
    knot on sharded factors: refused when the chain is built, before a step is taken; nothing changed."""
    model = _sharded_model()
    before = _weights(model)
    config = cola.ChainConfig(**{**dict(total_steps=6, merge_policy="knots", knots=[3], reinit="lora", seed=1),
                                 **changes})
    with pytest.raises(cola.ConfigError, match=message) as info:
        cola.Chain(model, _adamw, config)
    assert "nothing was changed" in str(info.value)
    assert _same(before, _weights(model))


def test_a_rank_change_decided_at_the_knot_is_refused_before_the_merge(one_rank_group):
    """A rank schedule that only tells at the knot (here: swapped after the plan was checked) that the rank
    changes: the knot refuses before it merges: the weights as before the step, the history empty."""
    model = _sharded_model()
    config = cola.ChainConfig(total_steps=6, merge_policy="knots", knots=[3], reinit="lora", seed=1)
    chain = cola.Chain(model, _adamw, config)
    for step in range(2):
        ids = _tokens(step)
        model(input_ids=ids, labels=ids).loss.backward()
        chain.step()
        chain.zero_grad()
    chain.strategies["rank_schedule"].rank = lambda link, base: 2 if link > 0 else base
    ids = _tokens(2)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(cola.ConfigError, match=r"gives link 1 of .* rank 2, but FSDP shards its LoRA factors"):
        chain.tie_knot()
    assert chain.history == [] and chain.link == 0
    before = _weights(model)
    with pytest.raises(cola.ConfigError):
        chain.tie_knot()   # again: still nothing written
    assert _same(before, _weights(model)) and chain.history == []


# ============================================================================ full fine-tuning

HOST_READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy")


def _full(model, steps: int = 6):
    from cola.llm.loop import FullFineTuning
    from cola.llm.settings import TrainSettings

    settings = TrainSettings(method="full", full_lr=1e-2, weight_decay=0.01, steps=steps)
    return FullFineTuning(model, settings, steps, "full-seed0"), settings


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_full_fine_tuning_reads_nothing_back_per_step_and_skips_a_nonfinite_one(monkeypatch):
    model = _tiny_llama()
    trainer, _ = _full(model)
    assert trainer.optimizer.defaults.get("fused") is True   # the skip happens inside the fused kernel
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    states, verdicts = [], []
    for step in range(4):
        ids = _tokens(step)
        loss = model(input_ids=ids, labels=ids).loss
        if step == 2:
            loss = loss * float("nan")   # a NaN loss and NaN gradients
        loss.backward()
        before = len(reads)
        verdicts.append(trainer.step(loss))
        assert len(reads) == before, reads[before:]   # no host read inside the step
        trainer.zero_grad()
        states.append(_state(model))
    monkeypatch.undo()
    assert [bool(v) for v in verdicts] == [True, True, False, True]
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])   # the NaN step left every weight alone
    assert not all(torch.equal(states[2][k], states[3][k]) for k in states[2])
    assert trainer.step_count == 4 and trainer.nonfinite_steps == 1 and trainer.nonfinite_in_row == 0
    steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {3.0}   # Adam's step count did not count the skipped step


def test_full_fine_tuning_steps_as_plain_adamw_on_finite_steps():
    """The guarded, fused AdamW against the previous path (plain AdamW, the same LR schedule) over 5 finite
    steps: the same weights to float rounding."""
    from cola.config import schedule_multiplier

    model, plain_model = _tiny_llama(), _tiny_llama()
    trainer, settings = _full(model)
    params = list({id(p): p for p in plain_model.parameters()}.values())
    plain = torch.optim.AdamW(params, lr=settings.full_lr, weight_decay=settings.weight_decay)
    cfg = settings.chain_config("lora", 6, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        plain, lambda taken: schedule_multiplier(cfg.lr_schedule, taken, 6, cfg.warmup_steps))
    worst = 0.0
    for step in range(5):
        ids = _tokens(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert bool(trainer.step(loss))
        trainer.zero_grad()
        plain_model(input_ids=ids, labels=ids).loss.backward()
        plain.step()
        scheduler.step()
        plain.zero_grad(set_to_none=True)
        a, b = _state(model), _state(plain_model)
        worst = max(worst, max(float((a[k] - b[k]).abs().max()) for k in a))
    print(f"\nfull fine-tuning, guarded fused AdamW vs plain AdamW over 5 steps: max |weight diff| {worst:.3g}")
    assert worst < 1e-6
    assert trainer.current_lr() == plain.param_groups[0]["lr"]
