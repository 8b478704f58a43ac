"""The llama.cpp engine (llama-cpp-python) for ``.gguf`` files.

Prompts are rendered with the Hugging Face tokenizer's chat template when one is known
(a GGUF exported into a run, ``--tokenizer DIR``, or tokenizer files beside the GGUF),
else with the template embedded in the GGUF (``tokenizer.chat_template``), both through
the sandbox in :mod:`common.prompts`. Tokens always come from llama.cpp itself, with
special tokens parsed and BOS added only when the text does not already start with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from common.errors import UserError
from common.generation import Generator, Stream, StreamDecoder, Target, missing_extra
from common.prompts import ChatFormatter
from common.rows import Example


class GGUFTokenizer:
    """The slice of a Hugging Face tokenizer's interface that ChatFormatter uses, over llama.cpp's vocab."""

    def __init__(self, llm, chat_template: str | None):
        self.llm = llm
        self.chat_template = chat_template
        model = llm._model  # llama-cpp-python's own vocab accessors (no public API for token text)

        def text(tid: int) -> str | None:
            return model.token_get_text(tid) if 0 <= tid < llm.n_vocab() else None

        meta = llm.metadata
        self.bos_token = text(llm.token_bos())
        self.eos_token = text(llm.token_eos())
        self.unk_token_id = int(meta["tokenizer.ggml.unknown_token_id"]) if "tokenizer.ggml.unknown_token_id" in meta else None
        self.unk_token = text(self.unk_token_id) if self.unk_token_id is not None else None
        pad = int(meta.get("tokenizer.ggml.padding_token_id", -1))
        self.pad_token = text(pad)
        self.add_bos_token = bool(model.add_bos_token()) and self.bos_token is not None
        self._text = text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True) if text else []

    def convert_tokens_to_ids(self, token: str) -> int | None:
        ids = self.llm.tokenize(token.encode("utf-8"), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 and self._text(ids[0]) == token else self.unk_token_id

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._text(int(i)) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", errors="replace")


class LlamaGenerator(Generator):
    backend = "llama.cpp"

    def __init__(self, target: Target, formatter: ChatFormatter, llm, tokenizer: GGUFTokenizer, n_ctx: int,
                 template_source: str):
        super().__init__(target, formatter)
        self.llm, self.tokenizer, self.n_ctx = llm, tokenizer, n_ctx
        self.template_source = template_source
        self._loss_llm = None  # a second context with logits for every position, made on first use
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._is_eog = lambda tid: bool(llama_cpp.llama_vocab_is_eog(vocab, tid))

    @classmethod
    def load(cls, target: Target, *, system_prompt: str | None, chat_template: str | None,
             n_ctx: int = 4096) -> LlamaGenerator:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise missing_extra("llama", exc) from None
        try:
            llm = Llama(model_path=str(target.gguf_file), n_ctx=n_ctx, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"{target.gguf_file}: llama.cpp cannot load this GGUF: {exc}") from None
        source = "gguf"
        template = llm.metadata.get("tokenizer.chat_template")
        if target.tokenizer_dir is not None:
            from common.models import load_tokenizer
            from common.prompts import resolve_template

            hf_template = getattr(load_tokenizer(target.tokenizer_dir), "chat_template", None)
            if hf_template:
                template = resolve_template(load_tokenizer(target.tokenizer_dir))
                source = f"tokenizer:{target.tokenizer_dir}"
        tokenizer = GGUFTokenizer(llm, template)
        if chat_template:
            source = chat_template
        elif not template:
            raise UserError(f"{target.gguf_file}: the GGUF has no chat template (tokenizer.chat_template); pass "
                            "--chat-template chatml|llama3|alpaca or --tokenizer DIR")
        formatter = ChatFormatter(tokenizer, template=chat_template, system_prompt=system_prompt)
        return cls(target, formatter, llm, tokenizer, n_ctx, source)

    @property
    def stop_ids(self) -> list[int]:
        ids = list(self.formatter.eot_ids)
        for tid in (self.llm.token_eos(), self.llm._model.token_eot()):
            if tid >= 0 and tid not in ids:
                ids.append(tid)
        return ids

    def _generate(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int, stream: Stream) -> str:
        if len(prompt_ids) + 1 > self.n_ctx:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens, more than the context of {self.n_ctx} "
                            "(raise --n-ctx or shorten the conversation with /reset)")
        budget = min(max_new_tokens, self.n_ctx - len(prompt_ids))
        stops = set(self.stop_ids)
        decoder = StreamDecoder(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), stream)
        self.llm.set_seed(seed)
        # temp 0 is llama.cpp's greedy sampler; otherwise temperature + top-p only (no top-k/min-p),
        # the same recipe as the torch engine.
        # Under --format the grammar is checked one sampled token at a time (common.structured.llama_cpp),
        # as llama.cpp's and Ollama's samplers do, not applied to the whole vocabulary every token.
        if self.constraint is not None:
            from common.structured.llama_cpp import constrained_tokens

            tokens = constrained_tokens(self.llm, prompt_ids, self.constraint, temperature=temperature, top_p=top_p,
                                        seed=seed, is_end=lambda t: t in stops or self._is_eog(t))
        else:
            tokens = self.llm.generate(prompt_ids, temp=temperature, top_p=top_p, top_k=0, min_p=0.0,
                                       repeat_penalty=1.0, reset=True)
        try:
            for n, tid in enumerate(tokens, start=1):
                self.new_tokens += 1
                if tid in stops or self._is_eog(tid):
                    break
                decoder.push(tid)
                if n >= budget:
                    break
        finally:
            tokens.close()
        return decoder.text()

    def score_continuations(self, context: list[int], continuations: Sequence[list[int]],
                            end_ids: Sequence[int] | None = None) -> list[float]:
        from common.structured.llama_cpp import score_continuations

        return score_continuations(self, context, continuations, end_ids)

    def loss(self, examples: Sequence[Example]) -> tuple[float, int] | None:
        import numpy as np
        from llama_cpp import Llama

        if not examples:
            return 0.0, 0
        need = max(len(e) for e in examples)
        if self._loss_llm is None or self._loss_llm.n_ctx() < need:
            ctx = max(256, math.ceil(need / 256) * 256)
            # logits_all keeps one row of logits per position: ctx * n_vocab * 4 bytes.
            self._loss_llm = Llama(model_path=str(self.target.gguf_file), n_ctx=ctx,
                                   logits_all=True, verbose=False)
        llm = self._loss_llm
        total, count = 0.0, 0
        for ex in examples:
            llm.reset()
            llm.eval(ex.input_ids)
            logits = np.asarray(llm.scores[: len(ex) - 1], dtype=np.float64)
            pos = [t for t in range(len(ex) - 1) if ex.loss_mask[t + 1]]
            if not pos:
                continue
            rows = logits[pos]
            top = rows.max(axis=1, keepdims=True)
            lse = (top[:, 0] + np.log(np.exp(rows - top).sum(axis=1)))
            picked = rows[np.arange(len(pos)), [ex.input_ids[t + 1] for t in pos]]
            total += float((lse - picked).sum())
            count += len(pos)
        return total, count

    def describe(self) -> dict:
        out = super().describe()
        out.update(chat_template=self.template_source, n_ctx=self.n_ctx)
        return out

    def close(self) -> None:
        for llm in (self.llm, self._loss_llm):
            if llm is not None:
                llm.close()
        self._loss_llm = None
