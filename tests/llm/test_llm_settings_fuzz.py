"""Fuzzing the train settings: whatever a config file holds, the answer is settings that round-trip or
cola.ConfigError naming what is wrong."""

import json
import re
import typing

import pytest
import yaml
from hypothesis import given, settings as hyp_settings, strategies as st

import cola
from cola.llm.settings import FIELD_NAMES, METHODS, TrainSettings

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=10))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=3))
keys = st.one_of(st.sampled_from(sorted(FIELD_NAMES) + ["chain", "modle", "lnks", ""]), st.text(max_size=8))

TYPES = typing.get_type_hints(TrainSettings)
CHOICES = {"method": METHODS, "loss": ("classification", "lm"), "eval_rule": ("mean", "sum", "norm"),
           "dtype": ("float32", "bfloat16", "float16", "auto", None), "task": ("tweets", "sst2", "rte", "custom")}
words = st.text("abcdefghij_", min_size=1, max_size=6)
chain_tables = st.fixed_dictionaries({}, optional={
    "links": st.integers(1, 4), "rank_schedule": st.sampled_from(["constant", "step-down", "halving"]),
    "rank-schedule-options": st.fixed_dictionaries({"later_rank": st.integers(1, 4)}),
    "lr_schedule": st.sampled_from(["constant", "cosine", "cosin"]), "warmup_steps": st.integers(0, 3),
    "merge_policy": st.sampled_from(["even", "every", "plateau"]), "total_steps": st.integers(1, 9)})


def _plausible(name: str) -> st.SearchStrategy:
    """Values of the right type for field ``name`` (mostly valid), from its annotation."""
    if name in CHOICES:
        return st.sampled_from(CHOICES[name])
    if name in ("data_dir", "train_file", "test_file"):
        return st.none()  # they must exist on disk
    if name == "chain":
        return chain_tables
    if name == "compare":
        return st.none() | st.lists(st.sampled_from(METHODS), min_size=1, max_size=3)
    tp = TYPES[name]
    optional = type(None) in typing.get_args(tp)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    out = {int: st.integers(0, 40), float: st.integers(0, 2) | st.floats(0, 0.99), bool: st.booleans(),
           str: words, list[str]: st.lists(words, max_size=2),
           list[int]: st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True)}[base]
    return st.none() | out if optional else out


spellings = st.sampled_from(sorted(FIELD_NAMES)).flatmap(
    lambda name: st.tuples(st.sampled_from(sorted({name, name.replace("_", "-")})), _plausible(name)))
plausible_settings = st.lists(spellings, max_size=6, unique_by=lambda kv: kv[0].replace("-", "_")).map(dict)


def _normal(key) -> str:
    return str(key).replace("-", "_")


def _names_a_given_key(problem: str, data: dict) -> bool:
    named = {str(k) for k in data} | {_normal(k) for k in data}
    chain = next((v for k, v in data.items() if _normal(k) == "chain"), None)
    if isinstance(chain, dict):
        named |= {str(k) for k in chain} | {_normal(k) for k in chain}
    return any(repr(k) in problem or (k and re.search(rf"(?<!\w){re.escape(k)}(?!\w)", problem)) for k in named)


def _stored_as_given(settings: TrainSettings, data: dict) -> None:
    """Each given value is the stored one, after the documented normalisations: ``-`` -> ``_`` in keys
    (of the [chain] table too), an integer given for a float setting is that float, ``chain.links``
    is ``links``."""
    for key, value in data.items():
        name = _normal(key)
        stored = getattr(settings, name)
        if name == "chain":
            table = {_normal(k): v for k, v in value.items()}
            if "links" in table:
                assert settings.links == table.pop("links")
            assert stored == table, (value, stored)
        elif float in typing.get_args(TYPES[name]) + (TYPES[name],) and type(value) is int:
            assert stored == float(value) and type(stored) is float, (name, value, stored)
        else:
            assert stored is value or stored == value and type(stored) is type(value), (name, value, stored)


