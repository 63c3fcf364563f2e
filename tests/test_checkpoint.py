"""Checkpoint files: atomic, checksummed; damaged ones are refused. Config parsing is fuzzed."""

import dataclasses
import os
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cola
from cola.checkpoint import TRAILER


def test_round_trip_and_trailer(tmp_path):
    obj = {"w": torch.randn(4, 4), "step": 3}
    path = cola.save_checkpoint(tmp_path / "c.pt", obj)
    got = cola.load_checkpoint(path)
    assert torch.equal(got["w"], obj["w"]) and got["step"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@given(cut=st.integers(1, 2000))
def test_truncated_checkpoints_are_refused(tmp_path_factory, cut):
    path = tmp_path_factory.mktemp("t") / "c.pt"
    cola.save_checkpoint(path, {"w": torch.arange(1000.0)})
    data = path.read_bytes()
    path.write_bytes(data[: max(0, len(data) - cut)])
    with pytest.raises(cola.ColaError, match="truncated|no checksum|corrupted"):
        cola.load_checkpoint(path)


@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_anywhere_is_detected(tmp_path_factory, position, bit):
    path = tmp_path_factory.mktemp("f") / "c.pt"
    cola.save_checkpoint(path, {"w": torch.arange(1000.0)})
    data = bytearray(path.read_bytes())
    i = int(position * (len(data) - TRAILER))
    data[i] ^= 1 << bit
    path.write_bytes(bytes(data))
    with pytest.raises(cola.ColaError, match="corrupted"):
        cola.load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(cola.ColaError, match="does not exist"):
        cola.load_checkpoint(tmp_path / "nope.pt")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = cola.save_checkpoint(tmp_path / "c.pt", {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        cola.save_checkpoint(path, {"v": 2})
    monkeypatch.undo()
    assert cola.load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-3, 50), max_size=5),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
CHAIN_FIELDS = [f.name for f in dataclasses.fields(cola.ChainConfig)]
keys = st.sampled_from(CHAIN_FIELDS + ["lnks", "rank", ""])


def names_key(problem: str, key: str) -> bool:
    """True when ``problem`` names ``key`` as a word (``links=0: ...``, ``unknown setting 'lnks'``)."""
    return repr(key) in problem or bool(key) and re.search(rf"(?<![\w]){re.escape(key)}(?!\w)", problem) is not None


names = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10)
plausible = {  # values of the right type (most valid), so that parsing often succeeds
    "links": st.integers(1, 6), "knots": st.lists(st.integers(1, 60), max_size=4, unique=True).map(sorted),
    **{kind: st.sampled_from(["even", "knots", "lora", "pissa", "add", "reset", "continue"]) | names
       for kind in cola.config.STRATEGY_KINDS},
    **{kind + "_options": st.dictionaries(names, st.integers(0, 9) | names, max_size=2)
       for kind in cola.config.STRATEGY_KINDS},
    "lr_schedule": st.sampled_from(cola.config.LR_SCHEDULES), "warmup_steps": st.integers(0, 9),
    "seed": st.integers(-9, 2**40), "record_links": st.booleans(), "skip_nonfinite": st.booleans(),
    "diagnostics": st.booleans(),
}
plausible_configs = st.fixed_dictionaries({"total_steps": st.integers(1, 60)},
                                          optional={k: v for k, v in plausible.items() if k in CHAIN_FIELDS})


@settings(max_examples=60, deadline=None)
@given(data=st.dictionaries(keys, values, max_size=8) | plausible_configs)
def test_config_parsing_round_trips_or_names_the_offending_key(data):
    """Whatever a config file holds: a ChainConfig that stores exactly the given values and survives
    ``to_dict`` -> ``from_dict`` unchanged, or a cola.ConfigError whose every problem names a key."""
    try:
        cfg = cola.ChainConfig.from_dict(data)
    except cola.ConfigError as err:
        assert err.problems and all(err.problems)
        named = list(data) + ["total_steps"]  # the one required key may be the missing one
        for problem in err.problems:
            assert any(names_key(problem, k) for k in named), (problem, data)
        for unknown in set(data) - set(CHAIN_FIELDS):
            assert any(repr(unknown) in p for p in err.problems), (unknown, err.problems)
        return
    for key, value in data.items():  # ChainConfig normalises nothing: what was given is what is stored
        stored = getattr(cfg, key)
        assert stored == value and type(stored) is type(value), (key, value, stored)
    again = cola.ChainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 50), field=st.sampled_from(["total_steps", "links", "knots", "warmup_steps", "seed",
                                                    "lr_schedule", "record_links", "reinit", "reinit_options"]),
       bad=values)
def test_one_bad_value_in_a_valid_config_is_named(T, field, bad):
    """A valid config with one field replaced: accepted (and stored) or refused naming that field."""
    data = {"total_steps": T, "links": 1, "knots": [T], "seed": 1, field: bad}
    try:
        cfg = cola.ChainConfig.from_dict(data)
    except cola.ConfigError as err:
        assert any(names_key(p, field) for p in err.problems), (field, bad, err.problems)
        return
    assert getattr(cfg, field) == bad
