"""The MLX backend's inference engine (common.backends): mlx-lm models, with a run's PEFT
adapter loaded as MLX LoRA layers (not merged)."""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import UserError
from common.generation import Generator, Stream, Target, missing_extra
from common.prompts import ChatFormatter
from common.rows import Example


class MLXGenerator(Generator):
    backend = "mlx"

    def __init__(self, target: Target, formatter: ChatFormatter, model, tokenizer):
        super().__init__(target, formatter)
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, target: Target, *, system_prompt: str | None, chat_template: str | None,
             device: str | None = None, dtype: str = "auto") -> MLXGenerator:
        """``device``/``dtype`` place torch engines; MLX generates on its default device, in the weights' dtype."""
        try:
            import mlx.core  # noqa: F401

            from mlx_ft.model import load_base
        except ImportError as exc:
            raise missing_extra("mlx", exc) from None
        from common.models import load_tokenizer

        tokenizer = load_tokenizer(target.model_dir)
        formatter = ChatFormatter(tokenizer, template=chat_template, system_prompt=system_prompt)
        model, _ = load_base(target.model_dir)
        if target.adapter_dir is not None:
            try:
                from mlx_ft.peft_format import load_peft
            except ImportError as exc:
                raise UserError(f"{target.adapter_dir}: loading a PEFT adapter into MLX needs mlx_ft.peft_format "
                                f"({exc}); use --backend torch") from None
            load_peft(model, target.adapter_dir)
        model.eval()
        return cls(target, formatter, model, tokenizer)

    def _generate(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int, stream: Stream) -> str:
        import mlx.core as mx
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        mx.random.seed(seed)
        wrapper = TokenizerWrapper(self.tokenizer, eos_token_ids=self.stop_ids)
        # top_p 1.0 keeps every token; mlx-lm spells "off" as 0.
        sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
        from mlx_ft.structured import processors

        pieces = []
        for response in stream_generate(self.model, wrapper, prompt_ids, max_tokens=max_new_tokens, sampler=sampler,
                                        logits_processors=processors(self.constraint)):
            if response.text:
                pieces.append(response.text)
                if stream is not None:
                    stream(response.text)
            last = response
        self.new_tokens += last.generation_tokens
        return "".join(pieces)

    def score_continuations(self, context: list[int], continuations: Sequence[list[int]],
                            end_ids: Sequence[int] | None = None) -> list[float]:
        from mlx_ft.structured import score_continuations

        return score_continuations(self.model, context, continuations, end_ids)

    def loss(self, examples: Sequence[Example], batch_size: int = 8) -> tuple[float, int] | None:
        import mlx.core as mx
        import mlx.nn as nn

        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            width = max(len(e) for e in chunk)
            # Right padding needs no attention mask under a causal mask: pads only follow real tokens.
            ids = mx.array([e.input_ids + [0] * (width - len(e)) for e in chunk])
            mask = mx.array([e.loss_mask + [0] * (width - len(e)) for e in chunk])
            logits = self.model(ids[:, :-1]).astype(mx.float32)
            losses = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none") * mask[:, 1:]
            total += float(losses.sum())
            count += int(mask[:, 1:].sum())
        return total, count

    def describe(self) -> dict:
        import mlx.core as mx

        out = super().describe()
        out.update(device=str(mx.default_device()))
        return out
