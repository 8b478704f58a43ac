"""Verify an exported GGUF in llama.cpp (llama-cpp-python) against the trained model.

1. Tokens: llama.cpp's token ids equal the HF tokenizer's on a probe set (digits,
   emoji, CJK, whitespace runs, special tokens) and on the rendered training prompts;
   a full prompt starts with exactly one BOS where the model uses one.
2. Logits on fixed prompts against the trained model in transformers (+ peft for a run:
   the base with the adapter unmerged, i.e. what was trained): NMSE < 1e-4 required for
   f32/f16; for other types NMSE and top-1 agreement are measured and reported.
3. Greedy answers on held-out prompts: agreement with the trained model, and whether
   llama.cpp stops with an end-of-turn token before the limit.

The reference runs in the torch backend's engine (common.backends); without torch the
logit and answer checks are skipped with a note.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import backends
from common.errors import UserError

NMSE_LIMIT = 1e-4  # for lossless-ish exports (f32, f16)
STRICT_QUANTS = ("f32", "f16")
PROBE_TEXTS = (
    "0123456789 3.14159 1,000,000 -42 1e-9",
    "emoji 🚀🦙😶\u200d🌫️ ✅ 👍🏽",
    "CJK 我想在apple工作 東京 한국어 Привет مرحبا",
    "whitespace:  two   three    four\t\ttabs\n\nnewlines \n \n",
    "   leading spaces and trailing   ",
    "code: def f(x):\n    return {'a': [1, 2]}  # ok",
    '{"intent": "set_timer", "slots": {"duration": "10 minutes"}}',
)


@dataclass
class VerifyReport:
    gguf: str
    quant: str
    passed: bool = True
    tokens: dict[str, Any] = field(default_factory=dict)
    logits: dict[str, Any] = field(default_factory=dict)
    greedy: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.passed = False
        self.failures.append(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_llama(gguf_path: Path, *, lora: Path | None = None, n_ctx: int = 512):
    """llama.cpp with all logits kept (for comparisons)."""
    import llama_cpp

    kwargs = {"lora_path": str(lora)} if lora else {}
    try:
        return llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=n_ctx, verbose=False, n_threads=2,
                               n_threads_batch=2, **kwargs)
    except ValueError as exc:
        raise UserError(f"{gguf_path}: llama.cpp cannot load the GGUF ({exc})") from None


def strip_template_bos(text: str, formatter) -> str:
    """The prompt text as Ollama's TEMPLATE renders it: without a leading BOS *text* when
    llama.cpp adds the BOS token itself."""
    bos = formatter.special.get("bos_token") or ""
    if formatter.add_bos and bos and text.startswith(bos):
        return text[len(bos):]
    return text


# ---------------------------------------------------------------------------
# 1. tokens


def check_tokens(llm, formatter, conversations: list[list[dict]], report: VerifyReport,
                 raw_text_exact: bool = True) -> None:
    """Token ids of probe texts and rendered prompts; raw-text differences are notes only
    when the tokenizer's start-of-text rule cannot be expressed in llama.cpp (raw_text_exact)."""
    tok = formatter.tokenizer
    specials = [t for t in (formatter.special.get("bos_token"), formatter.special.get("eos_token")) if t]
    specials += formatter.stop_tokens
    raw = list(PROBE_TEXTS) + [" ".join(dict.fromkeys(specials)) + " after specials"]
    probes_in_prompts = [[{"role": "user", "content": t}] for t in PROBE_TEXTS]
    texts = raw + [formatter.prompt_text(m) for m in list(conversations) + probes_in_prompts]
    mismatches, raw_notes = [], []
    for i, text in enumerate(texts):
        want = list(tok.encode(text, add_special_tokens=False))
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != want:
            first = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            found = {"text": text[:120], "at": first, "hf": want[first:first + 8], "llama_cpp": got[first:first + 8]}
            (mismatches if raw_text_exact or i >= len(raw) else raw_notes).append(found)
    bos_ok, double_bos = 0, []
    bos_id = formatter.bos_id
    for msgs in conversations:
        hf_ids = formatter.prompt_ids(msgs)
        text = strip_template_bos(formatter.prompt_text(msgs), formatter)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # as llama.cpp/Ollama tokenize prompts
        leading = next((i for i, t in enumerate(ids) if t != bos_id), len(ids)) if bos_id is not None else 0
        if ids == hf_ids and leading <= 1:
            bos_ok += 1
        else:
            double_bos.append({"text": text[:80], "leading_bos": leading, "hf": hf_ids[:6], "llama_cpp": ids[:6]})
    if raw_notes:
        report.notes.append(f"{len(raw_notes)} raw texts tokenize differently at the start or after special "
                            "tokens (SentencePiece prefix rule llama.cpp cannot express); chat prompts are what count")
    report.tokens = {"texts": len(texts), "mismatches": mismatches, "raw_text_differences": raw_notes,
                     "prompts": len(conversations),
                     "prompts_equal_with_bos": bos_ok, "prompt_problems": double_bos,
                     "add_bos": formatter.add_bos}
    if mismatches:
        report.fail(f"token ids differ from the HF tokenizer on {len(mismatches)} of {len(texts)} texts")
    if double_bos:
        report.fail(f"{len(double_bos)} full prompts tokenize differently in llama.cpp (BOS handling)")


# ---------------------------------------------------------------------------
# 2. logits and 3. greedy answers


