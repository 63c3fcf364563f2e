"""The project's two FLOP models checked against PyTorch's own counter, ``torch.utils.flop_counter``.

``FlopCounterMode`` counts the FLOPs of every matmul that actually runs, forward and backward,
from the dispatched aten ops. The models are checked term by term, not within a tolerance:

* :class:`benchmarks.common.FlopCounter` (forward hooks on ``nn.Linear`` / ``cola.LoRALinear``
  plus an attention term from the config): its matmul part must equal the counter's ``aten.mm``
  exactly, and its attention term must be half the counter's ``aten.bmm`` under eager attention,
  because it counts only the causal half of ``Q K^T`` and ``P V`` (the half a causal kernel
  computes) while eager attention multiplies the full ``s x s`` matrices. In a LoRA step it also
  charges layer 0 for ``dK``, which autograd skips (K is frozen and nothing below needs a
  gradient); its docstring says so.
* ``flops_per_example`` of the ``cola train`` plan, on the single-token classification path of
  :func:`cola.llm.objective.training_loss`: the counter's ``aten.mm`` must equal the formula
  minus two terms the formula includes but no matmul performs: the norm weights (counted in
  ``N`` as if they were matmul weights: ``2 n_norm`` per token forward, as much backward, and
  ``2 n_norm`` more for their gradient when trained) and, under LoRA, the input gradients of
  layer 0's q/k/v projections and of its LoRA factors, which autograd does not compute because
  nothing below layer 0 needs a gradient. The sequence-squared attention terms, left out by the
  formula (documented), are the counter's ``aten.bmm``, checked against ``4 b s^2 d_attn`` per
  layer forward.

At the tiny shapes here the two extra terms make the formula 6.5 % above the counted matmuls
of a LoRA step (0.8 % for full fine-tuning), and with attention it is 3.6 % (6.4 %) below the
counter's total. At the paper's shapes the skipped layer-0 gradients are about ``1 / (8 L)`` of
a LoRA step (0.4-0.5 % for 24-32 layers) and attention about ``s / (6 d)`` of the forward
(0.4-2.4 % for prompts of 100-300 tokens at d = 2048-4096).

Eager attention is used so that the counter sees attention at all: on CPU, PyTorch's fused
``scaled_dot_product_attention`` kernel has no FLOP formula and counts as zero.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("transformers")
pytest.importorskip("peft")

import cola  # noqa: E402
from benchmarks import common as C  # noqa: E402

HERE = Path(__file__).parent


def _count(step) -> dict[str, int]:
    """``{"mm": ..., "bmm": ..., "other": ...}``: the FLOPs ``FlopCounterMode`` saw in ``step()``."""
    with FlopCounterMode(display=False) as counter:
        step()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    mm = by_op.pop("aten.mm", 0) + by_op.pop("aten.addmm", 0)
    bmm = by_op.pop("aten.bmm", 0)
    return {"mm": mm, "bmm": bmm, "other": sum(by_op.values()), "total": counter.get_total_flops()}


# ------------------------------------------------------------------------------ benchmarks/common.py

@pytest.mark.parametrize("setup", ["cola-qv", "peft-qv", "full"])
def test_benchmark_flop_counter_matches_torch_flop_counter(setup):
    torch.manual_seed(0)
    model = C.build_model("tiny-llama", attn_implementation="eager")
    if setup == "cola-qv":
        model, opt = C.setup_cola_lora(model, ["q_proj", "v_proj"], rank=4)
    elif setup == "peft-qv":
        model, opt = C.setup_peft_lora(model, ["q_proj", "v_proj"], rank=4)
    else:
        model, opt = C.setup_full(model)
    batch, seq = 2, 16
    cfg = C.model_config("tiny-llama")
    step = C.train_step_fn(model, opt, C.make_batch(cfg.vocab_size, batch, seq))
    with C.FlopCounter(model) as ours:
        torch_count = _count(step)
    assert torch_count["other"] == 0
    # every matmul of a Linear / LoRA factor, forward and backward, exactly
    assert torch_count["mm"] == ours.total - ours.attention
    # attention: eager computes the full s x s products, the model counts the causal half
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    skipped_dk = 0 if setup == "full" else 2 * batch * seq * seq * d_attn  # layer 0's dK under LoRA
    assert torch_count["bmm"] == 2 * ours.attention - skipped_dk


# ------------------------------------------------------------------------------ the cola train plan

def _flops_per_example():
    from cola.llm.plan import flops_per_example

    return flops_per_example


def _tiny_llama(vocab_size: int):
    """The tiny Llama of ``tests/llm/conftest.py`` (loaded by path: that folder is not a package)."""
    spec = importlib.util.spec_from_file_location("_llm_conftest_models", HERE / "llm" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.tiny_llama(vocab_size)
    model.config._attn_implementation = "eager"  # so that FlopCounterMode sees the attention matmuls
    return model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_plan_flops_match_torch_flop_counter(method):
    from cola.llm.objective import EncodedExample, training_loss

    vocab, rank, n_ex, tokens = 600, 4, 3, 12
    model = _tiny_llama(vocab).train()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    batch = [EncodedExample(tuple(torch.randint(3, vocab, (tokens,), generator=gen).tolist()), ((7,), (9,)), i % 2)
             for i in range(n_ex)]  # equal lengths: no padding, which the plan's mean length does not see
    norm_params = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    n_body = sum(p.numel() for p in model.parameters()) - head.numel() - embed.numel()
    layer0 = model.model.layers[0].self_attn
    if method == "lora":
        cola.inject_lora(model, ["q_proj", "v_proj"], rank=rank, alpha=8)
        layers = cola.lora_layers(model)
        n_lora = sum(rank * (m.in_features + m.out_features) for m in layers.values())
        n_trainable, train_head = n_lora, False
        # input gradients that autograd skips in layer 0: its q/k/v base weights and the LoRA A factors of q/v
        skipped = 2 * tokens * (sum(m.in_features * m.out_features for m in (layer0.q_proj.base, layer0.k_proj,
                                                                              layer0.v_proj.base))
                                + sum(m.rank * m.in_features for m in (layer0.q_proj, layer0.v_proj)))
        norm_terms = 4 * norm_params * tokens  # forward and input gradient; norm weights are frozen
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        n_lora, n_trainable, train_head, skipped = 0, n_body, True, 0
        norm_terms = 6 * norm_params * tokens  # forward, input gradient, weight gradient

    def step():
        training_loss(model, batch, "classification", pad_token_id=0).backward()

    torch_count = _count(step)
    formula = _flops_per_example()(tokens, 1.0, n_body, n_lora, n_trainable, vocab, cfg.hidden_size, train_head)
    assert torch_count["other"] == 0
    assert torch_count["mm"] == pytest.approx(n_ex * (formula - norm_terms - skipped), rel=1e-12)
    # what the formula leaves out: attention's sequence-squared matmuls, 4 b s^2 d_attn a layer forward,
    # twice that backward (less layer 0's dK under LoRA)
    d_attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    forward = 4 * n_ex * tokens * tokens * d_attn * cfg.num_hidden_layers
    dk0 = 0 if method == "full" else 2 * n_ex * tokens * tokens * d_attn
    assert torch_count["bmm"] == 3 * forward - dk0


def test_lm_head_applies_at_the_answer_position_only():
    """The plan charges the LM head at one position per single-token example, not at every token."""
    from cola.llm.objective import EncodedExample, training_loss

    model = _tiny_llama(600).train()
    cola.inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    batch = [EncodedExample(tuple(range(3, 15)), ((7,), (9,)), 0)]
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        training_loss(model, batch, "classification", pad_token_id=0).backward()
    finally:
        handle.remove()
    assert seen == [1]
