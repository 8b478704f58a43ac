"""Unsloth as a baseline side: ``FastLanguageModel`` LoRA (or QLoRA) fed exactly our data order.

The model is Unsloth's own: ``FastLanguageModel.from_pretrained`` on the benchmark's
random-weight model (its patched Llama, its fused LoRA MLP/QKV/O kernels, its chunked
cross-entropy, its default embedding offload), then ``FastLanguageModel.get_peft_model``
with our LoRA (rank, alpha, all 7 projections, no dropout, seed) and
``use_gradient_checkpointing`` False (GC off) or ``"unsloth"`` (its offloaded checkpointing:
each layer's input kept in CPU memory and the layer recomputed in backward). Training goes
through the Hugging Face ``Trainer`` that Unsloth patches on import, as its SFTTrainer
does, one padding-free row per optimizer step (``DataCollatorWithFlattening``: position_ids
restart per example, from which Unsloth derives the packed lengths and a block-diagonal
mask), the examples of each of our optimizer steps, constant lr, clipping 1.0, fused AdamW
(bench.baselines.hf_trainer's loop, so B1's protocol).

Unsloth must be imported before transformers and peft, and refuses to import without a
GPU: :func:`run` imports it first thing, inside the side's own process (bench.sides).
The device carries it in ``.unsloth`` (bench/carry.sh), installed apart from the other
wheels (bench/device.sh puts it on this process's path only).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from bench.common import Side
from common.rows import Example

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_dir_with_tokenizer(model_dir: Path, out: Path) -> Path:
    """``out``: links to ``model_dir``'s files plus a tiny word-level tokenizer (Unsloth's loader loads one;
    the benchmark feeds token ids, so its vocabulary never matters)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if all((out / f).exists() for f in TOKENIZER_FILES):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        if f.is_file():
            (out / f.name).symlink_to(f.resolve())
    specials = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(ord("a"), ord("z") + 1)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<pad>", model_max_length=131072)
    fast.save_pretrained(out)
    return out


def run(model_dir, examples: Sequence[Example], plan: list[list[int]], *, lora: dict, lr: float,
        max_grad_norm: float, seed: int, load_in_4bit: bool, offload_gc: bool, max_seq_length: int,
        pad_id: int, label: str) -> Side:
    """Load with Unsloth, add its LoRA, train ``len(plan)`` steps; peak memory counted from before the load."""
    import torch
    import unsloth  # noqa: F401  (first: it patches transformers, peft and the Trainer)
    from unsloth import FastLanguageModel

    from bench.baselines import hf_trainer

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    src = model_dir_with_tokenizer(Path(model_dir), Path(str(model_dir).rstrip("/") + "-unsloth"))
    gc = "unsloth" if offload_gc else False
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(src), max_seq_length=max_seq_length, dtype=torch.bfloat16, load_in_4bit=load_in_4bit,
        full_finetuning=False, use_gradient_checkpointing=gc, fix_tokenizer=False, use_exact_model_name=True,
        random_state=seed)
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], target_modules=list(lora["targets"]), lora_alpha=lora["alpha"],
        lora_dropout=lora.get("dropout", 0.0), bias="none", use_gradient_checkpointing=gc, random_state=seed)
    side = hf_trainer.run(model_dir, examples, plan, variant="B1", lora=lora, lr=lr, max_grad_norm=max_grad_norm,
                          seed=seed, device="cuda", dtype="bfloat16", grad_checkpoint=False, pad_id=pad_id,
                          load_in_4bit=load_in_4bit, liger=False, label=label, model=model)
    side.settings.update({"library": "unsloth", "use_gradient_checkpointing": gc, "attention": _attention(),
                          "versions": {d: _version(d) for d in ("unsloth", "unsloth_zoo", "trl", "xformers",
                                                                "flash-attn", "torch", "transformers", "peft")},
                          "unsloth_env": {k: v for k, v in os.environ.items() if k.startswith("UNSLOTH_")}})
    return side


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _attention() -> str:
    """What Unsloth's attention can dispatch to here (flash-attn and xformers are not carried: SDPA)."""
    try:
        from unsloth.models import _utils as u

        return ", ".join(f"{k}={getattr(u, k)}" for k in ("HAS_FLASH_ATTENTION", "HAS_XFORMERS", "SUPPORTS_BFLOAT16")
                         if hasattr(u, k))
    except Exception as e:  # only a note in the result
        return f"unknown ({type(e).__name__})"
