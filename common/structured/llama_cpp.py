"""llama.cpp's side of structured output: exact log-probs of continuations (a classifier's confidence on
a GGUF) and grammar-constrained decoding that checks the grammar one token at a time.

The context is evaluated once; each continuation is then evaluated from the end of the
context (the KV cache past it is dropped, as llama-cpp-python does when ``n_tokens`` is
rewound), in a second llama.cpp context that keeps logits for every position.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import numpy as np


def scoring_context(gen, need: int):
    """The generator's all-positions-logits context, (re)made large enough for ``need`` tokens."""
    from llama_cpp import Llama

    llm = getattr(gen, "_loss_llm", None)
    if llm is None or llm.n_ctx() < need:
        if llm is not None:
            llm.close()
        ctx = max(256, math.ceil(need / 256) * 256)
        # logits_all keeps one row of logits per position: ctx * n_vocab * 4 bytes.
        llm = Llama(model_path=str(gen.target.gguf_file), n_ctx=ctx, logits_all=True, verbose=False)
        gen._loss_llm = llm  # shared with the engine's loss(), which makes the same kind of context
    return llm


def score_continuations(gen, context: list[int], continuations: Sequence[list[int]],
                        end_ids: Sequence[int] | None = None) -> list[float]:
    """Sum of log-probs (nats) of each continuation's tokens after ``context``, plus, with ``end_ids``, the
    log of the probability that one of those tokens comes next."""
    import numpy as np

    def logp(row) -> np.ndarray:
        row = np.asarray(row, dtype=np.float64)
        top = row.max()
        return row - (top + np.log(np.exp(row - top).sum()))

    llm = scoring_context(gen, len(context) + max(len(c) for c in continuations))
    llm.reset()
    llm.eval(context)
    first = logp(llm.scores[len(context) - 1])  # predicts each continuation's first token
    out = []
    for c in continuations:
        llm.n_tokens = len(context)  # eval() drops the cache past n_tokens before it appends
        llm.eval(c)
        rows = [first] + [logp(llm.scores[len(context) + j]) for j in range(len(c))]
        total = sum(rows[j][t] for j, t in enumerate(c))
        if end_ids:
            ends = rows[len(c)][list(end_ids)]
            total += ends.max() + np.log(np.exp(ends - ends.max()).sum())
        out.append(float(total))
    return out


class GrammarSampler:
    """llama.cpp's grammar for one answer, consulted the way llama.cpp's own sampler (and Ollama's) does.

    Applying a grammar to every token of a 49k vocabulary costs more than the model on a small model, so
    the next token is first picked from the unconstrained logits (the argmax at temperature 0, else
    top-p, temperature and a seeded draw), then only that one token is checked against the grammar. Only
    when the grammar rejects it is the grammar applied to the whole vocabulary and the token picked again
    from what it allows. Greedy answers are the ones full-grammar decoding gives: a token the grammar
    accepts that is the argmax of all logits is the argmax of the allowed ones too.
    """

    def __init__(self, llm, grammar, *, temperature: float, top_p: float, seed: int):
        import llama_cpp

        from common.errors import UserError

        self.lib = llama_cpp
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"),
                                                            grammar._root.encode("utf-8"))
        if not self.grammar:
            raise UserError("llama.cpp cannot parse the grammar made from the schema")
        self.ctx = llm.ctx
        self.n_vocab = llm.n_vocab()
        row = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
        assert row.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
        self.ids = np.arange(self.n_vocab, dtype=np.int32)
        self.cands = np.zeros(self.n_vocab, dtype=row)  # the whole vocabulary, refilled per token
        self.one = np.zeros(1, dtype=row)  # the single candidate checked against the grammar
        self.chain = None  # top-p, temperature, seeded draw (temperature 0: argmax, no sampler)
        if temperature > 0:
            self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            for s in (llama_cpp.llama_sampler_init_top_p(top_p, 1), llama_cpp.llama_sampler_init_temp(temperature),
                      llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)):
                llama_cpp.llama_sampler_chain_add(self.chain, s)
        self.checked = self.rejected = 0  # tokens checked alone; of those, rejected (the whole vocab applied)

    def _apply(self, sampler, arr):
        cur = self.lib.llama_token_data_array(arr.ctypes.data_as(self.lib.llama_token_data_p), len(arr), -1, False)
        self.lib.llama_sampler_apply(sampler, ctypes.byref(cur))
        return cur

    def _pick(self, logits, *, constrained: bool) -> int | None:
        if not constrained and self.chain is None:
            return int(np.argmax(logits))
        self.cands["id"], self.cands["logit"], self.cands["p"] = self.ids, logits, 0.0
        if constrained:
            self._apply(self.grammar, self.cands)
            if not np.isfinite(self.cands["logit"]).any():
                return None  # the grammar allows nothing (it cannot happen with a schema's grammar)
            if self.chain is None:
                return int(np.argmax(self.cands["logit"]))
        cur = self._apply(self.chain, self.cands)
        return int(cur.data[cur.selected].id)

    def next_token(self, logits) -> int | None:
        """The next token under the grammar, from the model's ``logits`` (``[n_vocab]`` float32)."""
        tid = self._pick(logits, constrained=False)
        self.one["id"], self.one["logit"], self.one["p"] = tid, 1.0, 0.0
        self._apply(self.grammar, self.one)
        self.checked += 1
        if np.isfinite(self.one["logit"][0]):
            return tid
        self.rejected += 1
        return self._pick(logits, constrained=True)

    def accept(self, tid: int) -> None:
        self.lib.llama_sampler_accept(self.grammar, tid)
        if self.chain is not None:
            self.lib.llama_sampler_accept(self.chain, tid)

    def close(self) -> None:
        for s in (self.grammar, self.chain):
            if s:
                self.lib.llama_sampler_free(s)
        self.grammar = self.chain = None


def constrained_tokens(llm, prompt_ids: list[int], grammar, *, temperature: float, top_p: float, seed: int,
                       is_end):
    """Tokens of one grammar-constrained answer after ``prompt_ids`` (a generator; the KV cache of the
    prompt's prefix shared with the previous answer is kept, as llama-cpp-python's own ``generate`` does).
    An end token (``is_end``) is yielded and not fed to the grammar; the caller stops there."""
    sampler = GrammarSampler(llm, grammar, temperature=temperature, top_p=top_p, seed=seed)
    try:
        shared = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], prompt_ids, strict=False):
            if a != b:
                break
            shared += 1
        llm.n_tokens = min(shared, len(prompt_ids) - 1)  # eval() drops the cache past n_tokens
        llm.eval(prompt_ids[llm.n_tokens:])
        while True:
            logits = np.ctypeslib.as_array(sampler.lib.llama_get_logits_ith(llm.ctx, -1), shape=(sampler.n_vocab,))
            tid = sampler.next_token(logits)
            if tid is None:
                return
            yield tid
            if is_end(tid):
                return
            sampler.accept(tid)
            llm.eval([tid])
    finally:
        sampler.close()
