"""The torch backend's inference engine (common.backends), transformers + peft: a base model
with a run's adapter applied (not merged), a base model alone, or a merged directory.
Batched generation pads on the left."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence

from common.errors import UserError
from common.generation import Generator, Messages, Stream, Target, _check_sampling, missing_extra
from common.prompts import ChatFormatter
from common.rows import Example


def pick_device(device: str | None):
    import torch

    from torch_ft.device import best_device

    return torch.device(device or best_device())


def pick_dtype(dtype: str, device):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32  # CPU: half precision is slow and lossy there


class TorchGenerator(Generator):
    backend = "torch"

    def __init__(self, target: Target, formatter: ChatFormatter, model, tokenizer, device, dtype):
        super().__init__(target, formatter)
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (formatter.eos_id if formatter.eos_id is not None else 0)

    @classmethod
    def load(cls, target: Target, *, system_prompt: str | None, chat_template: str | None,
             device: str | None = None, dtype: str = "auto") -> TorchGenerator:
        try:
            import torch  # noqa: F401  (the torch extra is needed: fail early with a clear message)
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise missing_extra("torch", exc) from None
        from transformers.utils import logging as hf_logging

        from common.models import load_tokenizer

        hf_logging.disable_progress_bar()  # our own output stays readable; loading a model takes seconds
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        tokenizer = load_tokenizer(target.model_dir)
        formatter = ChatFormatter(tokenizer, template=chat_template, system_prompt=system_prompt)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(target.model_dir), dtype=dt, use_safetensors=True,
                                                         trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{target.model_dir}: cannot load the model: {exc}") from None
        if target.adapter_dir is not None:
            try:
                from peft import PeftModel
            except ImportError as exc:
                raise missing_extra("torch", exc) from None
            if not (target.adapter_dir / "adapter_model.safetensors").exists():
                raise UserError(f"{target.adapter_dir}: adapter_model.safetensors missing (only safetensors are read)")
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, str(target.adapter_dir), is_trainable=False)
        model.to(dev).eval()
        for p in model.parameters():  # inference only; no process-wide grad switch (it broke training in-process)
            p.requires_grad_(False)
        return cls(target, formatter, model, tokenizer, dev, dt)

    # -- generation ------------------------------------------------------------

    def _gen_config(self, max_new_tokens: int, temperature: float, top_p: float):
        from transformers import GenerationConfig

        sample = temperature > 0
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                temperature=temperature if sample else None, top_p=top_p if sample else None,
                                top_k=None, eos_token_id=self.stop_ids or None, pad_token_id=self.pad_id)

    def _constrain(self, rows: int):
        from torch_ft.structured import processors

        return processors(self.constraint, rows)

    def score_continuations(self, context: list[int], continuations: Sequence[list[int]],
                            end_ids: Sequence[int] | None = None) -> list[float]:
        from torch_ft.structured import score_continuations

        return score_continuations(self.model, self.device, context, continuations, self.pad_id, end_ids)

    def _cut(self, new_ids: list[int]) -> list[int]:
        stops = set(self.stop_ids)
        for i, t in enumerate(new_ids):
            if t in stops:
                return new_ids[:i]
        return new_ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_batch(self, batch: Sequence[Messages], *, max_new_tokens: int = 256, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int = 0) -> list[str]:
        import torch

        _check_sampling(max_new_tokens, temperature, top_p)
        if not batch:
            return []
        prompts = [self.chat_prompt(m) for m in batch]
        width = max(len(p) for p in prompts)
        # Left padding: every row's last prompt token sits at the same position.
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=ids, attention_mask=mask, logits_processor=self._constrain(len(batch)),
                                  generation_config=self._gen_config(max_new_tokens, temperature, top_p))
        answers = []
        for row in out[:, width:].tolist():
            new = self._cut(row)
            self.new_tokens += len(new) + (len(new) < len(row))  # the stop token was generated too
            answers.append(self._decode(new))
        return answers

    def _generate(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int, stream: Stream) -> str:
        import torch

        ids = torch.tensor([prompt_ids], device=self.device)
        cfg = self._gen_config(max_new_tokens, temperature, top_p)
        torch.manual_seed(seed)
        if stream is None:
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                      logits_processor=self._constrain(1))
            row = out[0, len(prompt_ids):].tolist()
            new = self._cut(row)
            self.new_tokens += len(row)
            return self._decode(new)
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def work():
            try:
                result["out"] = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                    generation_config=cfg, streamer=streamer,
                                                    logits_processor=self._constrain(1))
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            if piece:
                pieces.append(piece)
                stream(piece)
        thread.join()
        if "error" in result:
            raise result["error"]
        row = result["out"][0, len(prompt_ids):].tolist()
        self.new_tokens += len(row)
        return self._decode(self._cut(row))

    # -- reference outputs (export verification) ---------------------------------

    def logits(self, ids: list[int]):
        """fp32 logits at every position of ``ids`` (numpy, [len(ids), vocab])."""
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu().numpy()

    def greedy_ids(self, ids: list[int], stop_ids: set[int], max_tokens: int) -> tuple[list[int], bool]:
        """Greedy continuation of ``ids`` as token ids (without the stop token), and whether a stop id ended it."""
        import torch

        with torch.no_grad():
            prompt = torch.tensor([ids], device=self.device)
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens,
                                      do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=min(stop_ids))
        new = out[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in stop_ids
        return (new[:-1] if stopped else new), stopped

    # -- loss ------------------------------------------------------------------

    def loss(self, examples: Sequence[Example], batch_size: int = 8) -> tuple[float, int] | None:
        import torch
        import torch.nn.functional as F

        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                width = max(len(e) for e in chunk)
                ids = torch.tensor([e.input_ids + [self.pad_id] * (width - len(e)) for e in chunk],
                                   device=self.device)
                attn = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk], device=self.device)
                target_mask = torch.tensor([e.loss_mask + [0] * (width - len(e)) for e in chunk], device=self.device)
                logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
                keep = target_mask[:, 1:].bool()
                total += float(F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum"))
                count += int(keep.sum())
        return total, count

    def describe(self) -> dict:
        out = super().describe()
        out.update(device=str(self.device), dtype=str(self.dtype).removeprefix("torch."))
        return out
