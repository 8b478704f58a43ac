"""Evaluation metrics as pure functions: plain Python in, plain Python out.

JSON answers are judged the way a program consuming them would: the produced text must
parse with ``json.loads`` as it is (surrounding whitespace aside), exact match compares
canonical JSON (keys sorted), and fields are compared value by value. Classification
metrics treat an answer that is not a JSON object as the class ``<invalid>``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

INVALID = "<invalid>"  # the predicted class of an answer that does not parse as a JSON object
MISSING = "<missing>"  # the class of a JSON object without the label key (or a non-string label)


def parse_json(text: str | None) -> tuple[bool, Any]:
    """``(True, value)`` when ``text`` (stripped) is one JSON document, else ``(False, None)``."""
    if text is None:
        return False, None
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return False, None


def canonical(value: Any) -> str:
    """One spelling per JSON value: sorted keys, no spaces, unicode kept."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def flatten_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every key path of a JSON object, e.g. ``intent``, ``slots``, ``slots.time``.

    A nested object is listed itself (compared whole) and through each of its keys, so
    ``{"slots": {"a": {"b": 1}}}`` gives ``slots``, ``slots.a`` and ``slots.a.b``.
    Anything but an object has no fields.
    """
    out: dict[str, Any] = {}
    if not isinstance(obj, dict):
        return out
    for key, value in obj.items():
        path = f"{prefix}{key}"
        out[path] = value
        if isinstance(value, dict):
            out.update(flatten_fields(value, prefix=f"{path}."))
    return out


def field_accuracy(expected: Sequence[Any], predicted: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Per-field accuracy over the examples where the field is expected or produced.

    ``predicted[i]`` is the parsed answer, or None when it did not parse. A field counts
    as right only when both sides have it with equal values (canonical JSON), so a
    missing field and an extra field are both errors. Returns
    ``{field: {"accuracy": a, "correct": c, "support": n}}`` sorted by field name.
    """
    assert len(expected) == len(predicted)
    correct: dict[str, int] = {}
    support: dict[str, int] = {}
    for exp, pred in zip(expected, predicted, strict=True):
        e, p = flatten_fields(exp), flatten_fields(pred)
        for name in set(e) | set(p):
            support[name] = support.get(name, 0) + 1
            ok = name in e and name in p and canonical(e[name]) == canonical(p[name])
            correct[name] = correct.get(name, 0) + int(ok)
    return {name: {"accuracy": correct[name] / support[name], "correct": correct[name], "support": support[name]}
            for name in sorted(support)}


def label_of(value: Any, parsed: bool = True, key: str = "intent") -> str:
    """The class of one answer: its ``key`` string, ``<invalid>`` or ``<missing>``."""
    if not parsed or not isinstance(value, dict):
        return INVALID
    label = value.get(key)
    return label if isinstance(label, str) else MISSING


def class_order(expected: Sequence[str], predicted: Sequence[str]) -> list[str]:
    """The classes: expected labels sorted, then labels only ever predicted, sorted."""
    seen = sorted(set(expected))
    return seen + sorted(set(predicted) - set(seen))


