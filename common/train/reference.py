"""Reference log-probs of DPO computed once before training and cached in the run directory.

With ``--precompute-ref`` (and always with ``--ref init-adapter``) every pair's reference
log-prob sums are computed before the first step, with the adapter disabled (``base``) or
with the initial adapter (``init-adapter``: exactly the starting policy), so each step runs
the policy only. The cache (``reference_logps.json``) is keyed by a hash of the tokenized
pairs and the reference kind, so a resumed run reuses it and a changed run never does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.io import write_json
from common.train.methods import make_pair_batch

CACHE_FILE = "reference_logps.json"
BATCH = 8  # pairs per reference pass (no gradients: small activations)


def pairs_hash(pairs: list, ref: str, init_adapter: str | None) -> str:
    h = hashlib.sha256(f"{ref}\n{init_adapter or ''}\n".encode())
    for p in pairs:
        h.update(json.dumps([p.chosen.input_ids, p.chosen.loss_mask, p.rejected.input_ids, p.rejected.loss_mask],
                            separators=(",", ":")).encode())
    return h.hexdigest()


def compute(backend, pairs: list, pad_id: int, adapter: bool) -> list[tuple[float, float]]:
    out = []
    for i in range(0, len(pairs), BATCH):
        logps = backend.sequence_logps(make_pair_batch(pairs[i:i + BATCH], pad_id), adapter=adapter)
        out += [(logps[k][0], logps[k + 1][0]) for k in range(0, len(logps), 2)]
    return out


def attach(backend, data: Any, run_dir: Path, cfg: Any, console=None, write: bool = True) -> str:
    """Give every train and valid pair its reference (from the cache when it matches); a note for the log.

    Under data parallelism every rank computes (or reads) all of them in memory, as its share of
    pairs changes from step to step; rank 0 alone writes the cache (``write``).
    """
    splits = {"train": data.train, "valid": data.valid}
    keys = {name: pairs_hash(p, cfg.ref, cfg.init_adapter) for name, p in splits.items()}
    cache = Path(run_dir) / CACHE_FILE
    saved = {}
    if cache.exists():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = {}  # a torn cache is recomputed, never trusted
    adapter = cfg.ref == "init-adapter"
    reused = 0
    for name, items in splits.items():
        entry = saved.get(name)
        if entry and entry.get("key") == keys[name] and len(entry.get("logps", [])) == len(items):
            refs = [tuple(x) for x in entry["logps"]]
            reused += 1
        else:
            refs = compute(backend, items, data.pad_id, adapter)
            saved[name] = {"key": keys[name], "logps": refs}
        for p, r in zip(items, refs, strict=True):
            p.ref = (float(r[0]), float(r[1]))
    if write:
        write_json(cache, {**saved, "ref": cfg.ref, "init_adapter": cfg.init_adapter})
    what = "the initial adapter" if adapter else "the base model without adapter"
    return (f"reference log-probs of {len(data.train)} + {len(data.valid)} pairs: {what}"
            + (" (from the cache)" if reused == len(splits) else f", cached in {cache.name}"))
