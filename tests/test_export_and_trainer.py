"""PEFT export of a chain (one adapter, and one per link) and the transformers Trainer callback."""

import json

import pytest
import torch

import cola

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from cola.export import save_link_adapters, save_peft_adapter  # noqa: E402


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def train_chain(model, **cfg):
    cola.inject_lora(model, rank=2, alpha=4)
    chain = cola.Chain(model, lambda p: torch.optim.AdamW(p, lr=5e-2), cola.ChainConfig(**cfg))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(cfg["total_steps"]):
        model(input_ids=ids, labels=ids).loss.backward()
        chain.step()
        chain.zero_grad()
    return chain, ids


@pytest.mark.parametrize("reinit", ["lora", "pissa"])
def test_peft_adapter_of_the_whole_chain_reproduces_the_model(tmp_path, reinit):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    chain, ids = train_chain(model, total_steps=9, links=3, reinit=reinit)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_peft_adapter(chain, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    links = len(chain.layers["model.layers.0.self_attn.q_proj"].links) + 1
    assert config["r"] == 2 * links and config["peft_type"] == "LORA"
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_link_adapters_with_manifest_sum_to_the_chain(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    chain, ids = train_chain(model, total_steps=6, links=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_link_adapters(chain, tmp_path / "links")
    manifest = json.loads((tmp_path / "links" / "manifest.json").read_text())
    assert [e["folder"] for e in manifest["links"]] == ["link-00", "link-01", "link-02"]
    assert manifest["knots"] == [2, 4]
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    wrapped = peft.PeftModel.from_pretrained(base, tmp_path / "links" / "link-00", adapter_name="l0")
    for e in manifest["links"][1:]:
        wrapped.load_adapter(tmp_path / "links" / e["folder"], adapter_name=e["folder"])
    wrapped.base_model.set_adapter(["l0", "link-01", "link-02"])
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 10), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(tmp_path, model, max_steps, **cb):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=3, save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True, seed=0,
        lr_scheduler_type="constant", disable_tqdm=True)
    callback = cola.integrations.ColaCallback(rank=2, alpha=4, **cb)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback]), callback


def test_trainer_callback_adds_cola_in_one_line(tmp_path):
    import cola.integrations  # noqa: F401

    model = tiny_llama()
    trainer, callback = make_trainer(tmp_path, model, max_steps=6, links=3)
    assert len(cola.lora_layers(model)) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    w0 = model.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    trainer.train()
    chain = callback.chain
    assert [r.step for r in chain.history] == [2, 4] and chain.link == 2 and chain.step_count == 6
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base.weight, w0)   # knots merged
    assert (tmp_path / "out" / "checkpoint-3" / "cola_chain.pt").is_file()


def test_trainer_callback_rejects_unknown_settings():
    import cola.integrations

    with pytest.raises(cola.ConfigError, match="unknown chain settings \\['linkz'\\]"):
        cola.integrations.ColaCallback(linkz=3)


def test_trainer_report_to_tensorboard_shows_each_knot_at_its_step(tmp_path, monkeypatch):
    """The callback's knot metrics join the Trainer's log event of the knot's step: its own TensorBoard
    integration writes them (read back from the event files), and state.log_history holds them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import cola.integrations

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="no", logging_steps=5, report_to=["tensorboard"], use_cpu=True, seed=0,
        lr_scheduler_type="constant", disable_tqdm=True)
    callback = cola.integrations.ColaCallback(rank=2, alpha=4, links=3, diagnostics=True)
    trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=[callback])
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("ColaCallback") < names.index("TensorBoardCallback")   # the knots reach the reporter
    trainer.train()
    assert [r.step for r in callback.chain.history] == [2, 4]
    logged = {e["step"]: e for e in trainer.state.log_history if "cola/knot/link" in e}
    assert sorted(logged) == [2, 4] and [logged[s]["cola/knot/link"] for s in (2, 4)] == [0.0, 1.0]
    assert "loss" in logged[2] and "cola/knot/effective_rank_mean" in logged[4]
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tag = next(t for t in events.Tags()["scalars"] if t.endswith("cola/knot/norm_mean"))
    report = {r.step: r for r in callback.chain.history}
    got = [(e.step, e.value) for e in events.Scalars(tag)]
    assert [s for s, _ in got] == [2, 4]
    for step, value in got:
        norms = list(report[step].norms.values())
        assert value == pytest.approx(sum(norms) / len(norms), rel=1e-5)
