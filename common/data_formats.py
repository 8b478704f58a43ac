"""Row formats: detect each row's format, lint it and convert it to a Conversation or Text.

Accepted formats (one per file, checked on every row, not guessed from the first):

- ``chat``: ``{"messages": [{"role", "content"}, ...], "tools": [...]?}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``
- ``alpaca``: ``{"instruction", "input"?, "output"}``
- ``completion``: ``{"prompt", "completion"}``
- ``text``: ``{"text"}``
- ``preference``: ``{"prompt"?, "chosen", "rejected"}`` (DPO/ORPO pairs; :mod:`common.preference_data`)

Domain text (``.txt``/``.md``) is cut into chunks that fit the sequence length
(:func:`text_chunks`). Problems are collected in a :class:`LintReport` as
``file:line[:col]: problem``; a row with an error produces no output row, so one pass
reports every problem at once.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import UserError, nearest
from common.rows import Conversation, Row, Source, Text

# format name -> (keys that identify it, required keys, optional keys)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ("messages",), ("tools",)),
    "sharegpt": (("conversations",), ("conversations",), ("system", "tools")),
    "alpaca": (("instruction", "input", "output"), ("instruction", "output"), ("input",)),
    "completion": (("prompt", "completion"), ("prompt", "completion"), ()),
    "text": (("text",), ("text",), ()),
    # preference pairs (DPO/ORPO): prompt + two answers, or TRL's two whole conversations (common.preference_data)
    "preference": (("chosen", "rejected"), ("chosen", "rejected"), ("prompt", "tools")),
}
KNOWN_KEYS = sorted({k for ident, req, optional in FORMATS.values() for k in (*ident, *req, *optional)})
EXPECTED = ("'messages', 'conversations', 'instruction'/'output', 'prompt'/'completion', 'text' "
            "or 'chosen'/'rejected'")

ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"
# Names other datasets use for our roles: suggested when they appear in a chat row.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
CHARS_PER_TOKEN = 4  # rough average for English BPE text; used to chunk .txt only when no tokenizer is given
# Message keys kept besides role/content (templates with tool support render them).
EXTRA_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name")


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type (for messages users read)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------
# the report


@dataclass
class Problem:
    where: str  # "file:line[:col]" or "file" ("" for problems without a place)
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class LintReport:
    """Every problem found in the data, with severities and counters.

    ``counters`` holds tallies such as ``json_object_content`` (assistant answers given as
    JSON objects and converted to text); ``formats`` maps each file to its detected format.
    """

    problems: list[Problem] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    formats: dict[str, str] = field(default_factory=dict)

    def error(self, where: str, message: str) -> None:
        self.problems.append(Problem(str(where), message, "error"))

    def warning(self, where: str, message: str) -> None:
        self.problems.append(Problem(str(where), message, "warning"))

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    @property
    def errors(self) -> list[str]:
        return [str(p) for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[str]:
        return [str(p) for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def extend(self, other: LintReport) -> None:
        """Merge another report into this one."""
        self.problems += other.problems
        self.counters.update(other.counters)
        self.formats.update(other.formats)

    def raise_if_errors(self, what: str = "data") -> None:
        """Raise one UserError listing the first 50 errors, then a count of the rest."""
        errors = self.errors
        if errors:
            raise UserError(f"{len(errors)} problem{'s' if len(errors) != 1 else ''} in the {what} "
                            "('llm-ft check-data' lists them all)", errors, max_shown=50)


# ---------------------------------------------------------------------------
# detection


def detect_format(obj: dict[str, Any]) -> str | None:
    """The format whose identifying keys the row has most of (ties: order of FORMATS); None if none."""
    best, score = None, 0
    for name, (ident, _, _) in FORMATS.items():
        s = sum(k in obj for k in ident)
        if s > score:
            best, score = name, s
    return best


def unknown_format(obj: dict[str, Any], where: str, report: LintReport) -> None:
    """Report a row of no known format, suggesting the nearest known key for a misspelt one."""
    hints = [(k, nearest(k, KNOWN_KEYS)) for k in obj]
    hints = [(k, h) for k, h in hints if h]
    if hints:
        k, h = hints[0]
        report.error(where, f"unknown key {k!r} (did you mean {h!r}?); expected {EXPECTED}")
    else:
        keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
        report.error(where, f"no known format (keys: {keys}); expected {EXPECTED}")


def _check_keys(obj: dict[str, Any], fmt: str, where: str, report: LintReport) -> bool:
    """Missing required keys are errors (suggesting a misspelt key present); near-miss optional keys warn."""
    _, required, optional = FORMATS[fmt]
    wanted = (*required, *optional)
    extra = [k for k in obj if k not in wanted]
    ok = True
    for key in required:
        if key in obj:
            continue
        typo = next((k for k in extra if nearest(k, [key]) == key), None)
        hint = f" (found {typo!r}: did you mean {key!r}?)" if typo else ""
        report.error(where, f"missing key {key!r}{hint}")
        ok = False
    for k in extra:
        hint = nearest(k, optional)
        if hint and hint not in obj:
            report.warning(where, f"unknown key {k!r} ignored (did you mean {hint!r}?)")
    return ok


# ---------------------------------------------------------------------------
# values


def _is_text_parts(value: Any) -> bool:
    """OpenAI-style content parts: [{"type": "text", "text": "..."}, ...]."""
    return (isinstance(value, list) and bool(value) and
            all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value))


def content_text(value: Any, *, name: str, assistant: bool, where: str, report: LintReport,
                 allow_empty: bool = False) -> str | None:
    """A turn's text, or None after reporting why it is unusable.

    An assistant answer given as a JSON object (or array) becomes canonical compact JSON
    text, ``json.dumps(obj, ensure_ascii=False)``; it is counted and warned about.
    """
    if _is_text_parts(value):
        value = "".join(p["text"] for p in value)
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            report.error(where, f"{name}: empty content")
            return None
        return value
    if assistant and isinstance(value, (dict, list)):
        report.count("json_object_content")
        report.warning(where, f"{name}: answer is a JSON {json_type(value)}, not a string; "
                              "converted to JSON text")
        return json.dumps(value, ensure_ascii=False)
    report.error(where, f"{name}: expected a string, got {json_type(value)}")
    return None


def _check_order(roles: list[str], field_name: str, where: str, report: LintReport) -> bool:
    """System only first; then user and assistant alternate (tool results after an assistant turn)."""
    prev = None
    for i, role in enumerate(roles):
        at = f"{field_name}[{i}]"
        problem = None
        if role == "system" and i != 0:
            problem = "a system message may only come first"
        elif role == "user" and prev == "user":
            problem = "two user turns in a row; user and assistant turns must alternate"
        elif role == "assistant" and prev in (None, "system"):
            problem = "the conversation must start with a user turn (after an optional system message)"
        elif role == "assistant" and prev == "assistant":
            problem = "two assistant turns in a row; user and assistant turns must alternate"
        elif role == TOOL_ROLE and prev not in ("assistant", TOOL_ROLE):
            problem = "a tool result must follow an assistant turn"
        if problem:
            report.error(where, f"{at}: role {role!r}: {problem}")
            return False
        prev = role
    if "assistant" not in roles:
        report.error(where, f"{field_name}: no assistant turn to learn from")
        return False
    if roles[-1] != "assistant":
        report.error(where, f"{field_name}: the last turn is {roles[-1]!r}, not 'assistant' "
                            "(nothing after the last answer is learned)")
        return False
    return True


def _tools(obj: dict[str, Any], where: str, report: LintReport) -> tuple[bool, list | None]:
    tools = obj.get("tools")
    if tools is None:
        return True, None
    if isinstance(tools, str):  # some datasets store the tool list as JSON text
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            pass
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        report.error(where, f"tools: expected a list of objects, got {json_type(tools)}")
        return False, None
    return True, tools or None


def _messages(turns: Any, *, field_name: str, role_key: str, text_key: str, role_map: dict[str, str] | None,
              tools: list | None, where: str, report: LintReport) -> list[dict[str, Any]] | None:
    """Validate a list of turns; return chat messages (role/content dicts) or None."""
    if not isinstance(turns, list):
        report.error(where, f"{field_name}: expected a list of {{{role_key!r}, {text_key!r}}} objects, "
                            f"got {json_type(turns)}")
        return None
    if not turns:
        report.error(where, f"{field_name}: empty list")
        return None
    ok, out, roles = True, [], []
    allowed = list(role_map) if role_map else [*ROLES, *([TOOL_ROLE] if tools else [])]
    for i, turn in enumerate(turns):
        at = f"{field_name}[{i}]"
        if not isinstance(turn, dict):
            report.error(where, f"{at}: expected an object with {role_key!r} and {text_key!r}, got {json_type(turn)}")
            ok = False
            continue
        missing = [k for k in (role_key, text_key) if k not in turn
                   and not (k == text_key and turn.get("tool_calls"))]
        for k in missing:
            typo = next((x for x in turn if x not in (role_key, text_key) and nearest(x, [k]) == k), None)
            report.error(where, f"{at}: missing key {k!r}" + (f" (found {typo!r}: did you mean {k!r}?)" if typo else ""))
        if missing:
            ok = False
            continue
        raw_role = turn[role_key]
        if not isinstance(raw_role, str):
            report.error(where, f"{at}.{role_key}: expected a string, got {json_type(raw_role)}")
            ok = False
            continue
        role = role_map.get(raw_role) if role_map else (raw_role if raw_role in allowed else None)
        if role is None:
            if raw_role == TOOL_ROLE and not role_map:
                report.error(where, f"{at}.{role_key}: role 'tool' needs a 'tools' list in the row")
            else:
                hint = (None if role_map else ROLE_ALIASES.get(raw_role.lower())) or nearest(raw_role, allowed)
                report.error(where, f"{at}.{role_key}: unknown role {raw_role!r}" +
                             (f" (did you mean {hint!r}?)" if hint else f"; expected one of {', '.join(allowed)}"))
            ok = False
            continue
        calls = bool(turn.get("tool_calls"))  # an assistant turn that only calls tools may have no text
        text = "" if calls and turn.get(text_key) is None else content_text(
            turn.get(text_key), name=f"{at}.{text_key}", assistant=role == "assistant", where=where,
            report=report, allow_empty=calls)
        roles.append(role)
        if text is None:
            ok = False
            continue
        msg = {"role": role, "content": text}
        msg.update({k: turn[k] for k in EXTRA_MESSAGE_KEYS if k in turn})
        out.append(msg)
    if not ok:
        return None
    return out if _check_order(roles, field_name, where, report) else None


# ---------------------------------------------------------------------------
# rows


def convert_row(obj: Any, fmt: str, source: Source, where: str, report: LintReport) -> Row | None:
    """Lint one parsed row of format ``fmt``; return the row, or None after reporting why not."""
    if not _check_keys(obj, fmt, where, report):
        return None
    if fmt == "preference":
        from common.preference_data import convert

        return convert(obj, source, where, report)
    if fmt == "text":
        text = obj["text"]
        if not isinstance(text, str):
            report.error(where, f"text: expected a string, got {json_type(text)}")
            return None
        if not text.strip():
            report.error(where, "text: empty content")
            return None
        return Text(text, source)
    if fmt in ("completion", "alpaca"):
        user_key, answer_key = ("prompt", "completion") if fmt == "completion" else ("instruction", "output")
        user = content_text(obj[user_key], name=user_key, assistant=False, where=where, report=report)
        answer = content_text(obj[answer_key], name=answer_key, assistant=True, where=where, report=report)
        extra = ""
        if fmt == "alpaca" and obj.get("input") is not None:
            extra = content_text(obj["input"], name="input", assistant=False, where=where, report=report,
                                 allow_empty=True)
        if user is None or answer is None or extra is None:
            return None
        if extra.strip():
            user = f"{user}\n\n{extra}"
        return Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], source)
    ok, tools = _tools(obj, where, report)
    if fmt == "chat":
        msgs = _messages(obj["messages"], field_name="messages", role_key="role", text_key="content", role_map=None,
                         tools=tools, where=where, report=report)
    else:  # sharegpt
        msgs = _messages(obj["conversations"], field_name="conversations", role_key="from", text_key="value",
                         role_map=SHAREGPT_ROLES, tools=tools, where=where, report=report)
        system = obj.get("system")
        if msgs and system is not None and not (msgs[0]["role"] == "system"):
            text = content_text(system, name="system", assistant=False, where=where, report=report)
            msgs = [{"role": "system", "content": text}, *msgs] if text is not None else None
    if msgs is None or not ok:
        return None
    return Conversation(msgs, source, tools)


# ---------------------------------------------------------------------------
# domain text


def text_chunks(text: str, max_tokens: int, tokenizer=None) -> Iterator[tuple[int, str]]:
    """Split domain text into (first line, chunk) pieces of at most ``max_tokens``.

    Paragraphs (blank-line separated) are packed whole while they fit; a longer paragraph
    is cut at token boundaries (with a tokenizer) or at whitespace (by characters).
    """
    budget = max(1, max_tokens - 2)  # room for BOS and EOS

    def size(s: str) -> int:
        if tokenizer is not None:
            return len(tokenizer.encode(s, add_special_tokens=False))
        return math.ceil(len(s) / CHARS_PER_TOKEN)

    paragraphs, current, start = [], [], 0
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            if not current:
                start = i
            current.append(line)
        elif current:
            paragraphs.append((start, "\n".join(current)))
            current = []
    if current:
        paragraphs.append((start, "\n".join(current)))

    sep = size("\n\n")
    chunk, chunk_line, used = [], 0, 0
    for line, par in paragraphs:
        n = size(par)
        if chunk and used + sep + n > budget:
            yield chunk_line, "\n\n".join(chunk)
            chunk, used = [], 0
        if n > budget:
            yield from _split_long(par, line, budget, tokenizer)
            continue
        if not chunk:
            chunk_line = line
            used = n
        else:
            used += sep + n
        chunk.append(par)
    if chunk:
        yield chunk_line, "\n\n".join(chunk)


def _split_long(par: str, line: int, budget: int, tokenizer) -> Iterator[tuple[int, str]]:
    cuts = []  # character offsets where pieces start
    if tokenizer is not None:
        offsets = tokenizer(par, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cuts = [offsets[k][0] for k in range(0, len(offsets), budget)]
    else:
        width, pos = budget * CHARS_PER_TOKEN, 0
        while pos < len(par):
            cuts.append(pos)
            end = pos + width
            space = par.rfind(" ", pos + width // 2, end)
            pos = space + 1 if end < len(par) and space > 0 else end
    for a, b in zip(cuts, [*cuts[1:], len(par)], strict=True):
        piece = par[a:b]
        if piece.strip():
            yield line + par.count("\n", 0, a), piece


def row_key(row: Row) -> str:
    """What a user sees of a row (prompt + answers, no system prompt), normalized for duplicate checks."""
    if isinstance(row, Text):
        text = row.text
    elif hasattr(row, "key_text"):  # a preference pair
        text = row.key_text()
    else:
        text = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in row.messages if m["role"] != "system")
    return " ".join(text.split()).casefold()


def canonical(row: Row) -> dict[str, Any]:
    """A row's content as a plain dict (no source), the unit of the data fingerprint."""
    if isinstance(row, Text):
        return {"text": row.text}
    if hasattr(row, "canonical"):  # a preference pair
        return row.canonical()
    out: dict[str, Any] = {"messages": row.messages}
    if row.tools:
        out["tools"] = row.tools
    return out

