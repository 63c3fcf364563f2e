"""A chain on a peft.PeftModel (cola.peft_models): knots on PEFT's layers, the LoraConfig honoured, and the
PeftModel given back correct against the original base; the PEFT variants a chain cannot take refused."""

import json

import pytest
import torch

import cola

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from cola.peft_models import PeftBridge  # noqa: E402

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved once: every test's "original base" is loaded from here."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("peft") / "base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def fresh(base_dir):
    return transformers.LlamaForCausalLM.from_pretrained(base_dir)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train(model, chain, steps):
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.item())
        chain.step()
        chain.zero_grad()
    return losses


CASES = {
    "patterns": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4},
                     alpha_pattern={"v_proj": 8}),
    "rslora-gaussian": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                            init_lora_weights="gaussian"),
    "all-linear-dropout": dict(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chain_on_a_peft_model_gives_back_one_adapter_over_the_original_base(tmp_path, base_dir, case):
    settings = CASES[case]
    model = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(**settings))
    peft_q = model.base_model.model.model.layers[0].self_attn.q_proj
    A0, B0 = peft_q.lora_A["default"].weight, peft_q.lora_B["default"].weight
    A0_values, scaling = A0.detach().clone(), peft_q.scaling["default"]
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=5e-2), cola.ChainConfig(total_steps=9, links=3))
    # the first link is PEFT's: the same Parameters, as init_lora_weights made them, at PEFT's scaling
    q = chain.layers["base_model.model.model.layers.0.self_attn.q_proj"]
    assert isinstance(q, cola.LoRALinear) and q.lora_A is A0 and q.lora_B is B0
    assert torch.equal(q.lora_A.detach(), A0_values) and q.scaling == pytest.approx(scaling)
    if settings.get("lora_dropout"):
        assert q.dropout is peft_q.lora_dropout["default"] and q.dropout.p == 0.1
    adapted = len(chain.layers)
    assert adapted == (14 if settings["target_modules"] == "all-linear" else 4)
    model.train()
    losses = train(model, chain, 9)
    model.eval()
    assert [r.step for r in chain.history] == [3, 6]
    assert losses[-1] < losses[0]
    expected = logits(model)

    assert cola.to_peft(chain) is model and isinstance(model, peft.PeftModel)
    assert not cola.lora_layers(model)                         # PEFT's layers are back
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    original = fresh(base_dir)
    assert torch.equal(peft_q.base_layer.weight, original.model.layers[0].self_attn.q_proj.weight)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    link_rank = 4 if settings["r"] == 4 else 2
    if case == "patterns":   # q: 3 links of rank 4, v: 3 of rank 2; v keeps its alpha, q PEFT's default
        assert config["r"] == 6 and config["alpha_pattern"] == {"v_proj": 8} and config["lora_alpha"] == 4
        assert sorted(config["rank_pattern"].values()) == [12, 12]
    else:
        assert config["r"] == 3 * link_rank and config["rank_pattern"] == {}
    assert config["use_rslora"] == settings.get("use_rslora", False)
    loaded = peft.PeftModel.from_pretrained(original, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=1e-4)


