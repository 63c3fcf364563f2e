"""The LoRA layer and injection."""

import math

import pytest
import torch
from torch import nn

import cola
from helpers import MLP, conv1d_and_linear


def test_forward_is_base_plus_scaled_link():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = cola.LoRALinear(base, rank=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = base(x) + x @ (layer.lora_B @ layer.lora_A).T * 2.0
    assert layer.scaling == 2.0
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B.detach() @ layer.lora_A.detach())


def test_new_layer_does_not_change_the_function_and_freezes_the_base():
    base = nn.Linear(7, 3)
    x = torch.randn(2, 7)
    before = base(x)
    layer = cola.LoRALinear(base, rank=2, alpha=4)
    torch.testing.assert_close(layer(x), before)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    bound = 1 / math.sqrt(7)
    assert layer.lora_A.abs().max() <= bound


def test_rslora_scaling():
    layer = cola.LoRALinear(nn.Linear(8, 8), rank=4, alpha=8, rslora=True)
    assert layer.scaling == pytest.approx(8 / 2)


def test_set_factors_same_rank_keeps_parameters_new_rank_replaces_them_and_freezes():
    layer = cola.LoRALinear(nn.Linear(8, 6), rank=4, alpha=8)
    A_param, B_param = layer.lora_A, layer.lora_B
    layer.set_factors_(torch.ones(4, 8), torch.zeros(6, 4))
    assert layer.lora_A is A_param and layer.lora_B is B_param
    layer.set_factors_(torch.ones(2, 8), torch.zeros(6, 2), train_A=False)
    assert layer.rank == 2 and layer.scaling == 4.0
    assert layer.lora_A is not A_param  # autograd caches a leaf's shape: a new rank needs new leaves
    assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert dict(layer.named_parameters())["lora_A"] is layer.lora_A


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(rank=0, alpha=1), "rank=0"),
    (dict(rank=7, alpha=1), "[1, 6]"),
    (dict(rank=2, alpha=0), "alpha=0"),
    (dict(rank=2, alpha=1, dropout=1.0), "dropout=1.0"),
])
def test_bad_layer_settings_name_the_value(kwargs, fragment):
    with pytest.raises(cola.ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        cola.LoRALinear(nn.Linear(8, 6), **kwargs)


def test_all_bad_settings_reported_at_once():
    with pytest.raises(cola.ConfigError) as err:
        cola.LoRALinear(nn.Linear(8, 6), rank=0, alpha=-1, dropout=2)
    assert len(err.value.problems) == 3


def test_set_factors_rejects_bad_shapes():
    layer = cola.LoRALinear(nn.Linear(8, 6), rank=2, alpha=2)
    with pytest.raises(cola.ConfigError, match="do not fit"):
        layer.set_factors_(torch.ones(2, 7), torch.zeros(6, 2))


def test_inject_by_suffix_and_regex_and_freezes_everything_else():
    model = MLP()
    names = cola.inject_lora(model, ["fc1", r"f.2"], rank=2)
    assert names == ["fc1", "fc2"]
    assert set(cola.lora_layers(model)) == {"fc1", "fc2"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"}


def test_unmatched_pattern_lists_candidates():
    with pytest.raises(cola.ConfigError, match=r"'q_proj' matches no nn.Linear or Conv1D; candidates: fc1, fc2"):
        cola.inject_lora(MLP(), ["q_proj"])


def test_model_without_linear_is_an_error():
    with pytest.raises(cola.ConfigError, match="no nn.Linear"):
        cola.inject_lora(nn.Sequential(nn.ReLU()), None)


def test_inject_twice_is_an_error():
    model = MLP()
    cola.inject_lora(model, ["fc1"])
    with pytest.raises(cola.ConfigError, match="inject once"):
        cola.inject_lora(model, ["fc2"])


def test_family_defaults_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    assert cola.default_target_modules(model) == ["q_proj", "v_proj"]
    names = cola.inject_lora(model)
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_generic_default_skips_lm_head():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 9)

    assert cola.default_target_modules(M()) == ["body"]


def test_merge_and_unload_keeps_outputs_and_restores_plain_linear():
    torch.manual_seed(0)
    model = MLP()
    cola.inject_lora(model, ["fc1", "fc2"], rank=3)
    for layer in cola.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(5, 12)
    before = model(x)
    cola.merge_and_unload(model)
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ transformers' Conv1D

def test_conv1d_layer_equals_the_linear_layer_of_the_transposed_weight():
    pytest.importorskip("transformers")
    conv, linear = conv1d_and_linear()
    a, b = cola.LoRALinear(conv, rank=2, alpha=4), cola.LoRALinear(linear, rank=2, alpha=4)
    assert (a.in_features, a.out_features, a.transposed) == (6, 5, True) and not b.transposed
    assert a.lora_A.shape == (2, 6) and a.lora_B.shape == (5, 2) and "conv1d" in repr(a)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    for layer in (a, b):
        layer.set_factors_(A, B)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.delta_weight(), b.delta_weight())
    torch.testing.assert_close(a.exact_weight(), linear.weight)   # out x in, whatever the layout
    fold = (torch.randn(5, 3, generator=g), torch.randn(3, 6, generator=g), 0.7)
    for layer in (a, b):
        layer.fold_(*fold)
        layer.merge_()
    assert conv.weight.shape == (6, 5)                              # still stored in x out
    torch.testing.assert_close(conv.weight, linear.weight.T)
    torch.testing.assert_close(a.exact_weight(), b.exact_weight())
    torch.testing.assert_close(a(x), b(x))
    for got, want in zip(cola.stacked_factors(a), cola.stacked_factors(b)):
        torch.testing.assert_close(got, want)
    assert a.oriented(conv.weight) is not conv.weight and torch.equal(a.oriented(conv.weight), linear.weight)