def _check(data: dict) -> TrainSettings | None:
    """Parse ``data``: settings that store what was given and round-trip, or a ConfigError that names keys."""
    try:
        settings = TrainSettings.from_dict(data)
    except cola.ConfigError as err:
        assert err.problems and all(err.problems)
        unnamed = [p for p in err.problems if not _names_a_given_key(p, data)]
        assert not unnamed, (unnamed, data)
        return None
    _stored_as_given(settings, data)
    again = TrainSettings.from_dict(settings.to_dict())
    assert again == settings and again.to_dict() == settings.to_dict()
    return settings


@hyp_settings(max_examples=60, deadline=None)
@given(data=st.dictionaries(keys, values, max_size=6).filter(lambda d: len({_normal(k) for k in d}) == len(d))
       | plausible_settings)  # two spellings of one key: test_two_spellings_of_one_key_that_disagree_are_an_error
def test_settings_mapping_round_trips_or_names_the_offending_key(data):
    """Whatever a mapping holds: settings that store the given values and rebuild from ``to_dict`` to
    an equal object, or a cola.ConfigError (nothing else) whose every problem names a given key."""
    _check(data)


def _write(path, data: dict) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        path.write_text(yaml.safe_dump(data, allow_unicode=True))


@hyp_settings(max_examples=40, deadline=None)
@given(data=plausible_settings.map(lambda d: {k: v for k, v in d.items() if k != "config"}),
       suffix=st.sampled_from([".json", ".yaml"]))
def test_a_settings_file_gives_what_the_same_mapping_gives(tmp_path_factory, data, suffix):
    """A file holding a mapping parses to the settings of the mapping (plus ``config``: the file), and
    those settings written back to a file read back equal; or both are the same ConfigError."""
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    _write(path, data)
    expected = _check(data)
    if expected is None:
        with pytest.raises(cola.ConfigError):
            TrainSettings.from_file(path)
        return
    got = TrainSettings.from_file(path)
    assert got == expected.replace(config=str(path))
    back = tmp_path_factory.mktemp("cfg") / f"back{suffix}"
    _write(back, {k: v for k, v in got.to_dict().items() if k != "config"})
    assert TrainSettings.from_file(back) == got.replace(config=str(back))


@hyp_settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=120))
def test_settings_file_never_raises_anything_but_the_library_error(tmp_path_factory, text):
    """Any text: settings that round-trip through a file, or a cola.ConfigError naming the file or a key."""
    for suffix in (".toml", ".yaml", ".json"):
        path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
        path.write_text(text)
        try:
            settings = TrainSettings.from_file(path)
        except cola.ConfigError as err:
            assert str(path) in str(err)  # every problem of a file says which file
            continue
        assert settings.config == str(path)
        back = path.with_name("back.json")
        _write(back, {k: v for k, v in settings.to_dict().items() if k != "config"})
        assert TrainSettings.from_file(back) == settings.replace(config=str(back))


FLOAT_FIELDS = sorted(name for name, tp in TYPES.items() if float in (tp, *typing.get_args(tp)))
@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused_up_front(name, value):
    with pytest.raises(cola.ConfigError) as err:
        TrainSettings.from_dict({name: value})
    assert any(name in p for p in err.value.problems)


def test_two_spellings_of_one_key_that_disagree_are_an_error():
    with pytest.raises(cola.ConfigError, match="n_train|n-train"):
        TrainSettings.from_dict({"n-train": 3, "n_train": 5})


@pytest.mark.parametrize("text", ["[chain]\nlnks = 3\n", "rank = 'eight'\n", "modle = 'x'\n", "[chain\n"])
def test_typical_mistakes_are_library_errors(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(cola.ConfigError):
        TrainSettings.from_file(path)


def test_a_device_this_machine_lacks_is_a_clear_error():
    import torch

    from cola.llm.models import resolve_device

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(cola.ConfigError, match="has 0 CUDA device"):
        resolve_device("cuda")
