"""Checkpoint files: atomic, checksummed; damaged ones are refused. Config parsing is fuzzed."""

import os

import pytest
import torch
from hypothesis import given, strategies as st

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
keys = st.sampled_from([f.name for f in cola.ChainConfig.__dataclass_fields__.values()] + ["lnks", "rank", ""])


@given(data=st.dictionaries(keys, values, max_size=8))
def test_config_parsing_never_raises_anything_but_the_library_error(data):
    """Whatever a config file holds, the answer is a ChainConfig or a cola.ConfigError."""
    try:
        cfg = cola.ChainConfig.from_dict(data)
    except cola.ConfigError as err:
        assert str(err)
        return
    assert isinstance(cfg, cola.ChainConfig)
