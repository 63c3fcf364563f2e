"""The LoRA layer and injection."""

import math

import pytest
import torch
from torch import nn

import cola
from helpers import MLP


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
    with pytest.raises(cola.ConfigError, match=r"'q_proj' matches no nn.Linear; candidates: fc1, fc2"):
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