def test_conv1d_bf16_base_keeps_its_compensation_in_the_stored_layout():
    pytest.importorskip("transformers")
    conv, linear = conv1d_and_linear(16, 12, torch.bfloat16, seed=3)
    exact = linear.weight.double().clone()
    a, b = cola.LoRALinear(conv, rank=2, alpha=2), cola.LoRALinear(linear, rank=2, alpha=2)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):   # many tiny updates: each alone is below bf16's resolution of the weight
        B, A = torch.randn(12, 2, generator=g) * 1e-3, torch.randn(2, 16, generator=g) * 1e-3
        a.fold_(B, A, 1.0)
        b.fold_(B, A, 1.0)
        exact += B.double() @ A.double()
    assert a.residual.shape == conv.weight.shape == (16, 12) and a.residual.dtype == torch.bfloat16
    assert torch.equal(conv.weight, linear.weight.T) and torch.equal(a.residual, b.residual.T)
    torch.testing.assert_close(a.exact_weight(), b.exact_weight(), atol=0, rtol=0)
    # the compensated weight is far closer to the exact sum than the stored bf16 weight alone
    err_exact = (a.exact_weight().double() - exact).abs().max()
    err_stored = (conv.weight.T.double() - exact).abs().max()
    assert err_exact < err_stored / 20, (err_exact, err_stored)


class _GPT2ish(nn.Module):
    """Two Conv1D projections and a Linear head (GPT-2's layout)."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.c_fc, self.c_proj, self.lm_head = Conv1D(16, 12), Conv1D(12, 16), nn.Linear(12, 10)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.c_proj(torch.tanh(self.c_fc(x)))))


def test_inject_lora_wraps_conv1d_and_merge_and_unload_puts_it_back():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _GPT2ish()
    assert cola.default_target_modules(model) == ["c_fc", "c_proj"]
    with pytest.raises(cola.ConfigError, match=r"'q_proj' matches no nn.Linear or Conv1D; candidates: c_fc, c_proj"):
        cola.inject_lora(model, ["q_proj"])
    assert cola.inject_lora(model, None, rank=3) == ["c_fc", "c_proj"]
    for layer in cola.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(5, 12)
    before = model(x)
    cola.merge_and_unload(model)
    assert type(model.c_fc) is transformers.pytorch_utils.Conv1D and model.c_fc.weight.shape == (12, 16)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def _pair_of_models():
    """A Conv1D model and the same function built of nn.Linear (weights transposed)."""
    torch.manual_seed(0)
    conv = _GPT2ish()
    lin = MLP(12, 16, 12)
    with torch.no_grad():
        lin.fc1.weight.copy_(conv.c_fc.weight.T), lin.fc1.bias.copy_(conv.c_fc.bias)
        lin.fc2.weight.copy_(conv.c_proj.weight.T), lin.fc2.bias.copy_(conv.c_proj.bias)
    lin.act = nn.Tanh()
    return conv, lin


@pytest.mark.parametrize("reinit", ["pissa", "lora"])
def test_a_chain_over_conv1d_matches_the_chain_over_linear(reinit):
    """Knots, the merge rule, a re-init that reads and folds into the weight (PiSSA): the same numbers."""
    pytest.importorskip("transformers")
    conv, lin = _pair_of_models()
    x, y = torch.randn(8, 12, generator=torch.Generator().manual_seed(5)), torch.randn(8, 12)
    outputs = []
    for model, targets, head in ((conv, ["c_fc", "c_proj"], lambda h: conv.c_proj(torch.tanh(conv.c_fc(h)))),
                                 (lin, ["fc1", "fc2"], lambda h: lin.fc2(torch.tanh(lin.fc1(h))))):
        torch.manual_seed(1)
        cola.inject_lora(model, targets, rank=2, alpha=4)
        chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.05),
                           cola.ChainConfig(total_steps=6, links=3, reinit=reinit, seed=2))
        for _ in range(6):
            loss = ((torch.tanh(head(x)) - y) ** 2).mean()
            loss.backward()
            chain.step()
            chain.zero_grad()
        outputs.append((head(x).detach(), [r.step for r in chain.history], chain.stacked_factors()))
    (out_c, knots_c, fac_c), (out_l, knots_l, fac_l) = outputs
    assert knots_c == knots_l == [2, 4]
    torch.testing.assert_close(out_c, out_l, atol=1e-5, rtol=1e-5)
    for (Bc, Ac), (Bl, Al) in zip(fac_c.values(), fac_l.values()):
        torch.testing.assert_close(Bc @ Ac, Bl @ Al, atol=1e-5, rtol=1e-5)


def test_a_layer_tied_to_the_embedding_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    model = Tied()
    with pytest.raises(cola.ConfigError, match=r"lm_head: its weight is tied to embed.weight .*tie_word_embeddings"):
        cola.inject_lora(model, ["body", "lm_head"], rank=2)
    assert not cola.lora_layers(model)                       # nothing was wrapped
    assert cola.inject_lora(model, ["body"], rank=2) == ["body"]
