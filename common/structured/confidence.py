"""A classifier's confidence from the model itself: the probability of each allowed enum value.

Not sampled: for the JSON written so far up to the value's opening quote (``{"intent": "``),
each allowed value's tokens, then the string's end (any token starting with ``"``), are scored
in one pass of the model, and ``P(value) = exp(logp(value)) / sum over allowed values``. That
is the model's own distribution conditioned on the answer being one of the values the schema
allows; the end of the string keeps a value that is a prefix of another (``on``/``online``)
apart. The parts of the token sequences all values share are scored once and cancel. (A value
is scored along its canonical tokenization, the one training used.)

Engines provide ``score_continuations(context_ids, continuations) -> [sum of log-probs]``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.structured.schema import AnswerFormat, EnumField


@dataclass
class Classified:
    """One constrained answer and its classifier field's distribution."""

    text: str  # the answer as generated (or its fallback)
    value: Any  # the parsed JSON answer, or None when it does not parse
    label: str | None  # the enum field's value in the answer
    probability: float | None  # P(label) under the model
    probs: dict[str, float] | None  # every allowed value's probability, highest first
    fallback: bool = False  # True when --threshold replaced the label

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return list((self.probs or {}).items())[:k]


def value_prefix(answer: str, key: str) -> str:
    """The answer's text up to the opening quote of ``key``'s value (a canonical one when it has none)."""
    m = re.search(r'"' + re.escape(key) + r'"\s*:\s*"', answer)
    return answer[: m.end()] if m else '{"' + key + '": "'


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def normalise(logps: Sequence[float]) -> list[float]:
    """Softmax of summed log-probs (nats), computed stably."""
    top = max(logps)
    weights = [math.exp(x - top) for x in logps]
    total = sum(weights)
    return [w / total for w in weights]


def quote_ids(gen) -> list[int]:
    """Ids of the tokens whose text starts with ``"`` (the end of a JSON string: ``"``, ``",``, ``"}}``...),
    found once per generator."""
    cached = getattr(gen, "_quote_ids", None)
    if cached is None:
        tok = gen.formatter.tokenizer
        n = len(tok) if hasattr(tok, "__len__") else tok.llm.n_vocab()
        if hasattr(tok, "batch_decode"):
            texts = tok.batch_decode([[i] for i in range(n)])
        else:
            texts = [tok.decode([i]) for i in range(n)]
        cached = gen._quote_ids = [i for i, t in enumerate(texts) if t.startswith('"')]
    return cached


def enum_distribution(gen, prompt_ids: list[int], answer: str, enum: EnumField) -> dict[str, float]:
    """``{value: probability}`` for every allowed value, highest first, given the answer's prefix.

    A value's score is log P(its tokens) + log P(the next token starts with ``"``): the closing quote
    is usually merged with what follows it (``",`` or ``"}``), so no single quote token is scored.
    """
    prefix = value_prefix(answer, enum.key)
    encode = gen.formatter.tokenizer.encode
    seqs = [list(encode(prefix + json.dumps(v, ensure_ascii=False)[1:-1], add_special_tokens=False))
            for v in enum.values]
    shared = common_prefix(seqs)
    if shared == min(len(s) for s in seqs):  # one value's tokens end inside another's: keep one token apart
        shared = max(0, shared - 1)
    logps = gen.score_continuations(prompt_ids + seqs[0][:shared], [s[shared:] for s in seqs], quote_ids(gen))
    probs = normalise(logps)
    return dict(sorted(zip(enum.values, probs, strict=True), key=lambda kv: -kv[1]))


def classify_answer(gen, prompt_ids: list[int], answer: str, fmt: AnswerFormat,
                    threshold: float | None = None) -> Classified:
    """The distribution behind one constrained answer, and the fallback when its label is below ``threshold``."""
    from common.evaluate.metrics import parse_json

    ok, value = parse_json(answer)
    enum = fmt.enum
    if enum is None:
        return Classified(answer, value if ok else None, None, None, None)
    probs = enum_distribution(gen, prompt_ids, answer, enum)
    label = value.get(enum.key) if ok and isinstance(value, dict) else None
    label = label if label in probs else None
    p = probs[label] if label is not None else None
    out = Classified(answer, value if ok else None, label, p, probs)
    return out if threshold is None else apply_threshold(out, fmt, threshold)


def apply_threshold(c: Classified, fmt: AnswerFormat, threshold: float) -> Classified:
    """``c``, or its fallback (the enum field set to the schema's fallback value) when P(label) < ``threshold``."""
    import copy

    from common.structured.schema import with_fallback

    if c.probs is None or fmt.enum is None or fmt.enum.fallback is None:
        return c
    if c.probability is not None and c.probability >= threshold:
        return c
    out = copy.copy(c)
    out.value = with_fallback(c.value, fmt)
    out.text = json.dumps(out.value, ensure_ascii=False)
    out.label, out.probability, out.fallback = fmt.enum.fallback, c.probs[fmt.enum.fallback], True
    return out
