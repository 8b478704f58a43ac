"""Prompts: the system prompt, chat templates rendered in a sandbox, and loss masks.

Output per example is plain ``(input_ids, loss_mask)``. Masks are derived from the
rendered template itself: the text of assistant turn *i* is what rendering
``messages[:i+1]`` adds to rendering ``messages[:i]`` with the generation prompt. No
marker strings are searched for, so any template that renders prefixes stably works.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.rows import Conversation, Example, Row, Text

# Templates for models without one, or to override one (--chat-template NAME).
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}

TEMPLATE_NAMES = ", ".join(NAMED_TEMPLATES)  # for help and error texts: "chatml, llama3, alpaca"

# Tokens that end a turn in the families we know; only those in the vocabulary count.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
                      "<|end_of_text|>", "<|eom_id|>")


def load_system_prompt(path: str | Path | None) -> str | None:
    """The system prompt text, exactly as training and the Modelfile use it.

    Trailing newlines are dropped (editors add one); nothing else is changed.
    """
    if path in (None, ""):
        return None
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{p}: system prompt file not found (set --system-prompt-file '' to use none)") from None
    text = text.replace("\r\n", "\n").rstrip("\n")
    if not text.strip():
        raise UserError(f"{p}: system prompt file is empty")
    return text


# ---------------------------------------------------------------------------
# template rendering


def _raise(message: str):
    raise UserError(f"chat template: {message}")


@lru_cache(maxsize=32)
def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols

    from common.template_bounds import BoundedEnvironment

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise UserError(f"chat template does not compile: {exc}") from None
    except RecursionError:
        raise UserError("chat template does not compile: nested too deeply") from None


def resolve_template(tokenizer, override: str | None = None) -> str:
    """The chat template source: an override (named or a file), else the tokenizer's."""
    if override:
        if override in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[override]
        path = Path(override)
        if path.suffix in (".jinja", ".j2", ".txt") or path.exists():
            try:
                return path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise UserError(f"{path}: chat template file not found") from None
        raise UserError(f"unknown chat template {override!r}: use one of {', '.join(NAMED_TEMPLATES)} or a .jinja file")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    if not template:
        raise UserError("the tokenizer has no chat template: pass --chat-template chatml|llama3|alpaca or a .jinja file")
    return template


def template_origin(tokenizer, override: str | None = None) -> str:
    """Where a chat template comes from, for error messages: the override, else the tokenizer's file."""
    if override:
        return override if override not in NAMED_TEMPLATES else f"--chat-template {override}"
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    jinja = folder / "chat_template.jinja"
    return str(jinja if jinja.is_file() else folder / "tokenizer_config.json")


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
           tools: list | None = None, special: dict[str, str] | None = None, origin: str = "chat template") -> str:
    """Render ``messages`` with a chat template in a bounded immutable sandbox (see
    :mod:`common.template_bounds`); ``origin`` (the template's file) names it in errors."""
    from jinja2 import TemplateError

    from common.template_bounds import TemplateTooExpensive

    template_obj = _compile(template)
    try:
        return template_obj.environment.render_bounded(
            template_obj, messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            **(special or {}))
    except UserError:
        raise
    except (TemplateTooExpensive, MemoryError, RecursionError) as exc:
        why = {MemoryError: "out of memory", RecursionError: "recursion too deep"}.get(type(exc), str(exc))
        raise UserError(f"{origin}: chat template too expensive ({why})") from None
    except (TemplateError, TypeError, ValueError, KeyError) as exc:
        raise UserError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None


def special_tokens(tokenizer) -> dict[str, str]:
    """The names a chat template may use for special tokens (bos_token, eos_token, ...)."""
    out = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        out[name] = str(value) if value is not None else ""
    return out


# ---------------------------------------------------------------------------
# the formatter


