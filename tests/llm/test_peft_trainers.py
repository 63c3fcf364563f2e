"""ColaCallback on PEFT models in transformers' Trainer and TRL's SFTTrainer, and ``cola train`` continuing a
PEFT adapter: knots tied, the loss falls, and what is saved (at the end and in every checkpoint) loaded by
peft onto the original base reproduces the trained model. Tiny Llama / OPT from configs (conftest.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import cola

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import cola.integrations  # noqa: E402

LORA = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
TEXTS = ["It was great\nYes", "It was terrible\nNo", "Maybe it was good", "No, it was bad"] * 4


@pytest.fixture(scope="module")
def tok(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = "<pad>"
    return tok


@pytest.fixture(scope="module")
def ids(tok):
    return tok(TEXTS[:4], return_tensors="pt", padding=True)["input_ids"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def base(make_model):
    """``base()``: the original base model (a tiny Llama), the same weights on every call."""
    return lambda: make_model("llama")


class Texts(torch.utils.data.Dataset):
    def __init__(self, tok):
        self.rows = [tok(t)["input_ids"][:12] for t in TEXTS]
        self.rows = [r + [tok.pad_token_id] * (12 - len(r)) for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = torch.tensor(self.rows[i])
        return {"input_ids": row, "labels": row}


class Probe(transformers.TrainerCallback):
    """The model's logits right after step ``at`` (after the chain counted it), to compare a checkpoint with."""

    def __init__(self, ids, at):
        self.ids, self.at, self.seen = ids, at, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            self.seen = logits(model, self.ids)


def losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def text_loss(model, tok):
    """The language-modelling loss on all of TEXTS (pads ignored), the same batch before and after."""
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def common_args(tmp_path):
    return dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2,
                save_steps=3, save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True, seed=0,
                lr_scheduler_type="constant", disable_tqdm=True)


def check_saved(folder: Path, base, ids, expected, rank):
    """``folder``'s adapter over a fresh original base gives ``expected``; its config has total rank ``rank``."""
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == rank
    loaded = peft.PeftModel.from_pretrained(base(), folder)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-4, rtol=1e-4)


def test_trainer_with_a_peft_model_saves_the_whole_chain_over_the_original_base(tmp_path, tok, ids, base):
    model = peft.get_peft_model(base(), peft.LoraConfig(**LORA))
    callback, probe = cola.integrations.ColaCallback(links=3), Probe(ids, at=3)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common_args(tmp_path)),
                                   train_dataset=Texts(tok), callbacks=[callback, probe])
    trainer.train()
    chain = callback.chain
    assert [r.step for r in chain.history] == [2, 4] and chain.step_count == 6
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in chain.params}      # the Trainer's optimizer trained exactly the chain
    seen = losses(trainer)
    assert len(seen) == 6 and seen[-1] < seen[0]
    assert isinstance(trainer.model, peft.PeftModel) and trainer.model is model and not cola.lora_layers(model)
    trained = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    check_saved(tmp_path / "adapter", base, ids, trained, rank=6)
    trainer.save_model(str(tmp_path / "saved"))
    check_saved(tmp_path / "saved", base, ids, trained, rank=6)
    # the checkpoint at step 3 (one knot, the second link live) holds the chain so far, over the original base
    ckpt = tmp_path / "out" / "checkpoint-3"
    assert (ckpt / cola.integrations.STATE_FILE).is_file() and not list(ckpt.glob(".cola-adapter-*"))
    check_saved(ckpt, base, ids, probe.seen, rank=4)
    check_saved(tmp_path / "out" / "checkpoint-6", base, ids, trained, rank=6)


def test_trainer_with_a_peft_model_refuses_load_best_model_at_end(tmp_path, tok, base):
    model = peft.get_peft_model(base(), peft.LoraConfig(**LORA))
    args = transformers.TrainingArguments(**common_args(tmp_path), eval_strategy="steps", eval_steps=3,
                                          load_best_model_at_end=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Texts(tok), eval_dataset=Texts(tok),
                                   callbacks=[cola.integrations.ColaCallback(links=3)])
    with pytest.raises(cola.ConfigError, match="load_best_model_at_end"):
        trainer.train()


