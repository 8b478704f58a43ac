"""Benchmark models built from published configs with random weights (no hub), and FLOP counts.

Throughput does not depend on weight values, so the GPU runs use Llama-3.2-1B and
Llama-3.1-8B shapes with a seeded normal(0, 0.02) initialisation (transformers' own).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_act": "silu",
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "bos_token_id": 128000,
           "eos_token_id": 128001, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True}

CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B config.json (shapes and rope), weights random
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    # meta-llama/Llama-3.1-8B config.json
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "tie_word_embeddings": False,
                     "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    # a tiny model of the same family, for testing the scripts on a CPU
    "tiny-llama": {**_LLAMA3, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True,
                   "max_position_embeddings": 4096, "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2},
}

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(name: str, out: Path, *, dtype: str = "bfloat16", seed: int = 0, device: str = "cpu",
          tokenizer_dir: Path | None = None) -> Path:
    """Write a random-weight model of config ``name`` to ``out`` (safetensors); reuse it if already there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    spec = dict(CONFIGS[name])
    spec["torch_dtype"] = dtype
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 8B parameters on the GPU takes a second, on the CPU minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, tmp / f.name)
    del model
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def param_counts(name: str) -> dict[str, int]:
    """Matmul parameters per layer and in total, embeddings and lm_head (from the config alone)."""
    c = CONFIGS[name]
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    head = c["vocab_size"] * h
    total = n * per_layer + head + (0 if c["tie_word_embeddings"] else head) + n * 2 * h + h
    return {"per_layer_matmul": per_layer, "layers": n, "lm_head": head, "total": total, "attn_width": q}


def lora_params(name: str, r: int, targets: Sequence[str] = ALL_LINEAR) -> int:
    c = CONFIGS[name]
    h, i = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}
    return c["num_hidden_layers"] * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


def lora_train_flops(name: str, doc_lengths: Sequence[int], supervised: int, r: int,
                     targets: Sequence[str] = ALL_LINEAR) -> float:
    """FLOPs a LoRA training step needs on these documents (the MFU numerator; recomputation not counted).

    Frozen base matmuls: forward 2 and input-gradient 2 FLOPs per parameter per token (no
    weight gradient); LoRA matrices 6; the lm_head only where a loss is taken; causal
    attention within each document, 2*l^2*width per layer forward, 3x that with backward.
    """
    p = param_counts(name)
    tokens = sum(doc_lengths)
    dense = 4 * p["per_layer_matmul"] * p["layers"] * tokens
    lora = 6 * lora_params(name, r, targets) * tokens
    head = 4 * p["lm_head"] * supervised
    attn = 6 * p["attn_width"] * p["layers"] * sum(length * length for length in doc_lengths)
    return float(dense + lora + head + attn)


def matmul_ceiling(n: int = 8192, reps: int = 20) -> dict[str, float]:
    """bf16 matmul TFLOP/s on random data (median of ``reps`` after warmup): the MFU denominator."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    med = times[len(times) // 2]
    del a, b
    torch.cuda.empty_cache()
    return {"n": n, "median_s": med, "tflops": 2 * n**3 / med / 1e12}


def write_config_json(name: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIGS[name], indent=2))
