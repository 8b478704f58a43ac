"""Preference pairs: the ``preference`` row format, its lint, and tokenized pairs.

A row is ``{"prompt", "chosen", "rejected"}`` (strings, or the prompt as a list of
messages) or TRL's conversational form ``{"chosen": [messages], "rejected": [messages]}``
whose two conversations share everything but the final assistant turn. Either way it
becomes a :class:`Preference`: the prompt messages and the two final answers. Tokenized,
a pair is two :class:`~common.rows.Example` s with the same prompt; the loss mask covers
the final assistant turn only (earlier turns are context, as in TRL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.rows import Example, Source

KEYS = ("prompt", "chosen", "rejected")


@dataclass
class Preference:
    """A prompt (messages ending with a user turn) and two answers to it, the first preferred."""

    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str
    source: Source | None = None
    tools: list[dict[str, Any]] | None = None

    def conversation(self, answer: str) -> list[dict[str, Any]]:
        return [*self.prompt, {"role": "assistant", "content": answer}]

    def key_text(self) -> str:
        """What a user sees of the row (for duplicate and leakage checks)."""
        turns = [m for m in self.prompt if m["role"] != "system"]
        return "\x1e".join([*(f"{m['role']}\x1f{m['content']}" for m in turns), self.chosen, self.rejected])

    def canonical(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def _answer(value: Any, name: str, where: str, report) -> str | None:
    from common.data_formats import content_text

    if isinstance(value, list):  # a list of messages: the answer is its single assistant message
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            report.error(where, f"{name}: expected a string or one assistant message after 'prompt'")
            return None
        value = value[0].get("content")
    return content_text(value, name=name, assistant=True, where=where, report=report)


def _conversation(value: Any, name: str, tools, where: str, report) -> list[dict[str, Any]] | None:
    from common.data_formats import _messages

    return _messages(value, field_name=name, role_key="role", text_key="content", role_map=None, tools=tools,
                     where=where, report=report)


def convert(obj: dict[str, Any], source: Source, where: str, report) -> Preference | None:
    """Lint one preference row (keys already checked); the row, or None after reporting why not."""
    from common.data_formats import _tools, content_text

    ok, tools = _tools(obj, where, report)
    if "prompt" in obj:
        raw = obj["prompt"]
        if isinstance(raw, list):
            prompt = _messages_prompt(raw, tools, where, report)
        else:
            text = content_text(raw, name="prompt", assistant=False, where=where, report=report)
            prompt = None if text is None else [{"role": "user", "content": text}]
        chosen = _answer(obj["chosen"], "chosen", where, report)
        rejected = _answer(obj["rejected"], "rejected", where, report)
    else:  # conversational: two whole conversations
        c = _conversation(obj["chosen"], "chosen", tools, where, report)
        r = _conversation(obj["rejected"], "rejected", tools, where, report)
        if c is None or r is None:
            return None
        if c[:-1] != r[:-1]:
            k = next((i for i, (a, b) in enumerate(zip(c[:-1], r[:-1], strict=False)) if a != b), min(len(c), len(r)) - 1)
            report.error(where, f"chosen and rejected differ before the final answer (at message {k}): "
                                "a pair needs one prompt")
            return None
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
    if prompt is None or chosen is None or rejected is None or not ok:
        return None
    if chosen.strip() == rejected.strip():
        report.error(where, "chosen and rejected are the same answer: nothing to prefer")
        return None
    return Preference(prompt, chosen, rejected, source, tools)


def _messages_prompt(raw: list, tools, where: str, report) -> list[dict[str, Any]] | None:
    """A prompt given as messages: it must end with a user turn (the answers follow it)."""
    from common.data_formats import _messages

    # Lint it as a conversation with a placeholder answer, so the role order checks are the same.
    probe = [*raw, {"role": "assistant", "content": "x"}]
    msgs = _messages(probe, field_name="prompt", role_key="role", text_key="content", role_map=None, tools=tools,
                     where=where, report=report)
    return None if msgs is None else msgs[:-1]


# ---------------------------------------------------------------------------
# tokenized pairs


@dataclass
class PairExample:
    """A tokenized pair; ``ref`` holds the reference log-prob sums (chosen, rejected) once computed."""

    chosen: Example
    rejected: Example
    source: Source | None = None
    ref: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    # Both sides end to end: what the run's identity (common.train.identity) fingerprints.
    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def loss_mask(self) -> list[int]:
        return self.chosen.loss_mask + self.rejected.loss_mask

    @property
    def n_supervised(self) -> int:
        return min(self.chosen.n_supervised, self.rejected.n_supervised)


def final_turn_only(ex: Example) -> Example:
    """Keep only the last run of target tokens: the final assistant answer."""
    mask = list(ex.loss_mask)
    end = max((i for i, m in enumerate(mask) if m), default=-1)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return Example(ex.input_ids, [1 if start <= i <= end else 0 for i in range(len(mask))], ex.source)


def encode_pair(row: Preference, formatter) -> PairExample:
    """Tokenize both sides with the chat template and system prompt, as SFT does."""
    sides = [final_turn_only(formatter.encode_messages(row.conversation(a), tools=row.tools, source=row.source))
             for a in (row.chosen, row.rejected)]
    return PairExample(sides[0], sides[1], row.source)


def _truncate(ex: Example, max_len: int) -> Example:
    return Example(ex.input_ids[:max_len], ex.loss_mask[:max_len], ex.source)


def encode_pairs(rows: list, formatter, max_len: int, policy: str, *,
                 progress: bool = False) -> tuple[list[PairExample], dict[str, int]]:
    """Tokenize pairs and apply the overlong policy to each side (``max_len`` per sequence).

    A pair with a side left without a target token (its answer cut off) is dropped and counted.
    """
    from common.errors import UserError
    from common.prompts import percentile

    out, lengths, problems = [], [], []
    stats = {"rows": len(rows), "overlong": 0, "truncated": 0, "dropped": 0, "zero_supervised": 0}
    for row in rows:
        if not isinstance(row, Preference):
            problems.append(f"{row.source}: not a preference pair (--method dpo/orpo needs prompt/chosen/rejected rows)")
            continue
        pair = encode_pair(row, formatter)
        lengths += [len(pair.chosen), len(pair.rejected)]
        if max(len(pair.chosen), len(pair.rejected)) > max_len:
            stats["overlong"] += 1
            if policy == "error":
                problems.append(f"{row.source}: {max(len(pair.chosen), len(pair.rejected))} tokens > "
                                f"max_seq_length {max_len}")
                continue
            if policy == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
            pair = PairExample(_truncate(pair.chosen, max_len), _truncate(pair.rejected, max_len), row.source)
        if pair.n_supervised == 0:
            stats["zero_supervised"] += 1
            continue
        out.append(pair)
    if problems:
        raise UserError(f"{len(problems)} rows cannot be used as preference pairs", problems, max_shown=20)
    stats.update(pairs=len(out), examples=len(out), tokens_total=sum(lengths), tokens_p50=percentile(lengths, 50),
                 tokens_p95=percentile(lengths, 95), tokens_max=max(lengths, default=0), max_seq_length=max_len,
                 supervised_tokens=sum(p.chosen.n_supervised + p.rejected.n_supervised for p in out))
    return out, stats
