"""Write a tiny Hugging Face model as a GGUF, as llama.cpp's converter would (for import tests).

Llama architecture: Q/K rows permuted for llama.cpp's rope layout, the tiny byte-level BPE
tokenizer as tokenizer.ggml.* metadata (model "gpt2", pre "gpt-2", merges, token types),
the chat template. Tensors are F32 unless ``quant`` names a gguf quantization type.
"""

from __future__ import annotations

import json
from pathlib import Path


def permute(w, n_head: int):
    """convert_hf_to_gguf's LlamaModel.permute: HF rotate-half rows -> llama.cpp's pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_metadata(model_dir: Path) -> dict:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {}
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
        if added["special"]:
            special[added["id"]] = added["content"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    types = [3 if i in special else 1 for i in range(len(tokens))]
    return {"tokens": tokens, "merges": merges, "types": types}


def write_tiny_gguf(model_dir: Path, out: Path, quant: str | None = None, pre: str = "gpt-2") -> Path:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    meta = tokenizer_metadata(model_dir)
    ids = {t: i for i, t in enumerate(meta["tokens"])}
    n_layers, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(n_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(meta["tokens"])
    w.add_token_merges(meta["merges"])
    w.add_token_types(meta["types"])
    w.add_bos_token_id(ids[tcfg["bos_token"]])
    w.add_eos_token_id(ids[tcfg["eos_token"]])
    w.add_pad_token_id(ids[tcfg["pad_token"]])
    w.add_unk_token_id(ids[tcfg["unk_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template((model_dir / "chat_template.jinja").read_text())

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    qtype = getattr(gguf.GGMLQuantizationType, quant.upper()) if quant else None
    for name, arr in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        arr = arr.astype(np.float32)
        if ".q_proj." in name:
            arr = permute(arr, n_head)
        elif ".k_proj." in name:
            arr = permute(arr, n_kv)
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname, name
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
