"""The example schema: lists, JSON Lines and documents decode; errors name the field."""

import json

import pytest

from hoppatch.mquake import import_mquake
from hoppatch.spec import EXAMPLES_SCHEMA, ExamplesError, decode_examples

EXAMPLE = {
    "id": "dupin",
    "query": "The nationality of the creator of C. Auguste Dupin is",
    "answer": "United States",
    "hop1": {"prompt": "The creator of C. Auguste Dupin is", "answer": "Edgar Allan Poe"},
    "hop2": {"prompt": "The nationality of Edgar Allan Poe is", "answer": "United States"},
}


def test_list_jsonl_and_document_forms():
    as_list = decode_examples(json.dumps([EXAMPLE]).encode())
    as_lines = decode_examples((json.dumps(EXAMPLE) + "\n" + json.dumps({**EXAMPLE, "id": "b"}) + "\n").encode())
    as_doc = decode_examples(json.dumps({"schema": EXAMPLES_SCHEMA, "examples": [EXAMPLE]}).encode())
    assert as_list == as_doc and as_list[0].hop1.answer == "Edgar Allan Poe"
    assert [e.id for e in as_lines] == ["dupin", "b"]


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({**EXAMPLE, "hop1": {"prompt": "x"}}, "hop1"),
        ({**EXAMPLE, "answer": ""}, "answer"),
        ({**EXAMPLE, "answer": " \n "}, "answer"),
        ({**EXAMPLE, "surprise": 1}, "surprise"),
        ({**EXAMPLE, "id": "has space"}, "id"),
    ],
)
def test_errors_name_the_field(broken, message):
    with pytest.raises(ExamplesError, match=message):
        decode_examples(json.dumps([broken]).encode(), "f.json")


def test_empty_duplicate_and_garbage_are_refused():
    with pytest.raises(ExamplesError, match="no examples"):
        decode_examples(b"[]")
    with pytest.raises(ExamplesError, match="unique"):
        decode_examples(json.dumps([EXAMPLE, EXAMPLE]).encode())
    with pytest.raises(ExamplesError, match="JSON"):
        decode_examples(b"{not json")


def test_mquake_import(tmp_path):
    case = {
        "prompt_guide": "The nationality of {} is", "prompt_comp": "The nationality of {} is",
        "prompt_f_hop": "the creator of C. Auguste Dupin is", "subject_guide": "Edgar Allan Poe",
        "subject_comp": "the creator of C. Auguste Dupin", "target": "United States of America",
        "paraphrase queries": ["Q: Who?\nA:"], "generalization queries": ["the city where the creator of C. Auguste Dupin died is"],
        "generalization answers": ["Baltimore"],
    }
    irre = {**case, "irrelevant queries": ["the capital of France is"], "irrelevant answers": ["Paris"]}
    (tmp_path / "a.json").write_text(json.dumps([case]))
    (tmp_path / "a.irre.json").write_text(json.dumps([irre]))
    [ex] = import_mquake(tmp_path / "a.json", tmp_path / "a.irre.json")
    assert ex.query == "The nationality of the creator of C. Auguste Dupin is"
    assert ex.hop1.prompt == "The creator of C. Auguste Dupin is" and ex.hop1.answer == "Edgar Allan Poe"
    assert ex.hop2.prompt == "The nationality of Edgar Allan Poe is"
    assert ex.specificity[0].prompt == "The capital of France is" and ex.generalization[0].answer == "Baltimore"
