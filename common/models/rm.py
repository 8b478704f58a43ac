"""``llm-ft models rm NAME``: remove an imported GGUF or a model from the Hugging Face cache.

NAME is a name that ``models list`` shows. An import is a folder under $LLM_FT_HOME/models;
a Hub model goes through huggingface_hub's own cache deletion (every revision of the repo),
so its cache stays consistent. On a terminal it asks first; elsewhere it needs ``--yes``.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import opt, register
from common.errors import UserError

RM_HELP = "remove an imported model or a Hugging Face cache entry (a name from 'models list')"


@register
@dataclass
class ModelsRmConfig:
    names: list[str] = opt(factory=list, positional=True, help="names as 'llm-ft models list' shows them")
    yes: bool = opt(False, "do not ask for confirmation (needed when not on a terminal)")


def _confirm(text: str) -> bool:
    sys.stderr.write(f"{text} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def run_rm(cfg: ModelsRmConfig) -> int:
    from common.models.catalog import list_models
    from common.models.gguf_import import models_home
    from common.models.memory import format_bytes

    if not cfg.names:
        raise UserError("models rm: name the models to remove (see 'llm-ft models list')")
    rows = {r["name"]: r for r in list_models(include_hub=True)}
    missing = [n for n in cfg.names if n not in rows]
    if missing:
        from common.errors import nearest

        hints = [f"{n}: not in 'llm-ft models list'" + (f" (did you mean {h!r}?)" if (h := nearest(n, rows)) else "")
                 for n in missing]
        raise UserError("models rm: unknown model name", hints)
    chosen = [rows[n] for n in cfg.names]
    summary = ", ".join(f"{r['name']} ({r['source']}, {format_bytes(r['size'])})" for r in chosen)
    if not cfg.yes:
        if not sys.stdin.isatty():
            raise UserError(f"models rm: would remove {summary}; pass --yes to confirm")
        if not _confirm(f"remove {summary}?"):
            print("nothing removed", file=sys.stderr)
            return 1
    home = models_home().resolve()
    for r in chosen:
        if r["source"] == "hub cache":
            from huggingface_hub import scan_cache_dir

            from common.models.hub import cache_dir

            info = scan_cache_dir(cache_dir())
            repo = next(x for x in info.repos if x.repo_id == r["name"] and x.repo_type == "model")
            info.delete_revisions(*[rev.commit_hash for rev in repo.revisions]).execute()
        else:
            path = Path(r["path"]).resolve()
            if path.parent != home:  # only ever a folder this tool created
                raise UserError(f"{path}: not under {home}; not removed")
            shutil.rmtree(path)
        print(f"removed {r['name']} ({format_bytes(r['size'])})")
    return 0
