"""The embedded corpora tokenised once per tokenizer, on disk: ``<cache root>/tokens/<corpus>-<tokenizer>.npz``.

Tokenising the Cantonese sentences or the standard library takes seconds to tens of seconds, each ``cola train``
and each dry run of a sweep; their token ids and bytes per token depend only on the text (its content fingerprint)
and the tokenizer (the SHA-256 of its ``tokenizer.json``), which name the file. A user's own files, a slow tokenizer
(no ``tokenizer.json``) or a cache that cannot be written are tokenised each time, as before.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cola.io import OutputError, atomic_write
from cola.llm.models import cache_root
from cola.llm.tasks.blocks import EncodedDocument, encode_documents
from cola.llm.tasks.corpus_sources import EMBEDDED_PREFIX, Document

log = logging.getLogger(__name__)

def tokenizer_fingerprint(tokenizer) -> str | None:
    """The first 16 hex digits of the SHA-256 of a fast tokenizer's serialised form (None for a slow one); about
    20 ms for a 49k vocabulary, so computed at each call rather than remembered by an object's id."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    text = backend.to_str() if backend is not None else None
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else None


def encoded_documents(documents: Sequence[Document], fingerprint: str, tokenizer,
                      source: str | None) -> list[EncodedDocument]:
    """:func:`cola.llm.tasks.blocks.encode_documents` of ``documents`` (whose content fingerprint is
    ``fingerprint``), read from the cache when ``source`` is an embedded corpus (``None``: the default one)."""
    key = tokenizer_fingerprint(tokenizer)
    if key is None or (source is not None and not str(source).startswith(EMBEDDED_PREFIX)):
        return encode_documents(documents, tokenizer)
    path = cache_root() / "tokens" / f"{fingerprint.replace(':', '_')}-{key}.npz"
    found = _read(path, documents)
    if found is not None:
        return found
    encoded = encode_documents(documents, tokenizer)
    _write(path, encoded)
    return encoded


def _read(path: Path, documents: Sequence[Document]) -> list[EncodedDocument] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            ids, token_bytes, lengths = data["ids"], data["token_bytes"], data["lengths"]
    except (OSError, ValueError, KeyError) as exc:
        log.info("%s: unreadable (%s); tokenising again", path, exc)
        return None
    if len(lengths) != len(documents) or int(lengths.sum()) != len(ids):
        return None
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [EncodedDocument(doc.name, ids[a:b].astype(np.int64), token_bytes[a:b])
            for doc, a, b in zip(documents, starts.tolist(), ends.tolist())]


def _write(path: Path, encoded: list[EncodedDocument]) -> None:
    buffer = io.BytesIO()
    empty = np.zeros(0, np.int32)
    ids = np.concatenate([e.ids for e in encoded]).astype(np.int32) if encoded else empty
    token_bytes = np.concatenate([e.token_bytes for e in encoded]).astype(np.int32) if encoded else empty
    np.savez(buffer, ids=ids, token_bytes=token_bytes, lengths=np.asarray([len(e.ids) for e in encoded], np.int64))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getvalue(), what="token cache")
    except (OSError, OutputError) as exc:   # a read-only or full cache: tokenised again next time
        log.info("%s: not written (%s)", path, exc)
