"""Tiny tokenizer and models (OPT and Llama families) for fast tests of cola.llm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
TASKS_WITH_FIXTURES = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc")
ANSWER_WORDS = (" terrible", " great", "Yes", "No", "Maybe", " good", " bad")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine tiny matmuls with 2 threads run 1000x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fixture_rows(task: str, split: str = "train") -> list[dict]:
    """The rows of ``fixtures/<task>/<split>.jsonl``."""
    path = FIXTURES / task / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _corpus() -> list[str]:
    texts = []
    for task in TASKS_WITH_FIXTURES:
        for split in ("train", "validation"):
            texts += [json.dumps(row) for row in fixture_rows(task, split)]
    texts += list(ANSWER_WORDS) * 200 + ["It was great\nYes\nNo\nMaybe"] * 50
    return texts


def build_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / OPT style) that prepends ``</s>`` as BOS, like OPT's.

    The answer words are single tokens; rare words split into several.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    bos = bpe.token_to_id("</s>")
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                       special_tokens=[("</s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny tokenizer of :func:`build_tokenizer`, without a pad token (as OPT-like ones may be)."""
    return build_tokenizer()


def tiny_opt(vocab_size: int, seed: int = 0):
    """A 2-layer OPT whose word embedding (16) is narrower than its hidden size (32)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=16,
                       pad_token_id=0, bos_token_id=1, eos_token_id=1, dropout=0.0, attention_dropout=0.0,
                       init_std=0.2)
    return OPTForCausalLM(config).eval()


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama with grouped-query attention and an untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session", params=["opt", "llama"])
def tiny_model(request, tokenizer):
    """Each family's tiny model in turn (float32, CPU, eval mode)."""
    build = tiny_opt if request.param == "opt" else tiny_llama
    return build(len(tokenizer))


@pytest.fixture(scope="session")
def rows():
    """``rows(task, split="train")``: the fixture rows of a task."""
    return fixture_rows


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The folder of fixture files (``<task>/train.jsonl``, ``validation.jsonl``, ``generic/``)."""
    return FIXTURES


@pytest.fixture
def make_model(tokenizer):
    """``make_model(family, seed=0)``: a fresh tiny model (for tests that change it)."""
    def make(family: str, seed: int = 0):
        return (tiny_opt if family == "opt" else tiny_llama)(len(tokenizer), seed)
    return make


@pytest.fixture(scope="module")
def tok(tokenizer):
    """This module's own copy of the tiny tokenizer (a run gives it a pad token; the shared one has none)."""
    import copy

    return copy.deepcopy(tokenizer)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tok):
    """A tiny OPT and its tokenizer saved with save_pretrained, as ``cola train --model`` reads them."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("tiny-opt")
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1,
                       eos_token_id=1, dropout=0.0, attention_dropout=0.0, init_std=0.2)
    OPTForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
