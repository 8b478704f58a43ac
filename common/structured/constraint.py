"""Schema-constrained decoding: the JSON schema compiled by a library, and a framework-free token hook.

The torch and MLX engines use llguidance (a compiled JSON-schema -> grammar -> token-mask
engine that reads Hugging Face tokenizers and needs neither framework); llama.cpp uses its
own grammar from the schema (llama-cpp-python's ``LlamaGrammar.from_json_schema``, the
conversion Ollama's ``format`` relies on). Nothing here writes a grammar by hand.

The hook speaks numpy: :meth:`BatchConstraint.masks` takes the token each row produced last
and returns a boolean ``[rows, vocab]`` array of the tokens allowed next; an engine applies
it to its own logits (``-inf`` where False) in its sampling loop.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence

from common.errors import UserError
from common.structured.schema import AnswerFormat

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> LLTokenizer (~1 s each)


def _llguidance():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--format needs llguidance on the torch and MLX engines ({exc.name or exc}): "
                        "pip install 'llm-ft[structured]'") from None
    return llguidance


def compile_grammar(fmt: AnswerFormat) -> str:
    """The llguidance grammar of ``fmt``; UserError naming the file and the construct it cannot compile.

    Keywords llguidance does not implement (e.g. ``if``/``then``; data/schema.json uses ``anyOf`` branches
    instead) are left out of the grammar, as llama.cpp's conversion (and so Ollama) leaves them out; they
    go to ``fmt.notes`` and every answer is still checked against the whole schema.
    """
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(fmt.schema, overrides={"lenient": True})
    except ValueError as exc:
        raise UserError(f"{fmt.path}: cannot compile the schema for constrained decoding: {exc}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise UserError(f"{fmt.path}: cannot compile the schema for constrained decoding: "
                        + " ".join(messages[0].split()))
    for message in messages:
        note = f"{fmt.path}: constrained decoding does not enforce: {message.removeprefix('Unimplemented keys: ')}"
        if note not in fmt.notes:
            fmt.notes.append(note)
    return grammar


def lltokenizer(tokenizer, stop_ids: Sequence[int]):
    """llguidance's view of a Hugging Face tokenizer (cached per tokenizer), ending answers at ``stop_ids``."""
    llg = _llguidance()
    key = (tuple(stop_ids),)
    cached = _TOKENIZERS.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--format on this engine needs a fast (tokenizer.json) Hugging Face tokenizer")
    lt = llg.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=list(stop_ids) or None)
    _TOKENIZERS[tokenizer] = (key, lt)
    return lt


class Constraint:
    """A schema compiled for one tokenizer; :meth:`batch` makes the per-answer grammar states."""

    def __init__(self, fmt: AnswerFormat, tokenizer, stop_ids: Sequence[int]):
        llg = _llguidance()
        self.fmt = fmt
        self.stop_ids = list(stop_ids)
        self.lltok = lltokenizer(tokenizer, self.stop_ids)
        self.vocab = self.lltok.vocab_size
        self._template = llg.LLMatcher(self.lltok, compile_grammar(fmt), log_level=0)
        if self._template.is_error():
            raise UserError(f"{fmt.path}: cannot compile the schema for constrained decoding: "
                            f"{self._template.get_error()}")

    def batch(self, rows: int) -> BatchConstraint:
        return BatchConstraint(self, rows)


class BatchConstraint:
    """The grammar states of ``rows`` answers generated together (a logits-processor-style hook)."""

    def __init__(self, constraint: Constraint, rows: int):
        import numpy as np

        self.c = constraint
        self.matchers = [constraint._template.deep_copy() for _ in range(rows)]
        self._bits = np.zeros((rows, (constraint.vocab + 31) // 32), dtype=np.int32)

    def advance(self, tokens: Sequence[int | None]) -> None:
        """Feed each row the token it produced last (None: nothing new, e.g. the first step)."""
        for m, t in zip(self.matchers, tokens, strict=True):
            if t is not None and not (m.is_stopped() or m.is_error()):
                m.consume_token(int(t))

    def masks(self, width: int):
        """``[rows, width]`` booleans: the tokens each row may produce next. A finished answer (the schema's
        value complete, or an end token taken) may only end, so a row that goes on ends there, and no row is
        ever left without a token to sample. Ids past the tokenizer's vocabulary (a model's padding rows) never."""
        import numpy as np
        from llguidance.numpy import fill_next_token_bitmask

        out = np.zeros((len(self.matchers), width), dtype=bool)
        for i, m in enumerate(self.matchers):
            if m.is_stopped() or m.is_error():
                out[i, [t for t in self.c.stop_ids if t < width]] = True
                continue
            fill_next_token_bitmask(m, self._bits, i)
            bits = np.unpackbits(self._bits[i].view(np.uint8), bitorder="little")[: min(width, self.c.vocab)]
            out[i, : len(bits)] = bits.astype(bool)
        return out

    def step(self, tokens: Sequence[int | None], logits):
        """The numpy form of the hook: advance, then ``logits`` (``[rows, vocab]``) with disallowed tokens at -inf."""
        import numpy as np

        self.advance(tokens)
        return np.where(self.masks(logits.shape[-1]), logits, -np.inf)


def llama_grammar(fmt: AnswerFormat):
    """llama.cpp's grammar for ``fmt`` (llama-cpp-python's JSON schema conversion, as Ollama's ``format``)."""
    try:
        from llama_cpp import LlamaGrammar
    except ImportError as exc:
        raise UserError(f"--format on a GGUF needs llama-cpp-python ({exc.name}): pip install 'llm-ft[verify]'") from None
    try:
        return LlamaGrammar.from_json_schema(json.dumps(fmt.schema), verbose=False)
    except (ValueError, KeyError, TypeError, RuntimeError, NotImplementedError, AssertionError) as exc:
        # (llama-cpp-python reports an unresolvable $ref with an assert)
        raise UserError(f"{fmt.path}: llama.cpp cannot turn the schema into a grammar: {exc}") from None


def use_format(gen, fmt: AnswerFormat | None) -> None:
    """Constrain ``gen``'s answers to ``fmt`` from now on (None: decode freely again)."""
    if fmt is None:
        gen.constraint = None
    elif gen.backend == "llama.cpp":
        gen.constraint = llama_grammar(fmt)
    else:
        gen.constraint = Constraint(fmt, gen.formatter.tokenizer, gen.stop_ids)