def sft_config(tmp_path, **changes):
    from trl import SFTConfig

    # float32 (TRL's default bf16=True autocasts, and accelerate leaves the model's forward autocast after
    # training, so its logits would not compare with a fresh float32 model's within float32 tolerance)
    settings = dict(common_args(tmp_path), max_steps=4, save_steps=2, max_length=16, dataset_text_field="text",
                    packing=False, bf16=False)
    settings.update(changes)
    return SFTConfig(**settings)


@pytest.mark.parametrize("given", ["peft_config", "peft_model"])
def test_trl_sft_trainer_with_peft_gains_a_chain_from_one_callback(tmp_path, tok, ids, base, given):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    config = peft.LoraConfig(**LORA)
    model = base() if given == "peft_config" else peft.get_peft_model(base(), config)
    callback = cola.integrations.ColaCallback(links=2)
    before = text_loss(model, tok)
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS}),
                             processing_class=tok, callbacks=[callback],
                             peft_config=config if given == "peft_config" else None)
    trainer.train()
    assert [r.step for r in callback.chain.history] == [2] and len(losses(trainer)) == 4
    assert isinstance(trainer.model, peft.PeftModel)
    assert text_loss(trainer.model, tok) < before - 0.05
    trained = logits(trainer.model, ids)
    trainer.save_model(str(tmp_path / "saved"))
    check_saved(tmp_path / "saved", base, ids, trained, rank=4)
    check_saved(tmp_path / "out" / "checkpoint-4", base, ids, trained, rank=4)


def test_trl_sft_trainer_with_a_bare_model_gets_cola_lora(tmp_path, tok, base):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = base()
    callback = cola.integrations.ColaCallback(links=2, rank=2, alpha=4)
    before = text_loss(model, tok)
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=Dataset.from_dict({"text": TEXTS}),
                             processing_class=tok, callbacks=[callback])
    assert len(cola.lora_layers(model)) == 4 and callback.chain is None
    trainer.train()
    assert [r.step for r in callback.chain.history] == [2] and callback.chain.peft is None
    assert text_loss(model, tok) < before - 0.05


