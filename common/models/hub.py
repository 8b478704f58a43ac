"""Hugging Face Hub ids: download into huggingface_hub's own cache, or find them there.

``snapshot_download`` does the work (its cache layout, its progress bar, ``HF_TOKEN``
from the environment, which the config layer fills from ``.env``). We add the safety
checks before the weights are fetched, download only what training needs (never
pickle files), and turn "offline and not cached" into one clear message.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from common.errors import UserError
from common.models import safety

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
ALLOW_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                  "chat_template.*", "*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja",
                  "*.model", "*.txt", "*.tiktoken"]
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx",
                   "*.gguf", "original/*", "*/*.safetensors"]


def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and ".." not in spec


def offline() -> bool:
    """HF_HUB_OFFLINE, read now (the library reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str | None:
    """HF_HUB_CACHE or HF_HOME/hub, read now; None lets the library use its default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _named(exc: BaseException, *names: str) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _remote_files(repo_id: str, revision: str | None) -> tuple[list[str] | None, BaseException | None]:
    """The repo's file list, or (None, why) when the hub cannot be reached."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except Exception as exc:
        if _named(exc, "GatedRepoError"):
            raise UserError(f"model {repo_id}: the repository is gated",
                            ["accept its license on huggingface.co, then set HF_TOKEN (environment or .env)"]) from None
        if _named(exc, "RepositoryNotFoundError"):
            raise UserError(f"model {repo_id}: no such repository on the Hugging Face Hub",
                            ["check the spelling; a private repository needs HF_TOKEN (environment or .env)"]) from None
        if _named(exc, "RevisionNotFoundError"):
            raise UserError(f"model {repo_id}: revision {revision!r} not found") from None
        return None, exc
    return [s.rfilename for s in info.siblings or []], None


def download(repo_id: str, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """A local snapshot directory of ``repo_id`` (downloaded if needed); raises UserError."""
    from huggingface_hub import snapshot_download

    local_only = offline()
    why: BaseException | None = None
    if not local_only:
        files, why = _remote_files(repo_id, revision)
        if files is not None:
            safety.check_weight_files(files, f"model {repo_id}")
            # config first: refuse custom code before fetching gigabytes of weights
            head = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(),
                                     allow_patterns=["config.json", "tokenizer_config.json"])
            safety.check_config(safety.read_json(Path(head) / "config.json"), f"model {repo_id}", trust_remote_code,
                                safety.read_json(Path(head) / "tokenizer_config.json"))
        else:
            local_only = True
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=local_only,
                                 allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    except Exception as exc:
        if not _named(exc, "LocalEntryNotFoundError", "OfflineModeIsEnabled", "EntryNotFoundError"):
            raise
        reason = ("HF_HUB_OFFLINE is set" if why is None else
                  f"the hub cannot be reached: {type(why).__name__}: {why}")
        where = f"{repo_id}" + (f"@{revision}" if revision else "")
        raise UserError(f"model {where} is not in the local cache and {reason}",
                        [f"cache searched: {cache_dir() or 'the default (~/.cache/huggingface/hub)'}",
                         "connect and run once without HF_HUB_OFFLINE, or pass a local directory or .gguf file"]) from None
    return Path(path)
