"""The tokenizer as llama.cpp reads it from a GGUF: vocabulary, merges, pre-tokenizer,
special tokens, BOS/EOS behaviour and the chat template.

Three kinds, chosen as llama.cpp's converter chooses them:

- ``tokenizer.model`` (SentencePiece; Llama 2, Mistral, Gemma, Phi-3) -> ``llama`` model;
- ``tokenizer.json`` BPE with byte fallback (SentencePiece converted to HF) -> ``llama``
  via ``gguf.LlamaHfVocab``;
- ``tokenizer.json`` byte-level BPE (GPT-2 style; Llama 3, Qwen, SmolLM) -> ``gpt2`` model
  plus ``tokenizer.ggml.pre``: llama.cpp re-implements each family's pre-tokenizer regex
  and names it; we identify it the way llama.cpp does, by hashing the token ids of a
  fixed probe text. An unknown hash is an error, never a guess: a wrong pre-tokenizer
  silently changes token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import gguf

from common.errors import UserError

# llama.cpp's probe text (convert_hf_to_gguf.py, get_vocab_base_pre), character for character.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)

# sha256(str(token ids of CHKTXT)) -> llama.cpp pre-tokenizer name, for the families we export.
PRE_BY_HASH: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}
# Pre-tokenizer names llama.cpp accepts (for the expert override).
KNOWN_PRE = ("default", "gpt-2", "llama-bpe", "qwen2", "smollm", "tekken", "falcon", "starcoder", "refact",
             "command-r", "olmo", "dbrx", "stablelm2", "phi-2", "bloom", "mpt", "deepseek-llm", "deepseek-coder",
             "chatglm-bpe", "exaone", "jais", "viking", "poro-chat", "codeshell", "gpt3-finnish", "chameleon",
             "smaug-bpe")


@dataclass
class GGUFVocab:
    """Everything the GGUF's ``tokenizer.*`` keys carry."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot, ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    # False when llama.cpp cannot reproduce the HF tokenizer on every raw text (SentencePiece
    # with Metaspace prepend_scheme "first": HF adds "▁" at the start of the text only, llama.cpp
    # after every special token or nowhere). Whole chat prompts are then matched by choosing
    # add_space_prefix from how the prompts start; verification judges prompts, notes raw texts.
    raw_text_exact: bool = True
    # The tokenizer.* keys of an imported GGUF ({key: {type, [sub], value}}), written back
    # verbatim; only add_bos/add_eos (training's), the chat template and a missing EOT are ours.
    raw: dict[str, dict] | None = None

    def add_to(self, w: gguf.GGUFWriter) -> None:
        if self.raw is not None:
            self._add_raw(w)
            return
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


    def _add_raw(self, w: gguf.GGUFWriter) -> None:
        ours = {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.chat_template"}
        for key, entry in self.raw.items():
            if key not in ours:
                sub = gguf.GGUFValueType[entry["sub"]] if "sub" in entry else None
                w.add_key_value(key, entry["value"], gguf.GGUFValueType[entry["type"]], sub_type=sub)
        if "eot" in self.special:
            w.add_eot_token_id(self.special["eot"])
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def imported_vocab(model_dir: Path, n_vocab: int, *, chat_template: str | None, eot_token: str | None,
                   tokenizer) -> GGUFVocab | None:
    """The vocabulary of a model imported from a GGUF, exactly as that GGUF stored it (None when
    ``model_dir`` was not imported from one). Only padding rows past the vocabulary are added."""
    from common.models.gguf_tokenizer import GGUF_VOCAB_FILE

    path = model_dir / GGUF_VOCAB_FILE
    if not path.is_file():
        return None
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))["keys"]
        tokens = list(keys["tokenizer.ggml.tokens"]["value"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc}); import the GGUF again") from None
    if len(tokens) > n_vocab:
        raise UserError(f"{path}: {len(tokens)} tokens but the embedding has only {n_vocab} rows")
    keys = {k: dict(v) for k, v in keys.items()}
    pad = range(len(tokens), n_vocab)  # embedding rows past the vocabulary, as llama.cpp pads them
    for key, fill in (("tokenizer.ggml.tokens", None), ("tokenizer.ggml.scores", -1000.0),
                      ("tokenizer.ggml.token_type", int(gguf.TokenType.UNUSED))):
        if key in keys:
            keys[key]["value"] = list(keys[key]["value"]) + [f"[PAD{i}]" if fill is None else fill for i in pad]

    def value(key: str, default=None):
        return keys.get(f"tokenizer.ggml.{key}", {}).get("value", default)

    model = str(value("model", "llama"))
    special = {}
    if eot_token and value("eot_token_id") is None:
        tid = tokenizer.convert_tokens_to_ids(eot_token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            special["eot"] = tid
    return GGUFVocab(model=model, pre=str(value("pre", "default")), tokens=value("tokens"),
                     types=[int(t) for t in value("token_type", [])], scores=value("scores"),
                     merges=list(value("merges", [])), special=special,
                     add_bos=bool(value("add_bos_token", model == "llama")), add_eos=bool(value("add_eos_token", False)),
                     add_space_prefix=value("add_space_prefix"), chat_template=chat_template, raw=keys)


def pre_tokenizer_hash(tokenizer) -> str:
    """llama.cpp's fingerprint of a BPE pre-tokenizer: sha256 of the probe's token ids (as it encodes them)."""
    return sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def identify_pre(tokenizer, source: str, override: str | None = None) -> str:
    """The llama.cpp pre-tokenizer name for ``tokenizer``; unknown hashes are a UserError."""
    if override:
        if override not in KNOWN_PRE:
            raise UserError(f"--pre {override!r}: not a llama.cpp pre-tokenizer name (one of: {', '.join(KNOWN_PRE)})")
        return override
    chkhsh = pre_tokenizer_hash(tokenizer)
    if chkhsh not in PRE_BY_HASH:
        raise UserError(
            f"{source}: this byte-level BPE tokenizer's pre-tokenizer is not one llama.cpp is known to implement "
            f"(probe hash {chkhsh}). Exporting with a guessed pre-tokenizer would silently change token ids.",
            [f"known: {', '.join(sorted(set(PRE_BY_HASH.values())))}",
             "if you know which llama.cpp pre-tokenizer matches (e.g. a retrained GPT-2-style tokenizer -> gpt-2), "
             "pass it with the expert flag --pre NAME; verification then compares token ids"])
    return PRE_BY_HASH[chkhsh]


def looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (llama.cpp's heuristic)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _bos_eos_behaviour(tokenizer) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds BOS / EOS by itself (measured, not read from flags)."""
    with_special = list(tokenizer.encode("a b", add_special_tokens=True))
    plain = list(tokenizer.encode("a b", add_special_tokens=False))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(with_special) > len(plain) and bos is not None and with_special[0] == bos
    add_eos = len(with_special) > len(plain) and eos is not None and with_special[-1] == eos
    return add_bos, add_eos


def _bpe_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if (i in decoder and decoder[i].special) or looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")  # pre-normalise user-defined spaces, as llama.cpp does
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def _spm_vocab(model_dir: Path, tokenizer, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    if sp.vocab_size() > n_vocab:
        raise UserError(f"{model_dir / 'tokenizer.model'}: {sp.vocab_size()} pieces but only {n_vocab} embedding rows")
    size = n_vocab  # rows past the tokenizer's pieces become [PADi] (unused), as llama.cpp pads
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores, types = [-10000.0] * size, [int(gguf.TokenType.UNUSED)] * size
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), int(kind)
    # Added tokens as the HF tokenizer sees them (added_tokens.json, tokenizer_config.json and
    # tokenizer.json all feed it); SentencePiece's own user-defined pieces are among them.
    added = {int(tid): {"content": tok.content, "special": tok.special}
             for tid, tok in tokenizer.added_tokens_decoder.items()}
    keep = (int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.BYTE))
    for tid, data in added.items():
        if tid >= size or (tid < sp.vocab_size() and types[tid] in keep):
            continue  # SentencePiece's own <unk>/<s>/</s>/byte pieces keep their types
        text = data["content"]
        if data.get("special") or looks_special(text):
            types[tid] = int(gguf.TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[tid] = int(gguf.TokenType.USER_DEFINED)
        tokens[tid], scores[tid] = text.encode("utf-8"), -1000.0
    return tokens, scores, types


def _tokenizer_kind(model_dir: Path) -> str:
    if (model_dir / "tokenizer.model").is_file():
        return "spm"
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json or tokenizer.model to put in the GGUF")
    model = json.loads(tj.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama-hf"
    if model.get("type") == "BPE":
        return "bpe"
    raise UserError(f"{tj}: tokenizer model {model.get('type')!r} without a tokenizer.model cannot be exported "
                    "(supported: byte-level BPE, SentencePiece)")


def metaspace_scheme(model_dir: Path) -> str | None:
    """SentencePiece-style prefix rule of a tokenizer.json: "always", "first", "never" or None."""
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        return None
    data = json.loads(tj.read_text(encoding="utf-8"))
    for part in (data.get("normalizer"), data.get("pre_tokenizer")):
        items = (part or {}).get("normalizers") or (part or {}).get("pretokenizers") or [part or {}]
        for item in items:
            if item.get("type") == "Metaspace":
                return str(item.get("prepend_scheme", "always"))
            if item.get("type") == "Prepend" and item.get("prepend") == "\u2581":
                return "always"  # legacy Llama normalizer: a "▁" before every text
    return None


def build_vocab(model_dir: str | Path, n_vocab: int, *, chat_template: str | None = None,
                eot_token: str | None = None, pre_override: str | None = None,
                add_space_prefix: bool | None = None, prompts_start_special: bool | None = None,
                tokenizer=None) -> GGUFVocab:
    """The GGUF tokenizer of the HF model at ``model_dir`` with ``n_vocab`` rows of embeddings.

    ``chat_template`` is embedded as ``tokenizer.chat_template``; ``eot_token`` (the
    template's end-of-turn token, e.g. ``<|im_end|>``) is recorded as the EOT id.
    ``tokenizer``: the model's transformers tokenizer when the caller has loaded it already.
    """
    from common.models import load_tokenizer

    model_dir = Path(model_dir)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir)
    imported = imported_vocab(model_dir, n_vocab, chat_template=chat_template, eot_token=eot_token, tokenizer=tokenizer)
    if imported is not None:
        return imported
    kind = _tokenizer_kind(model_dir)
    if max(tokenizer.get_vocab().values()) >= n_vocab:
        raise UserError(f"{model_dir}: tokenizer has ids up to {max(tokenizer.get_vocab().values())} but the "
                        f"embedding has only {n_vocab} rows")
    scores, merges = None, []
    if kind == "bpe":
        tokens, types = _bpe_vocab(tokenizer, n_vocab)
        model, pre = "gpt2", identify_pre(tokenizer, str(model_dir / "tokenizer.json"), pre_override)
    elif kind == "spm":
        tokens, scores, types = _spm_vocab(model_dir, tokenizer, n_vocab)
        model, pre = "llama", "default"
    else:
        hf = gguf.LlamaHfVocab(model_dir)
        triples = list(hf.all_tokens())
        tokens = [t for t, _, _ in triples] + [f"[PAD{i}]".encode() for i in range(len(triples), n_vocab)]
        scores = [s for _, s, _ in triples] + [-1000.0] * (n_vocab - len(triples))
        types = [int(k) for _, _, k in triples] + [int(gguf.TokenType.UNUSED)] * (n_vocab - len(triples))
        model, pre = "llama", "default"
    raw_text_exact = True
    if kind != "bpe" and add_space_prefix is None:
        scheme = metaspace_scheme(model_dir)
        if scheme in ("always", "never"):
            add_space_prefix = scheme == "always"
        elif scheme == "first":
            add_space_prefix = not prompts_start_special
            raw_text_exact = False
    special_vocab = gguf.SpecialVocab(model_dir, load_merges=kind == "bpe", n_vocab=len(tokens))
    if kind == "bpe":
        merges = list(special_vocab.merges)
        if not merges:
            raise UserError(f"{model_dir / 'tokenizer.json'}: byte-level BPE without merges")
    special = dict(special_vocab.special_token_ids)
    # The tokenizer object is the truth for bos/eos (tokenizer_config may name them by text only).
    for kind_name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind_name}_token_id", None)
        if isinstance(tid, int) and tid < len(tokens):
            special[kind_name] = tid
    if eot_token:
        tid = tokenizer.convert_tokens_to_ids(eot_token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            special["eot"] = tid
    add_bos, add_eos = _bos_eos_behaviour(tokenizer)
    return GGUFVocab(model=model, pre=pre, tokens=tokens, types=[int(t) for t in types], scores=scores,
                     merges=merges, special=special, add_bos=add_bos, add_eos=add_eos,
                     add_space_prefix=add_space_prefix, chat_template=chat_template, raw_text_exact=raw_text_exact)
