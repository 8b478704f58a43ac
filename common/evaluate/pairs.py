"""``llm-ft eval --pairs``: a preference pair for each wrong answer of an evaluation.

chosen = the expected answer, rejected = what the model answered, prompt = the row's
messages; so the next round is one command: ``llm-ft train --method dpo --data PAIRS
--init-adapter RUN``. Wrong answers that cannot make a pair (an empty answer) are counted
and skipped, so the file always passes the preference format's lint.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import io


def pairs_from_errors(errors: list[dict]) -> tuple[list[dict], int]:
    """(pairs, skipped) from the records of ``errors.jsonl``."""
    out, skipped = [], 0
    for e in errors:
        produced, expected = e.get("produced") or "", e.get("expected") or ""
        if not produced.strip() or not expected.strip() or produced.strip() == expected.strip():
            skipped += 1
            continue
        prompt = e.get("messages") or [{"role": "user", "content": e["prompt"]}]
        out.append({"prompt": prompt, "chosen": expected, "rejected": produced})
    return out, skipped


def write_pairs(errors_file: Path, out: Path) -> tuple[int, int]:
    """Write the pairs of an evaluation's ``errors.jsonl`` to ``out`` (atomically); (written, skipped)."""
    errors = [json.loads(line) for line in Path(errors_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs, skipped = pairs_from_errors(errors)
    io.write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return len(pairs), skipped
