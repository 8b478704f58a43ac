"""``classify(texts)``: a fine-tuned classifier from a notebook or a script, with its confidence.

    from common.structured import Classifier
    clf = Classifier("runs/demo", threshold=0.5)          # a run, a merged model or a .gguf
    clf(["set a timer for 5 minutes"])                    # [("set_timer", 0.97, {"intent": ..., "slots": ...})]

Every answer is decoded under the schema (always valid JSON of the right shape), and its
enum field's probability comes from the model's log-probs (see :mod:`.confidence`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.errors import UserError
from common.structured.confidence import Classified, classify_answer
from common.structured.constraint import use_format
from common.structured.schema import AnswerFormat, load_format, resolve_format


def check_threshold(threshold: float | None, fmt: AnswerFormat | None, what: str = "--threshold") -> None:
    """A threshold needs a number in [0, 1] and a schema with an enum field that has a fallback value."""
    if threshold is None:
        return
    if not 0 <= threshold <= 1:
        raise UserError(f"{what}: must be in [0, 1], got {threshold}")
    if fmt is None:
        raise UserError(f"{what} needs --format (a schema with an enum field)")
    if fmt.enum is None:
        raise UserError(f"{fmt.path}: {what} needs an enum field in the schema (a top-level string property with "
                        "'enum'); this schema has none")
    if fmt.enum.fallback is None:
        raise UserError(f"{fmt.path}: {what}: the enum field '{fmt.enum.key}' has no fallback value (give the "
                        "property a 'default', or an allowed value named 'unknown')")


def setup_format(gen, spec: str | None, threshold: float | None, data_schema=None) -> AnswerFormat | None:
    """``--format``/``--threshold`` of chat and serve: resolve the schema, check the threshold, constrain ``gen``."""
    fmt = resolve_format(spec, data_schema=data_schema, target=gen.target)
    if fmt is None and threshold is not None:
        raise UserError("--threshold needs --format (a schema with an enum field)")
    check_threshold(threshold, fmt)
    if fmt is not None:
        use_format(gen, fmt)
    return fmt


def confidence_line(gen, messages: list[dict], answer: str, fmt: AnswerFormat | None, threshold: float | None,
                    code: str = "") -> tuple[str, str]:
    """(the answer after ``threshold``, ``intent: set_timer 97.0%, set_alarm 2.1%, unknown 0.4%``) for chat and
    serve; ("answer", "") without an enum field. ``code`` quotes the values (markdown's backtick)."""
    if fmt is None or fmt.enum is None:
        return answer, ""
    c = classify_answer(gen, gen.chat_prompt(messages), answer, fmt, threshold)
    top = ", ".join(f"{code}{v}{code} {p:.1%}" for v, p in c.top(3))
    return c.text, f"{fmt.enum.key}: {top}" + (f"; below {threshold:g}: answered {code}{c.label}{code}"
                                               if c.fallback else "")


class Classifier:
    """A loaded model that answers in a JSON schema and says how sure it is of the schema's enum field."""

    def __init__(self, target: str, *, format: str | AnswerFormat = "schema", backend: str = "auto",
                 system_prompt: str | None = None, threshold: float | None = None, max_new_tokens: int = 256,
                 n_ctx: int = 4096, generator=None):
        from common.generation import load_generator

        self.gen = generator or load_generator(target, backend=backend, system_prompt=system_prompt, n_ctx=n_ctx)
        try:
            if isinstance(format, AnswerFormat):
                self.fmt = format
            elif format == "schema":
                self.fmt = resolve_format("schema", target=self.gen.target)
            else:
                self.fmt = load_format(format)
            check_threshold(threshold, self.fmt, "threshold")
            use_format(self.gen, self.fmt)
        except BaseException:
            if generator is None:
                self.gen.close()
            raise
        self.threshold, self.max_new_tokens = threshold, max_new_tokens

    def answer(self, messages: list[dict[str, Any]]) -> Classified:
        """One conversation's constrained answer and its enum field's distribution."""
        text = self.gen.generate(messages, max_new_tokens=self.max_new_tokens)
        return classify_answer(self.gen, self.gen.chat_prompt(messages), text, self.fmt, self.threshold)

    def __call__(self, texts: Sequence[str]) -> list[tuple[Any, float | None, Any]]:
        """``(value, probability, json)`` per text: the enum field's value (None without one), its
        probability, and the whole parsed answer."""
        out = []
        for text in texts:
            c = self.answer([{"role": "user", "content": text}])
            out.append((c.label, c.probability, c.value))
        return out

    def close(self) -> None:
        self.gen.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def classify(texts: Sequence[str], target: str, **options) -> list[tuple[Any, float | None, Any]]:
    """Load ``target``, classify ``texts`` (see :class:`Classifier` for ``options``), free the model."""
    with Classifier(target, **options) as clf:
        return clf(texts)