class ChatFormatter:
    """Turns rows into ``Example(input_ids, loss_mask)`` with one tokenizer and template.

    ``tokenizer`` is a Hugging Face tokenizer (``transformers.PreTrainedTokenizerFast``);
    only ``encode``/``convert_tokens_to_ids``/special-token attributes are used.
    """

    def __init__(self, tokenizer, *, template: str | None = None, system_prompt: str | None = None,
                 train_on_prompt: bool = False):
        self.tokenizer = tokenizer
        self.template = resolve_template(tokenizer, template)
        self.template_origin = template_origin(tokenizer, template)
        self.system_prompt = system_prompt
        self.train_on_prompt = train_on_prompt
        self.special = special_tokens(tokenizer)
        self.eot_ids = self._end_of_turn_ids()
        self.bos_id = self._token_id(self.special["bos_token"])
        self.eos_id = self._token_id(self.special["eos_token"])
        self.add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and self.bos_id is not None

    def _token_id(self, token: str | None) -> int | None:
        if not token:
            return None
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return None if tid is None or (tid == unk and token != self.special.get("unk_token")) else int(tid)

    def _end_of_turn_ids(self) -> list[int]:
        ids = []
        candidates = list(END_OF_TURN_TOKENS)
        if self.special["eos_token"]:
            candidates.insert(0, self.special["eos_token"])
        for tok in candidates:
            if tok and (tok in self.template or tok == self.special["eos_token"]):
                tid = self._token_id(tok)
                if tid is not None and tid not in ids:
                    ids.append(tid)
        return ids

    @property
    def stop_tokens(self) -> list[str]:
        """End-of-turn token strings the template emits (for Modelfile ``stop`` and generation)."""
        toks = self.tokenizer.convert_ids_to_tokens(self.eot_ids)
        return [t for t in toks if t in self.template or t == self.special["eos_token"]]

    # -- rendering -----------------------------------------------------------

    def with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Insert the system prompt into a conversation that has none."""
        if self.system_prompt is None or (messages and messages[0]["role"] == "system"):
            return list(messages)
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def render(self, messages, *, add_generation_prompt=False, tools=None) -> str:
        return render(self.template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                      special=self.special, origin=self.template_origin)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _maybe_bos(self, text: str) -> list[int]:
        if self.add_bos and not text.startswith(self.special["bos_token"]):
            return [self.bos_id]
        return []

    def prompt_text(self, messages, tools=None) -> str:
        """The text a model is given to answer: history + generation prompt (no final assistant turn)."""
        msgs = self.with_system(messages)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return self.render(msgs, add_generation_prompt=True, tools=tools)

    def prompt_ids(self, messages, tools=None) -> list[int]:
        text = self.prompt_text(messages, tools)
        return self._maybe_bos(text) + self._tokenize(text)

    # -- encoding ------------------------------------------------------------

    def encode(self, row: Conversation | Text) -> Example:
        if isinstance(row, Text):
            ids = self._maybe_bos(row.text) + self._tokenize(row.text)
            if self.eos_id is not None:
                ids.append(self.eos_id)
            return Example(ids, [1] * len(ids), row.source)
        return self.encode_messages(row.messages, tools=row.tools, source=row.source)

    def encode_messages(self, messages, *, tools=None, source=None) -> Example:
        msgs = self.with_system(messages)
        where = f"{source}: " if source else ""
        full = self.render(msgs, tools=tools)
        # Cut points: (start, end) of each assistant turn in the rendered text.
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.render(msgs[:i], add_generation_prompt=True, tools=tools)
            upto = self.render(msgs[: i + 1], tools=tools)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise UserError(f"{where}the chat template does not render conversations as stable prefixes, "
                                "so assistant turns cannot be located; use --chat-template to pick another")
            spans.append((len(before), len(upto)))
        if not spans:
            raise UserError(f"{where}conversation has no assistant turn to learn from")

        ids: list[int] = self._maybe_bos(full)
        mask: list[int] = [int(self.train_on_prompt)] * len(ids)
        pos = 0
        for start, end in spans:
            seg = self._tokenize(full[pos:start])
            ids += seg
            mask += [int(self.train_on_prompt)] * len(seg)
            answer = self._tokenize(full[start:end])
            # Learn the answer up to and including its end-of-turn token; what the
            # template adds after it (a newline) is structure, not the answer.
            cut = next((k + 1 for k, t in enumerate(answer) if t in self.eot_ids), None)
            if cut is None:
                tail_ids = self._tokenize(full[end:])
                if tail_ids and tail_ids[0] in self.eot_ids:  # EOT rendered after the span
                    answer = answer + [tail_ids[0]]
                    end = end + len(self.tokenizer.decode([tail_ids[0]]))
                    cut = len(answer)
                elif self.eos_id is not None:  # template has no end-of-turn: teach EOS
                    answer = answer + [self.eos_id]
                    cut = len(answer)
                else:
                    cut = len(answer)
            ids += answer
            mask += [1] * cut + [int(self.train_on_prompt)] * (len(answer) - cut)
            pos = end
        rest = self._tokenize(full[pos:])
        ids += rest
        mask += [int(self.train_on_prompt)] * len(rest)
        return Example(ids, mask, source)


def apply_length_policy(examples: Iterable[Example], max_len: int, policy: str) -> tuple[list[Example], dict]:
    """Truncate, drop or reject examples longer than ``max_len``; always counted."""
    kept, stats, problems = [], {"overlong": 0, "truncated": 0, "dropped": 0, "no_supervised": 0}, []
    for ex in examples:
        if len(ex) > max_len:
            stats["overlong"] += 1
            if policy == "error":
                problems.append(f"{ex.source}: {len(ex)} tokens > max_seq_length {max_len}")
                continue
            if policy == "drop":
                stats["dropped"] += 1
                continue
            ex = Example(ex.input_ids[:max_len], ex.loss_mask[:max_len], ex.source)
            stats["truncated"] += 1
        if ex.n_supervised == 0:
            stats["no_supervised"] += 1
        kept.append(ex)
    if problems:
        raise UserError(f"{len(problems)} rows are longer than max_seq_length={max_len} "
                        "(use --overlong truncate|drop or raise --max-seq-length)", problems)
    return kept, stats


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def encode_split(rows: list[Row], formatter, max_len: int, policy: str, *,
                 progress: bool = False) -> tuple[list[Example], dict[str, int]]:
    """Tokenize rows with a ChatFormatter and apply the overlong policy (truncate/drop/error).

    Lengths (p50/p95/max) are measured before the policy; supervised counts after it.
    Examples left with no supervised token (an answer cut off by truncation) are dropped
    and counted in ``zero_supervised``: they would teach nothing and divide a loss by zero.
    """
    it = rows
    if progress and len(rows) > 200:
        from rich.progress import track

        it = track(rows, description="tokenizing", transient=True)
    from common.row_bounds import cut_row, max_token_chars

    widest = max_token_chars(formatter.tokenizer)
    char_limit = (max_len + 64) * widest if widest else None  # 64 tokens of margin around the cut
    examples = [formatter.encode((char_limit and cut_row(r, char_limit)) or r) for r in it]
    lengths = [len(e) for e in examples]
    kept, policy_stats = apply_length_policy(examples, max_len, policy)
    learned = [e for e in kept if e.n_supervised > 0]
    stats = {
        "rows": len(rows),
        "examples": len(learned),
        "tokens_total": sum(lengths),
        "tokens_p50": percentile(lengths, 50),
        "tokens_p95": percentile(lengths, 95),
        "tokens_max": max(lengths, default=0),
        "max_seq_length": max_len,
        "supervised_tokens": sum(e.n_supervised for e in learned),
        "zero_supervised": len(kept) - len(learned),
        "overlong": policy_stats["overlong"],
        "truncated": policy_stats["truncated"],
        "dropped": policy_stats["dropped"],
    }
    return learned, stats


def generation_prompt_messages(row: Conversation) -> tuple[list[dict], str | None]:
    """Split a conversation into the prompt messages and the expected final answer."""
    msgs = list(row.messages)
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    return msgs, None