def test_a_gpt2_peft_model_conv1d_with_fan_in_fan_out(tmp_path):
    """GPT-2's c_attn is a transformers Conv1D (weight in x out; PEFT's fan_in_fan_out=True): the chain ties
    its knots on it and gives back an adapter that loads onto the original GPT-2."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=5e-2), cola.ChainConfig(total_steps=9, links=3))
    assert all(layer.transposed for layer in chain.layers.values()) and len(chain.layers) == 2
    model.train()
    losses = train(model, chain, 9)
    model.eval()
    assert [r.step for r in chain.history] == [3, 6] and losses[-1] < losses[0]
    expected = logits(model)
    cola.to_peft(chain)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["fan_in_fan_out"] is True
    original = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    loaded = peft.PeftModel.from_pretrained(original, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)


def test_a_fan_in_fan_out_flag_that_contradicts_the_layout_is_refused(base_dir):
    model = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for module in model.modules():
        if hasattr(module, "fan_in_fan_out"):
            module.fan_in_fan_out = True
    with pytest.raises(cola.ConfigError, match="fan_in_fan_out=True over Linear"):
        cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-2), cola.ChainConfig(total_steps=4, links=2))


def test_a_checkpoint_adapter_mid_chain_is_over_the_original_base(tmp_path, base_dir):
    model = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=5e-2),
                       cola.ChainConfig(total_steps=8, links=2, rank_schedule="list", rank_schedule_options={"ranks": [2, 3]}))
    train(model, chain, 5)   # one knot (step 4), then a rank-3 link
    expected = logits(model)
    chain.peft.save_adapter(chain, tmp_path / "ckpt")
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)   # the live model is untouched
    assert isinstance(cola.lora_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"], cola.LoRALinear)
    assert json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())["r"] == 5
    loaded = peft.PeftModel.from_pretrained(fresh(base_dir), tmp_path / "ckpt")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)
    train(model, chain, 3)   # the chain goes on after the checkpoint
    assert chain.step_count == 8 and len(chain.history) == 1


def test_a_loaded_adapter_continues_as_the_first_link(tmp_path, base_dir):
    """PeftModel.from_pretrained(..., is_trainable=True): the chain starts from the adapter's trained factors."""
    first = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in first.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    first.save_pretrained(tmp_path / "start")
    start = logits(first)
    model = peft.PeftModel.from_pretrained(fresh(base_dir), tmp_path / "start", is_trainable=True)
    chain = cola.Chain(model, lambda p: torch.optim.SGD(p, lr=0.0), cola.ChainConfig(total_steps=4, links=2))
    torch.testing.assert_close(logits(model), start, atol=1e-6, rtol=1e-6)   # not re-initialised
    train(model, chain, 4)   # lr 0: the function stays, across the knot too
    cola.to_peft(chain)
    model.save_pretrained(tmp_path / "end")
    loaded = peft.PeftModel.from_pretrained(fresh(base_dir), tmp_path / "end")
    torch.testing.assert_close(logits(loaded), start, atol=1e-5, rtol=1e-5)


def test_a_rank_schedule_that_changes_link_0_reinitialises_it(base_dir):
    model = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    before = logits(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.3)
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-2),
                       cola.ChainConfig(total_steps=4, links=2, rank_schedule="list", rank_schedule_options={"ranks": [3, 2]}))
    assert {layer.rank for layer in chain.layers.values()} == {3}
    torch.testing.assert_close(logits(model), before)   # the chain's reinit: B = 0


def refusal(model, **config):
    with pytest.raises(cola.ConfigError) as err:
        cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-3), cola.ChainConfig(total_steps=4, links=2, **config))
    return str(err.value)


def test_dora_loha_pissa_and_bias_are_refused_by_name(base_dir):
    dora = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert "DoRA (use_dora=True)" in refusal(dora)
    assert not cola.lora_layers(dora)    # nothing was converted
    loha = peft.get_peft_model(fresh(base_dir), peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    assert "LOHA adapter" in refusal(loha)
    pissa = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                 init_lora_weights="pissa"))
    message = refusal(pissa)
    assert "init_lora_weights='pissa'" in message and "reinit='pissa'" in message
    bias = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    assert "lora_bias=True" in refusal(bias)


def test_several_adapters_are_refused_with_every_problem(base_dir):
    model = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    message = refusal(model, record_links=False)
    assert message.startswith("4 problems")
    for part in ("2 adapters (default, other)", "2 active adapters", "'other' uses DoRA", "record_links=False"):
        assert part in message
    assert not cola.lora_layers(model)


def test_peft_layers_outside_a_peft_model_are_refused(base_dir):
    model = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "not a peft.PeftModel" in refusal(model.base_model)


def test_to_peft_needs_a_chain_on_a_peft_model(base_dir):
    model = fresh(base_dir)
    cola.inject_lora(model, rank=2, alpha=4)
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-3), cola.ChainConfig(total_steps=4, links=2))
    assert chain.peft is None
    with pytest.raises(cola.ConfigError, match="save_peft_adapter"):
        cola.to_peft(chain)


def test_to_peft_is_final(base_dir):
    model = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=1e-3), cola.ChainConfig(total_steps=4, links=2))
    assert isinstance(chain.peft, PeftBridge)
    cola.to_peft(chain)
    with pytest.raises(cola.ConfigError, match="already given back"):
        cola.to_peft(chain)
