"""Tiny real models and tokenizers, built in the tests (no hub, no downloads).

A byte-level BPE tokenizer (GPT-2 pre-tokenizer, so llama.cpp knows it as 'gpt2')
trained on a small corpus, with ChatML special tokens and SmolLM2's style of chat
template; and causal LMs of a few architectures with 2 layers and hidden size 64.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "set a timer for ten minutes", "what's the weather in Paris tomorrow", "play some jazz",
    '{"intent": "set_timer", "slots": {"duration": "10 minutes"}}',
    '{"intent": "get_weather", "slots": {"location": "Paris", "date": "tomorrow"}}',
    '{"intent": "unknown", "slots": {}}', "You are an intent classifier. Answer with JSON only.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>/\\|@#$%^&*-_+=~`",
    "user assistant system hello world thanks please remind me to call mom at 5pm",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """Train and save a tiny byte-level BPE tokenizer; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


# The tiny model of each row of common.archs.ARCHS: the config keys it needs besides the
# row's architectures/model_type and make_config's sizes (tests/test_archs.py: one per row).
ARCH_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "gemma3": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "phi3": {},
}


def make_config(arch: str, tokenizer, *, tie: bool = True, hidden: int = 64, layers: int = 2):
    """The transformers config of a tiny ``arch`` model over ``tokenizer`` (AutoConfig: imports torch)."""
    from transformers import AutoConfig

    from common.archs import ARCHS

    row = ARCHS[arch]
    return AutoConfig.for_model(
        row.model_type, architectures=[row.hf_archs[0]], vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-6, **ARCH_CONFIGS[arch])


def make_model(out_dir: str | Path, arch: str = "llama", *, seed: int = 0, tie: bool = True,
               tokenizer_dir: str | Path | None = None, hidden: int = 64, layers: int = 2):
    """Build a tiny random causal LM of ``arch`` with the tiny tokenizer and save it (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = make_tokenizer(out_dir) if tokenizer_dir is None else None
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.save_pretrained(out_dir)
    cfg = make_config(arch, tokenizer, tie=tie, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # break the symmetry of default inits so outputs are not trivial
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.uniform_(0.9, 1.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}))
    return out_dir


def write_chat_jsonl(path: str | Path, rows: list[tuple[str, str]]) -> Path:
    """Write (user, assistant) pairs as chat `messages` JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for user, answer in rows:
            fh.write(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": answer}]}) + "\n")
    return path
