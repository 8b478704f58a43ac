"""``llm-ft eval --format``: the same test rows decoded under the schema, scored like free decoding,
with the classifier's confidence and its calibration.

The free answers are generated first and scored exactly as without ``--format``; the
generator is then constrained, answers again, and is set free again before it is closed.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from common.evaluate import metrics as M
from common.structured.calibration import calibration_report, write_reliability_png
from common.structured.confidence import apply_threshold, classify_answer
from common.structured.constraint import use_format
from common.structured.schema import AnswerFormat


@contextlib.contextmanager
def _no_progress(total: int):
    yield lambda n=1: None


def score(expected: list[str], answers: list[str], schema: dict | None, key: str) -> dict[str, Any]:
    scored = M.json_report(expected, answers, schema=schema, label_key=key)
    return {"metrics": scored["metrics"], "per_field": scored["per_field"], "per_class": scored.get("per_class", {}),
            "examples": scored["examples"]}


def constrained_eval(gen, prompts: list[list[dict]], expected: list[str], fmt: AnswerFormat, schema: dict | None,
                     generate_all, out_dir: Path, title: str, threshold: float | None = None,
                     progress=None) -> dict[str, Any]:
    """Generate under ``fmt``, score, compute each answer's confidence; writes reliability.png when the schema
    has an enum field. ``generate_all(gen, prompts)`` is eval's batched generation with its progress bar;
    ``progress(total)``, a context yielding ``advance(n)``: the bar of the confidence pass (one scoring per row)."""
    key = fmt.enum.key if fmt.enum else "intent"
    use_format(gen, fmt)
    try:
        before, t0 = gen.new_tokens, time.perf_counter()
        answers = generate_all(gen, prompts)
        seconds = time.perf_counter() - t0
        new_tokens = gen.new_tokens - before
        t1 = time.perf_counter()
        classified = []
        with (progress or _no_progress)(len(prompts)) as advance:
            for p, a in zip(prompts, answers, strict=True):
                classified.append(classify_answer(gen, gen.chat_prompt(p), a, fmt))
                advance(1)
        confidence_s = time.perf_counter() - t1
    finally:
        use_format(gen, None)
    out: dict[str, Any] = {
        "format": str(fmt.path), "notes": list(fmt.notes),
        "timing": {"generation_s": round(seconds, 3), "new_tokens": new_tokens,
                   "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None},
        **{k: v for k, v in score(expected, answers, schema, key).items() if k != "examples"},
        "answers": answers,
    }
    if fmt.enum is None:  # no classifier field: no confidence, nothing to calibrate
        return out
    gold = [M.parse_json(e)[1].get(fmt.enum.key) if isinstance(M.parse_json(e)[1], dict) else None for e in expected]
    conf = [c.probability if c.probability is not None else 0.0 for c in classified]
    correct = [c.label is not None and c.label == g for c, g in zip(classified, gold, strict=True)]
    calib = calibration_report(conf, correct)
    out["confidence"] = {"field": fmt.enum.key, "values": list(fmt.enum.values), "fallback": fmt.enum.fallback,
                         "seconds": round(confidence_s, 3), **calib,
                         "argmax_agrees": sum(c.label == next(iter(c.probs)) for c in classified) / len(classified)
                         if classified else None,
                         "per_row": [{"label": c.label, "probability": c.probability, "top3": c.top(3)}
                                     for c in classified]}
    png = write_reliability_png(out_dir / "reliability.png", calib, title=f"{title} ({fmt.enum.key})")
    out["confidence"]["reliability_png"] = str(png)
    if threshold is not None and fmt.enum.fallback is not None:
        held = [apply_threshold(c, fmt, threshold) for c in classified]
        row = score(expected, [c.text for c in held], schema, key)
        out["thresholded"] = {"threshold": threshold, "metrics": row["metrics"],
                              "fallbacks": sum(c.fallback for c in held)}
    return out
