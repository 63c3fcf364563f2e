"""Task definitions: the paper's prompts to the character, labels, user templates."""

from __future__ import annotations

import pytest

from cola.errors import ConfigError
from cola.llm.tasks import BUILTIN_TASKS, DataError, get_task, make_task, split_template, template_fields

PARA = ("Susan wanted to have a birthday party. She called all of her friends. She has five friends. "
        "Her mom said that Susan can invite them all to the party.")

# The first training fixture row of each task, written out by hand from paper.md's table.
EXPECTED_TEXT = {
    "sst2": "a gorgeous , witty , seductive movie . It was great",
    "rte": 'The cat sat on the mat all afternoon.\nDoes this mean that "A cat was on the mat." is true? '
           "Yes or No?\nYes",
    "cb": "Suppose B: I think it's going to rain. A: Really? I don't think it will. Can we infer that "
          "\"it's going to rain\"? Yes, No, or Maybe?\nYes",
    "boolq": "Persian language -- Persian is spoken in Iran and Afghanistan, where it is called Dari. "
             "Do iran and afghanistan speak the same language?\nYes",
    "wsc": "Mark told Pete many lies about himself, which Pete included in his book. He should have been "
           'more truthful.\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\nYes',
    "wic": 'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
           "He sat on the bank of the river.\nShe deposited money at the bank.\nNo",
    "multirc": f'{PARA}\nQuestion: How many friends does Susan have?\nI found this answer "Five". '
               "Is that correct? Yes or No?\nYes",
}

ANSWERS = {
    "tweets": ("terrible", "great"), "sst2": ("terrible", "great"), "rte": ("Yes", "No"),
    "cb": ("Yes", "No", "Maybe"), "boolq": ("No", "Yes"), "wsc": ("No", "Yes"), "wic": ("No", "Yes"),
    "multirc": ("No", "Yes"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_prompt_matches_paper_exactly(name, rows):
    task = get_task(name)
    example = rows(name)[0]
    label = task.label(example)
    assert task.text(example, label) == EXPECTED_TEXT[name]
    answer = task.answers[label]
    assert task.prompt(example) + task.answer_prefix + answer == EXPECTED_TEXT[name]
    assert EXPECTED_TEXT[name].endswith(task.candidates[label])


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_answers_in_label_order(name):
    assert get_task(name).answers == ANSWERS[name]


def test_space_before_answer_only_after_a_word():
    assert get_task("sst2").candidates == (" terrible", " great")
    assert get_task("tweets").candidates == (" terrible", " great")
    for name in ("rte", "cb", "boolq", "wsc", "wic", "multirc"):
        task = get_task(name)
        assert task.answer_prefix == ""
        assert task.prompt(_dummy(task)).endswith("\n")


def _dummy(task):
    return {f: "x" for f in task.fields} | {task.label_field: 0}


def test_boolq_question_keeps_existing_question_mark():
    task = get_task("boolq")
    assert task.prompt({"passage": "P.", "question": "is it?", "label": 0}) == "P. Is it?\n"


def test_sst2_sentence_is_stripped():
    assert get_task("sst2").prompt({"sentence": "  fine . ", "label": 0}) == "fine . It was"


def test_hub_names_and_metrics():
    assert get_task("sst2").hub == ("nyu-mll/glue", "sst2")
    assert get_task("wsc").hub == ("aps/super_glue", "wsc.fixed")
    assert get_task("cb").metrics == ("accuracy", "macro_f1")
    assert all(t.metrics == ("accuracy",) for n, t in BUILTIN_TASKS.items() if n != "cb")


@pytest.mark.parametrize("value, expected", [
    (0, 0), (1, 1), ("1", 1), (True, 1), (False, 0), ("entailment", 0), ("not_entailment", 1),
    ("Not_Entailment", 1), ("yes", 0), (" No ", 1), (1.0, 1),
])
def test_label_values_accepted(value, expected):
    assert get_task("rte").label({"label": value}) == expected


@pytest.mark.parametrize("value", [2, -1, "maybe", 0.5, None, [0]])
def test_label_outside_answers_is_an_error(value):
    with pytest.raises(DataError, match="outside the answers"):
        get_task("rte").label({"label": value})


def test_missing_label_column_names_columns():
    with pytest.raises(DataError, match=r"no label column 'label'.*premise"):
        get_task("rte").label({"premise": "a", "hypothesis": "b"})


def test_unknown_task_suggests_names():
    with pytest.raises(ConfigError, match="did you mean.*boolq"):
        get_task("boolk")


@pytest.mark.parametrize("template, expected", [
    ("{text} It was {answer}", ("{text} It was", " ")),
    ("{text} It was", ("{text} It was", " ")),
    ("{text} It was ", ("{text} It was", " ")),
    ("{q}?\n{answer}", ("{q}?\n", "")),
    ("{q}?\n", ("{q}?\n", "")),
    ("Answer:{answer}", ("Answer:", "")),
])
def test_split_template(template, expected):
    assert split_template(template) == expected


def test_make_task_renders_named_fields():
    task = make_task("{premise}\nQuestion: {hypothesis}?\n{answer}", ["yes", "no"], name="nli",
                     label_names=["entail", "contra"])
    example = {"premise": "A man sleeps.", "hypothesis": "A man is awake", "label": "contra"}
    assert task.fields == ("premise", "hypothesis")
    assert task.text(example, task.label(example)) == "A man sleeps.\nQuestion: A man is awake?\nno"


@pytest.mark.parametrize("template, match", [
    ("{} It was", "column names"),
    ("{0} It was", "column names"),
    ("{text It was", "malformed"),
    ("It was", "reads no column"),
    ('I found "{answer}". Yes?\n', "reserved"),
])
def test_bad_templates(template, match):
    with pytest.raises(ConfigError, match=match):
        make_task(template, ["a", "b"])


@pytest.mark.parametrize("answers, match", [(["a"], "at least two"), (["a", "a"], "repeated"), (["a", " "], "empty")])
def test_bad_answers(answers, match):
    with pytest.raises(ConfigError, match=match):
        make_task("{text}", answers)


def test_template_fields_dedupes_and_roots():
    assert template_fields("{a} {b[0]} {a} {c.x}") == ("a", "b", "c")
