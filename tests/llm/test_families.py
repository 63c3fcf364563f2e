"""Every tested model family end to end: ``cola train`` on a tiny saved model, its PEFT adapter, its merged model.

:data:`FAMILIES` holds one tiny-config builder per family (``config.model_type``); the parametrised
test runs over it, and :data:`cola.llm.models.SUPPORTED_FAMILIES` (the "tested families" that
``load_model`` does not warn about) must be exactly its list. Per family: the model is saved with
``save_pretrained`` (plus the tiny tokenizer) and trained through :func:`cola.llm.run_experiment` with
the family's default LoRA targets (two links, so one knot is tied); the training loss falls; the
exported adapter loaded by ``peft.PeftModel.from_pretrained`` over the original model and the merged
model loaded by ``from_pretrained`` both reproduce the trained model (its recorded test loss, and each
other's logits). Families the installed transformers lacks are skipped.

Family quirks this covers: tied word embeddings (Gemma 1-3, GPT-2; LoRA on the tied head is
refused), Gemma 2's attention and final-logit soft-capping, sliding-window attention narrower than
the sequences (Mistral, Gemma 2 and 3), GPT-2's Conv1D projections (PEFT's ``fan_in_fan_out``) and
the fused projections of GPT-2 (``c_attn``) and Phi-3 (``qkv_proj``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

import cola
from cola.llm.experiment import run_experiment
from cola.llm.models import SUPPORTED_FAMILIES, family_default_targets
from cola.llm.settings import TrainSettings

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures"
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)          # the tiny tokenizer's
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **_IDS)

# model_type: (config class, model class, config arguments, default LoRA targets)
FAMILIES: dict[str, tuple[str, str, dict, list[str]]] = {
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, max_position_embeddings=256,
                 word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0, init_std=0.2, **_IDS),
            ["q_proj", "v_proj"]),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER, tie_word_embeddings=False), ["q_proj", "v_proj"]),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=6), ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER), ["q_proj", "v_proj"]),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=8), ["q_proj", "v_proj"]),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, head_dim=8), ["q_proj", "v_proj"]),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_DECODER, head_dim=8, sliding_window=6, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
               ["q_proj", "v_proj"]),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DECODER, head_dim=8, sliding_window=6),
                    ["q_proj", "v_proj"]),
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration",
               dict(text_config=dict(_DECODER, head_dim=8, sliding_window=6),
                    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
                    mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=7),
               [r"(.*\.)?language_model\.(.*\.)?q_proj", r"(.*\.)?language_model\.(.*\.)?v_proj"]),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER), ["qkv_proj"]),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, **_IDS),
             ["c_attn"]),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_DECODER), ["q_proj", "v_proj"]),
}
TIED = ("gemma", "gemma2", "gemma3_text", "gemma3", "gpt2")


def test_the_tested_families_are_this_tests_list():
    assert tuple(FAMILIES) == SUPPORTED_FAMILIES


def build(family: str, vocab_size: int, seed: int = 0):
    """The family's tiny model (float32, eval mode); skipped when transformers lacks the family."""
    config_name, model_name, kwargs, _ = FAMILIES[family]
    if not (hasattr(transformers, config_name) and hasattr(transformers, model_name)):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(seed)
    if "text_config" in kwargs:   # a multimodal config: the vocabulary is its language model's
        kwargs = {**kwargs, "text_config": {**kwargs["text_config"], "vocab_size": vocab_size}}
        config = getattr(transformers, config_name)(**kwargs)
    else:
        config = getattr(transformers, config_name)(vocab_size=vocab_size, **kwargs)
    model = getattr(transformers, model_name)(config).eval()
    assert model.config.model_type == family
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _test_scores(model, folder, settings):
    """The test split's scores of ``model`` with the tokenizer the run loaded from ``folder``."""
    from cola.llm.tasks.classification import build_task, load_data
    from cola.llm.models import prepare_tokenizer
    from cola.llm.objective import evaluate

    tok = prepare_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    task = build_task(settings)
    splits = load_data(settings, task, 0)
    return evaluate(model, tok, task, splits.test, 4, settings.eval_rule, settings.max_length)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_exports_and_round_trips(family, tmp_path, tok, caplog):
    peft = pytest.importorskip("peft")
    # a few spare rows: loaded from the folder, Qwen2's tokenizer class adds its own pad token
    base = build(family, len(tok) + 8)
    targets = FAMILIES[family][3]
    assert family_default_targets(base) == targets
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    tok.save_pretrained(folder)

    # one batch of every training example, so each step sees the same data and the loss must fall
    settings = TrainSettings(model=str(folder), task="sst2", data_dir=str(FIXTURES), n_train=4, n_val=2, n_test=4,
                             steps=6, batch_size=4, eval_batch_size=4, links=2, rank=2, lr=2e-2, plots=False,
                             save_merged=True, save_links=False, output_dir=str(tmp_path / "run"), log_every=1,
                             device="cpu", dtype="float32")
    with caplog.at_level(logging.WARNING, logger="cola.llm.models"):
        results = run_experiment(settings)
    assert not [r for r in caplog.records if "outside the tested families" in r.getMessage()]
    (run,) = results["runs"]
    assert run["knots"] == [3] and len(run["train_loss"]) == 6
    assert run["train_loss"][-1] < run["train_loss"][0] - 1e-3, run["train_loss"]
    want = run["test"]["loss"]
    assert want != pytest.approx(results["zero_shot"]["test"]["loss"], abs=1e-4)  # training changed the model

    adapter = Path(run["outputs"]["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 2 * settings.rank                        # the whole chain: both links
    assert config["fan_in_fan_out"] is (family == "gpt2")          # GPT-2's Conv1D weights are in x out
    leaves = sorted(re.sub(r".*[^A-Za-z0-9_]", "", t) for t in targets)   # a pattern's layer name
    assert sorted({m.rsplit(".", 1)[-1] for m in config["target_modules"]}) == leaves
    assert not any("vision" in m for m in config["target_modules"])   # Gemma 3: its language model only
    assert len(config["target_modules"]) == 2 * len(targets)      # two layers

    original = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(original, ids)
    with_adapter = peft.PeftModel.from_pretrained(original, str(adapter)).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(run["outputs"]["merged"], dtype=torch.float32).eval()
    assert type(merged) is type(base)
    got_peft, got_merged = _logits(with_adapter, ids), _logits(merged, ids)
    assert (got_merged - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(got_peft, got_merged, atol=2e-5, rtol=1e-4)
    for model in (with_adapter, merged):
        assert _test_scores(model, folder, settings)["loss"] == pytest.approx(want, abs=1e-5)
    _check_quirks(family, folder, merged, ids, got_merged)


def _check_quirks(family, folder, merged, ids, logits):
    """The family's special features were in force (so the round trip above covered them)."""
    config = merged.config
    if getattr(config, "final_logit_softcapping", None):           # Gemma 2: logits within +-cap
        assert logits.abs().max() < config.final_logit_softcapping
    text = getattr(config, "text_config", None) or config                # Gemma 3: its language model's window
    window = getattr(text, "sliding_window", None)
    if window is not None:                                          # a window narrower than the input: it matters
        assert window < ids.shape[1]
        load = transformers.AutoModelForCausalLM.from_pretrained
        wide = transformers.AutoConfig.from_pretrained(folder)
        (getattr(wide, "text_config", None) or wide).sliding_window = 4 * ids.shape[1]
        windowed, unwindowed = load(folder, dtype=torch.float32), load(folder, config=wide, dtype=torch.float32)
        assert (_logits(windowed.eval(), ids) - _logits(unwindowed.eval(), ids)).abs().max() > 1e-3
    if family in TIED:                                              # the merged head is still the embedding
        assert merged.lm_head.weight is merged.get_input_embeddings().weight


@pytest.mark.parametrize("family, fused", [("gpt2", "c_attn"), ("phi3", "qkv_proj")])
def test_cola_train_command_on_a_fused_projection_family(family, fused, tmp_path, tok, capsys):
    """``cola train --model <folder>``: GPT-2 (Conv1D) and Phi-3 get LoRA on their fused q/k/v projection."""
    from cola.cli import main

    folder = tmp_path / family
    build(family, len(tok) + 8).save_pretrained(folder)
    tok.save_pretrained(folder)
    args = ["-q", "train", "--model", str(folder), "--task", "sst2", "--data-dir", str(FIXTURES), "--n-train", "4",
            "--n-val", "2", "--n-test", "2", "--steps", "2", "--batch-size", "2", "--links", "2", "--rank", "2",
            "--no-plots", "--device", "cpu", "--output-dir", str(tmp_path / "run")]
    assert main([*args, "--dry-run"]) == 0
    assert f"LoRA on 2 layers ({fused})" in capsys.readouterr().out
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    (run,) = results["runs"]
    assert run["knots"] == [1]
    config = json.loads((Path(run["outputs"]["adapter"]) / "adapter_config.json").read_text())
    pattern = "transformer.h.{}.attn.c_attn" if family == "gpt2" else "model.layers.{}.self_attn.qkv_proj"
    assert sorted(config["target_modules"]) == [pattern.format(i) for i in (0, 1)]


@pytest.mark.parametrize("family", TIED)
def test_lora_on_a_tied_lm_head_is_refused(family, tok):
    model = build(family, len(tok))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(cola.ConfigError, match=r"lm_head: its weight is tied to .*embed.*tie_word_embeddings"):
        cola.inject_lora(model, ["lm_head"], rank=2)
    assert not cola.lora_layers(model)
