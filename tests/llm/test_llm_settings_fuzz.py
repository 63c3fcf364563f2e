"""Fuzzing the train settings: whatever a config file holds, the answer is settings or cola.ConfigError."""

import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

import cola
from cola.llm.settings import FIELD_NAMES, TrainSettings

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=10))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=3))
keys = st.one_of(st.sampled_from(sorted(FIELD_NAMES) + ["chain", "modle", "lnks", ""]), st.text(max_size=8))


@given(data=st.dictionaries(keys, values, max_size=6))
def test_settings_mapping_never_raises_anything_but_the_library_error(data):
    try:
        TrainSettings.from_dict(data)
    except cola.ConfigError as err:
        assert str(err)


@hyp_settings(max_examples=40)
@given(text=st.text(max_size=120))
def test_settings_file_never_raises_anything_but_the_library_error(tmp_path_factory, text):
    for suffix in (".toml", ".yaml", ".json"):
        path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
        path.write_text(text)
        try:
            TrainSettings.from_file(path)
        except cola.ConfigError as err:
            assert str(err)


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
