"""Rebuild a Hugging Face tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata.

A GGUF carries the vocabulary, merges (or scores), token types and special token ids,
but no ``tokenizer.json``. We rebuild one with the ``tokenizers`` library so that it
tokenizes exactly as llama.cpp does:

- ``gpt2`` (byte-level BPE): vocabulary + merges as stored; the pre-tokenizer follows
  ``tokenizer.ggml.pre``, llama.cpp's name for the split rules (``smollm`` splits every
  digit on its own, as SmolLM2's original tokenizer does; ``llama-bpe`` and ``qwen2``
  use their own regexes). An unknown ``pre`` is an error, not a silent guess.
- ``llama`` (SentencePiece BPE): merges recovered from the scores (a pair merges with
  the score of the piece it makes), byte fallback, ``▁`` for spaces and a prefix space
  after each special token as llama.cpp adds it; checked against llama.cpp on a trained
  SentencePiece vocabulary (tests/test_gguf_import.py). Gemma's vocabularies, whose scores
  do not follow merge order, are best effort.

Token types (llama.cpp's): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte. Control and unknown tokens become special added tokens, user-defined ones plain
added tokens, so neither is ever cut into pieces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import UserError

CONTROL, UNKNOWN, USER_DEFINED = 3, 2, 4
# The GGUF's own tokenizer.* keys, kept verbatim (value and GGUF type) beside the rebuilt
# tokenizer.json: a tokenizer.json cannot say everything llama.cpp reads (token types and
# scores of special whitespace pieces, add_space_prefix, the pre-type), so the exporter
# writes these keys back as they were instead of deriving them again (common.export.tokenizer).
GGUF_VOCAB_FILE = "gguf_tokenizer.json"

# llama.cpp's split regexes (src/llama-vocab.cpp), applied one after the other.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (kind, regex): "gpt2" = ByteLevel's own GPT-2 regex,
# "digits" = every digit alone, then GPT-2's regex (SmolLM2/StarCoder), "split" = one regex.
PRE_TOKENIZERS: dict[str, tuple[str, str | None]] = {
    "gpt2": ("gpt2", None), "mpt": ("gpt2", None), "olmo": ("gpt2", None), "jais": ("gpt2", None),
    "gpt-2": ("gpt2", None), "phi-2": ("gpt2", None), "stablelm2": ("gpt2", None),
    "smollm": ("digits", None), "starcoder": ("digits", None), "refact": ("digits", None),
    "command-r": ("digits", None), "codeshell": ("digits", None), "exaone": ("digits", None),
    "minerva-7b": ("digits", None),
    "llama-bpe": ("split", _LLAMA3), "llama3": ("split", _LLAMA3), "llama-v3": ("split", _LLAMA3),
    "falcon3": ("split", _LLAMA3), "dbrx": ("split", _LLAMA3), "smaug-bpe": ("split", _LLAMA3),
    "qwen2": ("split", _QWEN2), "deepseek-r1-qwen": ("split", _QWEN2), "megrez": ("split", _QWEN2),
}
# llama3-style vocabularies look a whole word up before merging (llama.cpp's ignore_merges)
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe"}


def _byte_level_pre(pre: str):
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise UserError(f"GGUF tokenizer: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported",
                        [f"supported: {', '.join(sorted(PRE_TOKENIZERS))}",
                         "use the model's original Hugging Face repository instead of its GGUF"])
    kind, regex = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "split")
    if kind == "gpt2":
        return None, byte_level
    if kind == "digits":
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    normalizer = normalizers.NFC() if regex is _QWEN2 else None
    return normalizer, pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])


def _bpe_tokenizer(meta: dict[str, Any]):
    from tokenizers import Tokenizer, decoders, models

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise UserError("GGUF tokenizer: a byte-level BPE vocabulary without tokenizer.ggml.merges")
    merges = []
    for i, m in enumerate(merges_raw):
        parts = m.split(" ")
        if len(parts) != 2:
            raise UserError(f"GGUF tokenizer: merge {i} {m!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    pre = str(meta.get("tokenizer.ggml.pre", "gpt2"))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
    normalizer, pre_tokenizer = _byte_level_pre(pre)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok, f"byte-level BPE (pre-tokenizer {pre})"


def _spm_merges(tokens: list[str], scores: list[float], normal: set[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merges: a pair merges with the score of what it makes."""
    ids = {t: i for i, t in enumerate(tokens) if i in normal}
    found = []
    for i, piece in enumerate(tokens):
        if i not in normal:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-scores[i], ids[left], ids[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _spm_tokenizer(meta: dict[str, Any]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if scores is None or len(scores) != len(tokens):
        raise UserError("GGUF tokenizer: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    normal = {i for i, t in enumerate(types) if t in (1, USER_DEFINED)}
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, normal), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, "SentencePiece BPE (byte fallback)"


def _token(tokens: list[str], meta: dict[str, Any], key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


def build_tokenizer(meta: dict[str, Any]):
    """(transformers fast tokenizer, description) built from GGUF metadata; raises UserError."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError("GGUF tokenizer: the file has no tokenizer.ggml.tokens (no vocabulary)")
    if model == "gpt2":
        tok, kind = _bpe_tokenizer(meta)
    elif model == "llama":
        tok, kind = _spm_tokenizer(meta)
    else:
        raise UserError(f"GGUF tokenizer: tokenizer.ggml.model={model!r} is not supported",
                        ["supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"])
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    default_bos = model == "llama"  # llama.cpp adds BOS to SentencePiece vocabularies unless told not to
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_token(tokens, meta, "bos_token_id"), eos_token=_token(tokens, meta, "eos_token_id"),
        unk_token=_token(tokens, meta, "unknown_token_id"), pad_token=_token(tokens, meta, "padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        fast.chat_template = template
    return fast, kind


def gguf_vocab_record(fields: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every ``tokenizer.*`` key of a GGUF reader's ``fields``: {key: {type, [sub], value}}.
    ``meta`` holds the values already read (reading a 262k-token array again costs seconds)."""
    keys = {}
    for key, field in fields.items():
        if not key.startswith("tokenizer."):
            continue
        entry = {"type": field.types[0].name, "value": meta[key] if meta and key in meta else field.contents()}
        if len(field.types) > 1:
            entry["sub"] = field.types[-1].name
        keys[key] = entry
    return {"format": 1, "keys": keys}


def write_gguf_vocab(fields: dict[str, Any], out_dir: Path, meta: dict[str, Any] | None = None) -> None:
    """Write :data:`GGUF_VOCAB_FILE` into ``out_dir`` (a directory being built, as for write_tokenizer)."""
    import json

    record = gguf_vocab_record(fields, meta)
    (out_dir / GGUF_VOCAB_FILE).write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(meta: dict[str, Any], out_dir: Path, max_length: int | None = None) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``out_dir``.

    ``out_dir`` is a directory being built (common.io.atomic_dir), so plain writes are safe.
    """
    import json

    fast, kind = build_tokenizer(meta)
    if max_length:
        fast.model_max_length = max_length
    fast.save_pretrained(str(out_dir))
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # Said explicitly (transformers omits defaults), so every reader -- mlx-lm, llama.cpp's
    # converter, older transformers -- agrees on BOS/EOS and finds the template.
    config["add_bos_token"] = fast.add_bos_token
    config["add_eos_token"] = fast.add_eos_token
    if fast.chat_template:
        config["chat_template"] = fast.chat_template
        (out_dir / "chat_template.jinja").write_text(fast.chat_template, encoding="utf-8")
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"type": kind, "vocab_size": len(meta["tokenizer.ggml.tokens"]),
            "chat_template": bool(fast.chat_template)}