def per_class_f1(expected: Sequence[str], predicted: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class (classes: union of both sides).

    A ratio whose denominator is 0 is 0, as in scikit-learn's ``zero_division=0``.
    """
    assert len(expected) == len(predicted)
    out = {}
    for c in class_order(expected, predicted):
        tp = sum(1 for e, p in zip(expected, predicted, strict=True) if e == c and p == c)
        fp = sum(1 for e, p in zip(expected, predicted, strict=True) if e != c and p == c)
        fn = sum(1 for e, p in zip(expected, predicted, strict=True) if e == c and p != c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[c] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return out


def macro_f1(expected: Sequence[str], predicted: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the union of expected and predicted classes."""
    per = per_class_f1(expected, predicted)
    return sum(v["f1"] for v in per.values()) / len(per) if per else 0.0


OTHER = "other"  # the confusion matrix's row and column for every label outside the known ones


def schema_labels(schema: dict | None, key: str = "intent") -> list[str] | None:
    """The labels a JSON schema allows for ``key`` (its enum field's values: ``properties.<key>.enum``, or
    the ``const`` of each ``anyOf`` branch), or None."""
    from common.structured.schema import field_values

    return (field_values(schema, key) or None) if isinstance(schema, dict) else None


def confusion_matrix(expected: Sequence[str], predicted: Sequence[str],
                     known: Sequence[str] | None = None) -> tuple[list[str], list[list[int]]]:
    """``(labels, matrix)`` with ``matrix[i][j]`` = examples of class ``labels[i]`` predicted as ``labels[j]``.

    With ``known`` labels (the schema's), the matrix has exactly those plus one ``other`` for
    anything else a model invents (or an invalid answer), so its size never depends on the model.
    """
    if known is not None:
        labels = [*known, OTHER]
        expected = [e if e in known else OTHER for e in expected]
        predicted = [p if p in known else OTHER for p in predicted]
    else:
        labels = class_order(expected, predicted)
    index = {c: i for i, c in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for e, p in zip(expected, predicted, strict=True):
        matrix[index[e]][index[p]] += 1
    return labels, matrix


def schema_errors(value: Any, schema: dict) -> list[str]:
    """The messages of every way ``value`` violates ``schema`` (empty when valid)."""
    from common.structured.schema import violations

    return [f"{at or '(root)'}: {message}" for at, message in violations(value, schema)]


def json_report(expected_texts: Sequence[str], produced_texts: Sequence[str | None], *,
                schema: dict | None = None, label_key: str = "intent") -> dict[str, Any]:
    """Every JSON metric for a split, and a verdict per example.

    ``expected_texts`` must parse (the caller checks the data); ``produced_texts`` may
    be anything, including "" or None. Returns ``{"metrics": {...}, "per_field": {...},
    "per_class": {...}, "confusion": {"labels", "matrix"}, "examples": [...]}`` where each
    example carries ``parsed``, ``schema_valid``, ``exact``, ``label``/``predicted_label`` and
    ``problems`` (why it is wrong; empty when it is an exact match).
    """
    assert len(expected_texts) == len(produced_texts)
    n = len(expected_texts)
    expected = [parse_json(t)[1] for t in expected_texts]
    parsed = [parse_json(t) for t in produced_texts]
    predicted = [value if ok else None for ok, value in parsed]

    examples = []
    for exp, (ok, pred) in zip(expected, parsed, strict=True):
        problems: list[str] = []
        valid = None
        if not ok:
            problems.append("not valid JSON")
        elif schema is not None:
            errs = schema_errors(pred, schema)
            valid = not errs
            problems += [f"schema: {e}" for e in errs]
        exact = ok and canonical(exp) == canonical(pred)
        if ok and not exact:
            e, p = flatten_fields(exp), flatten_fields(pred)
            wrong = sorted(k for k in set(e) | set(p)
                           if not (k in e and k in p and canonical(e[k]) == canonical(p[k])))
            problems.append("fields differ: " + ", ".join(wrong) if wrong else "value differs")
        examples.append({"parsed": ok, "schema_valid": valid, "exact": exact, "problems": [] if exact else problems})

    metrics: dict[str, Any] = {
        "n": n,
        "parse_rate": sum(ok for ok, _ in parsed) / n if n else 0.0,
        "exact_match": sum(x["exact"] for x in examples) / n if n else 0.0,
    }
    if schema is not None:
        metrics["schema_valid_rate"] = sum(bool(x["schema_valid"]) for x in examples) / n if n else 0.0
    per_field = field_accuracy(expected, predicted)
    support = sum(v["support"] for v in per_field.values())
    # Micro-average over every field of every answer (a nested object and each of its keys count).
    metrics["field_accuracy"] = sum(v["correct"] for v in per_field.values()) / support if support else None
    report: dict[str, Any] = {"metrics": metrics, "per_field": per_field, "examples": examples}
    if n and all(isinstance(e, dict) and isinstance(e.get(label_key), str) for e in expected):
        gold = [e[label_key] for e in expected]
        guess = [label_of(v, ok, label_key) for ok, v in parsed]
        for x, g, p in zip(examples, gold, guess, strict=True):
            x["label"], x["predicted_label"] = g, p
        metrics[f"{label_key}_accuracy"] = sum(g == p for g, p in zip(gold, guess, strict=True)) / n
        metrics[f"{label_key}_macro_f1"] = macro_f1(gold, guess)
        report["per_class"] = per_class_f1(gold, guess)
        labels, matrix = confusion_matrix(gold, guess, schema_labels(schema, label_key) or sorted(set(gold)))
        report["confusion"] = {"labels": labels, "matrix": matrix}
    return report


def perplexity(loss_sum: float, count: int) -> float | None:
    """``exp(mean token loss)`` (nats), or None without tokens; inf when it overflows."""
    if count <= 0:
        return None
    mean = loss_sum / count
    return math.exp(mean) if mean < 700 else math.inf


def text_report(expected_texts: Sequence[str | None], produced_texts: Sequence[str]) -> dict[str, Any]:
    """Free-text answers: exact match after stripping whitespace, and mean lengths (characters)."""
    pairs = [(e, p) for e, p in zip(expected_texts, produced_texts, strict=True) if e is not None]
    n = len(pairs)
    return {
        "n": n,
        "exact_match": sum(e.strip() == p.strip() for e, p in pairs) / n if n else None,
        "mean_expected_chars": sum(len(e) for e, _ in pairs) / n if n else None,
        "mean_produced_chars": sum(len(p) for _, p in pairs) / n if n else None,
    }