def test_cola_train_continues_a_peft_adapter_folder_as_its_first_link(tmp_path, tok, ids, make_model):
    """``--model`` a PEFT adapter folder: its base is loaded, then the adapter, which the chain continues; with
    an LR below float32's resolution the run's exported adapter over the original base is the starting adapter's
    function exactly where it began (so link 0 was the adapter, not a fresh init), with rank links x r."""
    from cola.llm.experiment import run_experiment
    from cola.llm.settings import TrainSettings

    fixtures = Path(__file__).parent / "fixtures"
    make_model("opt").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    start = peft.get_peft_model(make_model("opt"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    start.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    start.save_pretrained(tmp_path / "start")
    begin = logits(start, ids)
    settings = TrainSettings(model=str(tmp_path / "start"), task="sst2", data_dir=str(fixtures), n_train=6, n_val=2,
                             n_test=4, steps=4, batch_size=2, eval_batch_size=4, links=2, rank=8, lr=1e-30, plots=False,
                             output_dir=str(tmp_path / "run"), log_every=1)
    results = run_experiment(settings)
    (run,) = results["runs"]
    assert run["status"] == "complete" and run["knots"] == [2] and [k["step"] for k in run["knot_reports"]] == [2]
    adapter = Path(run["outputs"]["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(make_model("opt"), adapter)
    torch.testing.assert_close(logits(loaded, ids), begin, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(make_model("opt"), ids), begin, atol=1e-3)   # the adapter does something


def test_trainer_with_a_peft_model_resumes_from_a_checkpoint_exactly(tmp_path, tok, ids, base):
    """Whatever the Trainer loads from the checkpoint's adapter, the callback restores the chain's state
    (merged weights, live link, optimizer) from ``cola_chain.pt``: the resumed run ends where the uninterrupted
    one did and gives the same adapter. A checkpoint outside the run's output_dir is refused (no chain state)."""
    def run(out, resume=None):
        model = peft.get_peft_model(base(), peft.LoraConfig(**LORA))
        callback = cola.integrations.ColaCallback(links=3)
        args = transformers.TrainingArguments(**dict(common_args(tmp_path), output_dir=str(out)))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Texts(tok), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return model, callback.chain

    whole, _ = run(tmp_path / "a")
    with pytest.raises(cola.ConfigError, match="resume from a checkpoint in this run's output_dir"):
        run(tmp_path / "elsewhere", resume=str(tmp_path / "a" / "checkpoint-3"))
    resumed, chain = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert [r.step for r in chain.history] == [2, 4] and chain.step_count == 6
    torch.testing.assert_close(logits(resumed, ids), logits(whole, ids), atol=1e-6, rtol=1e-6)
    resumed.save_pretrained(tmp_path / "adapter")
    check_saved(tmp_path / "adapter", base, ids, logits(whole, ids), rank=6)


def test_the_plan_of_an_adapter_folder_counts_its_own_rank_and_targets(tmp_path, tok, make_model):
    """``--model`` a PEFT adapter folder (r=2 on v_proj only): the plan's trainable parameters per link are the
    adapter's, loaded or in a dry run, whatever --rank and --targets say."""
    from cola.llm.experiment import run_experiment
    from cola.llm.settings import TrainSettings

    fixtures = Path(__file__).parent / "fixtures"
    make_model("opt").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    start = peft.get_peft_model(make_model("opt"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    start.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    start.save_pretrained(tmp_path / "start")
    hidden = make_model("opt").config.hidden_size
    expected = 2 * (hidden + hidden) * 2          # r x (in + out), 2 layers of v_proj
    common = dict(model=str(tmp_path / "start"), task="sst2", data_dir=str(fixtures), n_train=6, n_val=2, n_test=4,
                  steps=4, batch_size=2, eval_batch_size=4, links=2, rank=8, targets=["q_proj", "v_proj"],
                  plots=False, log_every=1)
    dry = run_experiment(TrainSettings(**common, dry_run=True, output_dir=str(tmp_path / "dry")))
    assert dry["plan"]["methods"]["cola"]["trainable_params"] == [expected, expected]
    assert dry["plan"]["methods"]["cola"]["ranks"] == [2, 2] and dry["plan"]["model"]["lora_targets"] == ["v_proj"]
    run = run_experiment(TrainSettings(**common, output_dir=str(tmp_path / "run")))
    assert run["plan"]["methods"]["cola"]["trainable_params"] == [expected, expected]
    assert run["runs"][0]["trainable_params"] == expected


@pytest.mark.parametrize("kind", ["peft", "bare"])
def test_a_second_train_is_refused_and_a_new_trainer_continues_the_chain(tmp_path, tok, ids, base, kind):
    """The same Trainer's second train() would train nothing (PEFT: its optimizer holds the parameters the
    conversion replaced) or drop the live link (bare): refused, saying what works. A new Trainer on the saved
    adapter (PEFT) or on the merged model (bare) continues: its first link starts where the first chain ended,
    and what it saves over the original base is the twice-trained model."""
    first = peft.get_peft_model(base(), peft.LoraConfig(**LORA)) if kind == "peft" else base()
    trainer = transformers.Trainer(model=first, args=transformers.TrainingArguments(**common_args(tmp_path)),
                                   train_dataset=Texts(tok), callbacks=[cola.integrations.ColaCallback(links=3, rank=2,
                                                                                                        alpha=4)])
    trainer.train()
    after_one, loss_one = logits(first, ids), text_loss(first, tok)
    with pytest.raises(cola.ConfigError, match="a second trainer.train\\(\\) cannot continue the chain"):
        trainer.train()
    torch.testing.assert_close(logits(first, ids), after_one)          # refused before anything changed
    if kind == "peft":
        trainer.save_model(str(tmp_path / "one"))
        second = peft.PeftModel.from_pretrained(base(), tmp_path / "one", is_trainable=True)
    else:
        second = cola.merge_and_unload(first)
    torch.testing.assert_close(logits(second, ids), after_one, atol=1e-5, rtol=1e-5)   # it starts where it ended
    args = transformers.TrainingArguments(**dict(common_args(tmp_path), output_dir=str(tmp_path / "two")))
    callback = cola.integrations.ColaCallback(links=2, rank=2, alpha=4)
    again = transformers.Trainer(model=second, args=args, train_dataset=Texts(tok), callbacks=[callback])
    again.train()
    assert [r.step for r in callback.chain.history] == [3]
    assert text_loss(second, tok) < loss_one                                       # it went on learning
    if kind == "peft":
        again.save_model(str(tmp_path / "two-adapter"))
        check_saved(tmp_path / "two-adapter", base, ids, logits(second, ids), rank=6 * 2)
