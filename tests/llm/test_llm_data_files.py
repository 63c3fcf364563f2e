"""Reading local data files through ``datasets``: what comes back, what is dropped, what is left behind."""

from __future__ import annotations

import json
import logging
import tempfile

import pytest

from cola.llm.tasks.data import load_splits, read_rows
from cola.llm.tasks import DataError

datasets = pytest.importorskip("datasets")


def test_byte_order_marks_are_skipped(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbftext,label\nx,1\n")
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "x", "label": 1}\n')
    assert read_rows(tmp_path / "a.csv") == [{"text": "x", "label": "1"}]
    assert read_rows(tmp_path / "a.jsonl") == [{"text": "x", "label": 1}]


def test_csv_cells_stay_the_strings_written(tmp_path):
    # no type guessing ("01" stays "01"), no "NA"/"None" -> null, no first column taken as an index
    (tmp_path / "a.csv").write_text('text,label\n01,NA\nNone,\n"two\nlines",1.50\n')
    assert read_rows(tmp_path / "a.csv") == [{"text": "01", "label": "NA"}, {"text": "None", "label": ""},
                                             {"text": "two\nlines", "label": "1.50"}]


def test_a_header_alone_or_nothing_has_no_examples(tmp_path):
    (tmp_path / "train.csv").write_text("premise,hypothesis,label\n")
    assert read_rows(tmp_path / "train.csv") == []
    (tmp_path / "empty.csv").write_text("")
    assert read_rows(tmp_path / "empty.csv") == []
    with pytest.raises(DataError, match="has no examples"):
        load_splits("rte", tmp_path)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"a\.jsonl, line 3: expected a JSON object, got list"):
        read_rows(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text('[\n  {"a": 1},\n  {"a": 2 "b": 3}\n]\n')
    with pytest.raises(DataError, match=r"b\.json, line 3: not valid JSON"):
        read_rows(tmp_path / "b.json")
    (tmp_path / "c.csv").write_text('a,b\n"unclosed,1\n')
    with pytest.raises(DataError, match=r"c\.csv: could not read it as CSV"):
        read_rows(tmp_path / "c.csv")


def test_a_legitimate_replacement_character_is_kept_beside_bad_bytes(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n' + json.dumps({"text": "ok \ufffd"}, ensure_ascii=False).encode() + b"\n")
    with caplog.at_level(logging.WARNING):
        assert read_rows(path) == [{"text": "ok \ufffd"}]
    assert "dropped 1 of 2 rows" in caplog.text


def test_nothing_is_left_behind_and_datasets_settings_are_restored(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cache = datasets.config.HF_DATASETS_CACHE
    before = sorted(cache.rglob("*")) if cache.exists() else []
    level = datasets.logging.get_verbosity()
    datasets.enable_progress_bars()
    (tmp_path / "a.csv").write_bytes(b"text\ncaf\xe9\nok\n")  # the bad-bytes path writes a copy too
    assert read_rows(tmp_path / "a.csv") == [{"text": "ok"}]
    assert list(scratch.iterdir()) == []
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before
    assert datasets.logging.get_verbosity() == level and datasets.is_progress_bar_enabled()
