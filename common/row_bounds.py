"""Bounds on one data row, measured before work is done on it: the bytes of a JSONL line and
the nesting of its JSON (checked by :mod:`common.data` before parsing), and the characters
worth tokenizing for a given ``max_seq_length`` (used by ``encode_split``).

A 50 MB row or one nested 200,000 brackets deep is untrusted input, not a reason for a
RecursionError or 12 GB of tokenizing.
"""

from __future__ import annotations

import json
from typing import Any

from common.data_formats import LintReport
from common.rows import Conversation, Row, Text

# Bounds measured before any work on a row: a row is a few KB; a long-context one a few hundred.
MAX_LINE_BYTES = 8 << 20  # one JSONL line (about two million tokens of text)
MAX_DEPTH = 64  # JSON nesting of one row (a chat row is 4 deep; tool schemas add a few levels)


def too_deep(value: Any) -> bool:
    """Whether a parsed value nests deeper than MAX_DEPTH (iterative: no recursion of our own)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def parse_row(text: str, where: str, report: LintReport) -> tuple[bool, Any]:
    """(ok, value) for one row's JSON text; nesting past MAX_DEPTH is an error, never a RecursionError."""
    try:
        value = json.loads(text)
    except RecursionError:  # the C decoder stops at the interpreter's recursion limit, cleanly
        value, deep = None, True
    else:
        deep = too_deep(value)
    if deep:
        report.error(where, f"JSON nested more than {MAX_DEPTH} levels deep (the limit for one row)")
        return False, None
    return True, value


def max_token_chars(tokenizer) -> int | None:
    """The most characters one token of ``tokenizer`` covers (its longest vocabulary piece), or None."""
    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None:
        return None
    try:
        return max((len(t) for t in vocab()), default=0) or None
    except (TypeError, ValueError):
        return None


def cut_row(row: Row, char_limit: int) -> Row | None:
    """``row`` with its text cut after ``char_limit`` characters of content, or None when it has fewer.

    Every token covers at most ``max_token_chars`` characters, so with ``char_limit`` of
    max_len x that, the cut text still tokenizes to more than max_len tokens, and the
    tokens that truncation keeps are the ones the full row gives (the cut lies far past
    them): a 50 MB row costs what max_len tokens cost, not 50 MB of tokenizing.
    """
    if isinstance(row, Text):
        return Text(row.text[:char_limit], row.source) if len(row.text) > char_limit else None
    left, messages = char_limit, []
    for m in row.messages:
        content = m.get("content")
        if isinstance(content, str):
            m = {**m, "content": content[:max(left, 0)]}
            left -= len(content)
        messages.append(m)
    return Conversation(messages, row.source, row.tools) if left < 0 else None