def reference(model_dir: Path, adapter_dir: Path | None):
    """The trained model (+ adapter, unmerged) in the torch backend's engine, fp32 on the CPU."""
    from common.generation import Target

    target = Target(str(model_dir), "model", Path(model_dir).name, model_dir=Path(model_dir), adapter_dir=adapter_dir)
    return backends.engine_class("torch").load(target, system_prompt=None, chat_template=None, device="cpu",
                                               dtype="float32")


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], stop_ids: set[int], max_tokens: int) -> tuple[list[int], bool]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok in stop_ids:
            return out, True
        out.append(tok)
        if llm.n_tokens >= llm.n_ctx():
            break
        llm.eval([tok])
    return out, False


def nmse(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean((got - want) ** 2) / max(float(np.mean(want ** 2)), 1e-30))


def check_logits(llm, ref, prompts: list[list[int]], quant: str, report: VerifyReport) -> None:
    values, top1 = [], []
    for ids in prompts:
        got, want = llama_logits(llm, ids), ref.logits(ids)
        if got.shape != want.shape:
            report.fail(f"logits shape {got.shape} in llama.cpp vs {want.shape} in transformers")
            return
        values.append(nmse(got, want))
        top1.append(float(np.mean(got.argmax(-1) == want.argmax(-1))))
    worst = max(values)
    report.logits = {"prompts": len(prompts), "positions": int(sum(len(p) for p in prompts)),
                     "nmse_max": worst, "nmse_mean": float(np.mean(values)), "top1_agreement": float(np.mean(top1)),
                     "limit": NMSE_LIMIT if quant in STRICT_QUANTS else None}
    if quant in STRICT_QUANTS and not worst < NMSE_LIMIT:
        report.fail(f"logits NMSE {worst:.2e} >= {NMSE_LIMIT:g} for a {quant} export")


def check_greedy(llm, ref, formatter, conversations: list[list[dict]], max_tokens: int,
                 report: VerifyReport) -> None:
    stop_ids = set(formatter.eot_ids) | ({formatter.eos_id} if formatter.eos_id is not None else set())
    if not stop_ids:
        report.notes.append("no end-of-turn token known: greedy check skipped")
        return
    same, stopped, examples = 0, 0, []
    tok = formatter.tokenizer
    for msgs in conversations:
        ids = formatter.prompt_ids(msgs)
        got, got_stop = llama_greedy(llm, ids, stop_ids, max_tokens)
        want, _ = ref.greedy_ids(ids, stop_ids, max_tokens)
        same += got == want
        stopped += got_stop
        if len(examples) < 5:
            examples.append({"prompt": msgs[-1]["content"][:80], "llama_cpp": tok.decode(got)[:200],
                             "trained": tok.decode(want)[:200], "stopped": got_stop})
    n = len(conversations)
    report.greedy = {"prompts": n, "agreement": same / n if n else None, "stopped_with_eot": stopped,
                     "max_tokens": max_tokens, "examples": examples}


# ---------------------------------------------------------------------------


def verify_gguf(gguf_path: Path, *, formatter, quant: str, model_dir: Path, adapter_dir: Path | None = None,
                lora: Path | None = None, conversations: list[list[dict]] = (), held_out: list[list[dict]] = (),
                max_tokens: int = 64, raw_text_exact: bool = True) -> VerifyReport:
    """Run all checks; ``conversations`` are prompts (message lists ending with a user turn)."""
    report = VerifyReport(str(gguf_path), quant)
    convs = list(conversations) or [[{"role": "user", "content": t}] for t in PROBE_TEXTS[:3]]
    longest = max(len(formatter.prompt_ids(m)) for m in list(convs) + list(held_out or convs))
    llm = load_llama(gguf_path, lora=lora, n_ctx=max(256, longest + max_tokens + 8))
    try:
        check_tokens(llm, formatter, convs, report, raw_text_exact)
        if not backends.installed("torch"):
            report.notes.append("torch/transformers not installed: logits and greedy answers not compared "
                                "(pip install 'llm-ft[torch]')")
            return report
        ref = reference(model_dir, adapter_dir)
        prompts = [formatter.prompt_ids(m) for m in convs[:4]]
        prompts.append(list(formatter.tokenizer.encode(PROBE_TEXTS[0] + " " + PROBE_TEXTS[2], add_special_tokens=False)))
        check_logits(llm, ref, prompts, quant, report)
        check_greedy(llm, ref, formatter, list(held_out or convs), max_tokens, report)
    finally:
        llm.close()
    return report


def print_report(report: VerifyReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"llama.cpp verification of {Path(report.gguf).name} ({report.quant})")
    table.add_column("check")
    table.add_column("result")
    t = report.tokens
    if t:
        table.add_row("token ids", f"{t['texts'] - len(t['mismatches']) - len(t['raw_text_differences'])}/{t['texts']} texts equal; "
                      f"{t['prompts_equal_with_bos']}/{t['prompts']} full prompts equal (BOS once: {t['add_bos']})")
    lg = report.logits
    if lg:
        limit = f" (limit {lg['limit']:g})" if lg["limit"] else " (measured)"
        table.add_row("logits NMSE", f"max {lg['nmse_max']:.2e}, mean {lg['nmse_mean']:.2e}{limit}")
        table.add_row("top-1 agreement", f"{lg['top1_agreement']:.1%} of {lg['positions']} positions")
    g = report.greedy
    if g and g.get("prompts"):
        table.add_row("greedy answers", f"{g['agreement']:.0%} agree on {g['prompts']} held-out prompts; "
                      f"{g['stopped_with_eot']} stopped with an end-of-turn token")
    table.add_row("result", "[green]passed[/green]" if report.passed else "[red]FAILED[/red]: " + "; ".join(report.failures))
    console = Console()
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
