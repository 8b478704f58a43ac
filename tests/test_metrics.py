"""Metric functions against examples computed by hand."""

import json
import math

import pytest

from common.evaluate import metrics as M

SCHEMA = {
    "type": "object", "required": ["intent", "slots"], "additionalProperties": False,
    "properties": {"intent": {"type": "string", "enum": ["set_timer", "get_weather", "unknown"]},
                   "slots": {"type": "object", "additionalProperties": {"type": "string"}}},
}


def j(obj) -> str:
    return json.dumps(obj)


def test_parse_json_malformed_and_empty():
    assert M.parse_json(' {"a": 1}\n') == (True, {"a": 1})
    assert M.parse_json('{"a": 1') == (False, None)
    assert M.parse_json('{"a": 1} trailing') == (False, None)  # what json.loads would reject
    assert M.parse_json("") == (False, None)
    assert M.parse_json(None) == (False, None)
    assert M.parse_json("3") == (True, 3)


def test_canonical_ignores_key_order_and_spacing():
    assert M.canonical({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == M.canonical(json.loads('{"a":[1,{"c":3,"d":2}],"b":1}'))
    assert M.canonical({"a": 1}) != M.canonical({"a": "1"})


def test_flatten_fields_nested_slots():
    obj = {"intent": "x", "slots": {"time": {"hour": 5, "min": 0}, "room": "den"}}
    assert M.flatten_fields(obj) == {
        "intent": "x", "slots": obj["slots"], "slots.time": {"hour": 5, "min": 0},
        "slots.time.hour": 5, "slots.time.min": 0, "slots.room": "den"}
    assert M.flatten_fields([1, 2]) == {}
    assert M.flatten_fields(None) == {}


def test_field_accuracy_missing_extra_and_unparseable():
    expected = [
        {"intent": "set_timer", "slots": {"duration": "5 min"}},
        {"intent": "get_weather", "slots": {"location": "Paris"}},
        {"intent": "unknown", "slots": {}},
    ]
    predicted = [
        {"intent": "set_timer", "slots": {"duration": "5 min"}},  # all right
        {"intent": "get_weather", "slots": {"location": "Paris", "date": "today"}},  # extra slot
        None,  # did not parse: every expected field is wrong
    ]
    acc = M.field_accuracy(expected, predicted)
    # intent: right in rows 0, 1; wrong in 2 -> 2/3
    assert acc["intent"] == {"accuracy": 2 / 3, "correct": 2, "support": 3}
    # slots as a whole: row 0 right, row 1 wrong (extra key), row 2 wrong -> 1/3
    assert acc["slots"]["correct"] == 1 and acc["slots"]["support"] == 3
    assert acc["slots.duration"] == {"accuracy": 1.0, "correct": 1, "support": 1}
    assert acc["slots.location"] == {"accuracy": 1.0, "correct": 1, "support": 1}
    # produced but not expected: support 1, never right
    assert acc["slots.date"] == {"accuracy": 0.0, "correct": 0, "support": 1}
    assert list(acc) == sorted(acc)


def test_field_accuracy_missing_field():
    acc = M.field_accuracy([{"intent": "a", "slots": {"x": "1", "y": "2"}}], [{"intent": "a", "slots": {"x": "1"}}])
    assert acc["slots.x"]["accuracy"] == 1.0
    assert acc["slots.y"]["accuracy"] == 0.0
    assert acc["slots"]["accuracy"] == 0.0


def test_macro_f1_hand_computed_with_invalid_and_unknown_intents():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", M.INVALID, "zzz"]  # zzz: an intent the data never uses
    # a: tp1 fp0 fn1 -> p1 r.5 f1 2/3 ; b: tp1 fp1 fn1 -> .5/.5 f1 .5 ; c: 0 ; <invalid>: 0 ; zzz: 0
    assert M.macro_f1(gold, pred) == pytest.approx((2 / 3 + 0.5) / 5)
    per = M.per_class_f1(gold, pred)
    assert list(per) == ["a", "b", "c", M.INVALID, "zzz"]
    assert per["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert per["zzz"]["support"] == 0 and per["zzz"]["f1"] == 0.0


def test_macro_f1_perfect_and_empty():
    assert M.macro_f1(["a", "b"], ["a", "b"]) == 1.0
    assert M.macro_f1([], []) == 0.0


def test_confusion_matrix_orders_expected_then_predicted_only():
    labels, matrix = M.confusion_matrix(["b", "a", "a"], ["b", "a", M.INVALID])
    assert labels == ["a", "b", M.INVALID]
    assert matrix == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_label_of():
    assert M.label_of({"intent": "x"}) == "x"
    assert M.label_of({"slots": {}}) == M.MISSING
    assert M.label_of({"intent": 3}) == M.MISSING
    assert M.label_of(None, parsed=False) == M.INVALID
    assert M.label_of([1]) == M.INVALID


def test_schema_errors_name_the_path():
    assert M.schema_errors({"intent": "unknown", "slots": {}}, SCHEMA) == []
    errs = M.schema_errors({"intent": "dance", "slots": {"a": 1}, "extra": True}, SCHEMA)
    assert len(errs) == 3
    assert any(e.startswith("(root):") and "extra" in e for e in errs)
    assert any(e.startswith("intent:") for e in errs)
    assert any(e.startswith("slots/a:") for e in errs)


def test_json_report_hand_computed():
    expected = [j({"intent": "set_timer", "slots": {"duration": "5 min"}}),
                j({"intent": "get_weather", "slots": {"location": "Paris"}}),
                j({"intent": "unknown", "slots": {}}),
                j({"intent": "unknown", "slots": {}})]
    produced = ['{"slots": {"duration": "5 min"}, "intent": "set_timer"}',  # key order differs: exact
                '{"intent": "get_weather", "slots": {"location": "paris"}}',  # slot value wrong
                '{"intent": "unknown", "slots": {}',  # malformed
                '{"intent": "unknown", "slots": {}, "note": "x"}']  # extra key: parses, fails the schema
    r = M.json_report(expected, produced, schema=SCHEMA)
    m = r["metrics"]
    assert m["n"] == 4
    assert m["parse_rate"] == 0.75
    assert m["schema_valid_rate"] == 0.5
    assert m["exact_match"] == 0.25
    assert m["intent_accuracy"] == 0.75
    # classes: get_weather, set_timer, unknown, <invalid>; f1 = 1, 1, 2/3 (tp1 fn1 fp0), 0
    assert m["intent_macro_f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    # the schema's labels plus one "other" column for the malformed answer
    assert r["confusion"]["labels"] == ["set_timer", "get_weather", "unknown", M.OTHER]
    assert r["confusion"]["matrix"][2] == [0, 0, 1, 1]
    ex = r["examples"]
    assert [x["exact"] for x in ex] == [True, False, False, False]
    assert ex[0]["problems"] == []
    assert ex[1]["problems"] == ["fields differ: slots, slots.location"]
    assert ex[2]["problems"] == ["not valid JSON"] and ex[2]["predicted_label"] == M.INVALID
    assert any("note" in p for p in ex[3]["problems"]) and "fields differ: note" in ex[3]["problems"]
    assert r["per_field"]["note"]["support"] == 1


def test_json_report_empty_predictions_and_no_labels():
    r = M.json_report([j({"a": 1}), j([1, 2])], ["", "   "])
    assert r["metrics"]["parse_rate"] == 0.0 and r["metrics"]["exact_match"] == 0.0
    assert "intent_accuracy" not in r["metrics"] and "confusion" not in r
    assert "schema_valid_rate" not in r["metrics"]
    assert r["per_field"] == {"a": {"accuracy": 0.0, "correct": 0, "support": 1}}


def test_perplexity_and_text_report():
    assert M.perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    assert M.perplexity(0.0, 0) is None
    assert M.perplexity(1e6, 1) == math.inf
    t = M.text_report(["hello ", "a", None], ["hello", "b", "c"])
    assert t == {"n": 2, "exact_match": 0.5, "mean_expected_chars": 3.5, "mean_produced_chars": 3.0}
