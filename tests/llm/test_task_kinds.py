"""The kinds of task behind one interface: chosen once by name, so that a new kind is one module and its name."""

from __future__ import annotations

import pytest

from cola.errors import ConfigError
from cola.llm.experiment import run_experiment
from cola.llm.settings import TrainSettings
from cola.llm.tasks import kinds
from cola.llm.tasks.corpus import CorpusKind


def test_every_name_has_one_kind():
    assert kinds.kind_of("corpus").name == "corpus" and kinds.kind_of("facts").name == "facts"
    for name in ("sst2", "tweets", "custom", None):
        assert kinds.kind_of(name) is kinds.CLASSIFICATION
    assert TrainSettings(task="corpus").objective == "blocks"
    assert TrainSettings(task="facts", train_file="synthetic:8").objective == "lm"
    assert TrainSettings(task="sst2", loss="lm").objective == "lm"
    with pytest.raises(ConfigError, match=r"task='corpse': unknown; closest: corpus.*corpus \(raw text\), facts"):
        TrainSettings(task="corpse")


class _ShortText(CorpusKind):
    """A fourth kind, as a user would add one: raw text with its own defaults."""

    name = "short-text"
    embedded_profile = {**CorpusKind.embedded_profile, "steps": 7, "max_length": 32}


def test_a_new_kind_is_one_class_and_its_name(monkeypatch, tmp_path):
    monkeypatch.setitem(kinds.KINDS, "short-text", _ShortText())
    (tmp_path / "text.txt").write_text("\n\n".join(f"Paragraph {i} of a short text, with a few words." for i in range(80)))
    (tmp_path / "reference.txt").write_text("\n\n".join(f"Another text, number {i}." for i in range(80)))
    settings = TrainSettings(task="short-text", dry_run=True, train_file=str(tmp_path / "text.txt"),
                             reference_file=str(tmp_path / "reference.txt"), n_val=2, n_test=4)
    assert settings.resolved().steps == 7 and settings.resolved().max_length == 32
    plan = run_experiment(settings)["plan"]
    assert plan["total_steps"] == 7 and plan["max_length"] == 32
    with pytest.raises(ConfigError, match="template is not for --task corpus"):
        TrainSettings(task="short-text", template="{text}")
