"""The row types that the data layer produces and the prompt layer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Source:
    """Where a row came from, for error messages: ``file:line``."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Conversation:
    """A chat: ``messages`` are dicts with ``role`` (system/user/assistant) and ``content`` (str)."""

    messages: list[dict[str, Any]]
    source: Source | None = None
    tools: list[dict[str, Any]] | None = None

    def user_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


@dataclass
class Text:
    """Plain text for domain adaptation: every token is trained on."""

    text: str
    source: Source | None = None


Row = Conversation | Text


@dataclass
class Example:
    """One tokenized training example: plain lists, identical for every backend."""

    input_ids: list[int]
    loss_mask: list[int]
    source: Source | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return sum(self.loss_mask)
