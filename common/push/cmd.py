"""``llm-ft push RUN --repo user/name``: publish a run to the Hugging Face Hub with a model card.

``--what adapter`` (the default: the PEFT adapter, small), ``merged`` (a full model) or
``gguf`` (an exported GGUF + Modelfile, for ``ollama run hf.co/...``). The folder to upload
is staged in ``RUN/push/<what>/`` first; ``--dry-run`` stops there and prints the calls.
The token comes from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``) or
``HF_TOKEN`` in ``.env``; it is never printed or written anywhere.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.config import opt, register
from common.errors import UserError
from common.models.hub import is_hub_id


@register
@dataclass
class PushConfig:
    run: str = opt(help="run directory (written by 'llm-ft train')", positional=True)
    repo: str = opt(help="Hub repository to create or update: user/name or org/name")
    what: Literal["adapter", "merged", "gguf"] = opt("adapter", "what to upload: the LoRA adapter (small; needs the "
                                                     "base model), the merged model, or an exported GGUF + Modelfile")
    private: bool = opt(False, "create the repository as private")
    dry_run: bool = opt(False, "stage the folder and print the Hub calls, upload nothing")
    revision: str | None = opt(None, "branch to push to (created from main if missing; default: main)")
    gguf: str | None = opt(None, "with --what gguf: which RUN/export/*.gguf (default: the newest)")
    base_model: str | None = opt(None, "Hub id[@revision] of the base model, for a run trained from a local copy "
                                       "(recorded in the card and adapter_config.json)")
    commit_message: str | None = opt(None, "commit message (default: 'llm-ft push: <what> of <run>')")

    def validate(self) -> list[str]:
        return [] if is_hub_id(self.repo) else [f"repo: expected user/name or org/name, got {self.repo!r}"]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def build_card(cfg: PushConfig, run_dir: Path, gguf: Path | None) -> tuple[str, str | None, str | None]:
    """(card text, base Hub id, base revision) for the run."""
    from common.push import card
    from common.push.stage import base_hub_id

    run_config = _read(run_dir / "config.json")
    base, revision = base_hub_id(run_config, cfg.base_model)
    eval_report = _read(run_dir / "eval" / "metrics.json") or None
    system = (run_dir / "system_prompt.txt").read_text(encoding="utf-8") if (run_dir / "system_prompt.txt").is_file() \
        else None
    text = card.render(repo=cfg.repo, what=cfg.what, base=base, base_revision=revision, run_config=run_config,
                       summary=_read(run_dir / "summary.json"), fingerprint=_read(run_dir / "data_fingerprint.json"),
                       eval_report=eval_report, system_prompt=system, gguf_name=gguf.name if gguf else None)
    return text, base, revision


def push(cfg: PushConfig, *, api=None, token: str | None = None, out=None):
    """Stage, then (unless ``dry_run``) create the repo and upload the folder; returns llm_ft.PushResult.

    ``api`` is a ``huggingface_hub.HfApi`` (tests pass their own); ``token`` overrides the usual sources.
    """
    from common.push.stage import choose_gguf, stage
    from common.run_dir import RunDir
    from llm_ft.results import PushResult

    out = out or sys.stdout
    rd = RunDir.open(cfg.run)
    gguf = choose_gguf(rd.path, cfg.gguf) if cfg.what == "gguf" else None
    text, base, revision = build_card(cfg, rd.path, gguf)
    if base is None and cfg.what == "adapter":
        print("note: the base model is a local directory, so adapter_config.json names none; "
              "pass --base-model org/name to record its Hub id", file=sys.stderr)
    folder = rd.path / "push" / cfg.what
    files = stage(rd.path, cfg.what, folder, base=base, revision=revision, card=text, run_config=rd.config(),
                  system_prompt=rd.system_prompt(), gguf=gguf)
    message = cfg.commit_message or f"llm-ft push: {cfg.what} of {rd.path.name}"
    calls = [f"create_repo(repo_id={cfg.repo!r}, repo_type='model', private={cfg.private}, exist_ok=True)"]
    if cfg.revision:
        calls.append(f"create_branch(repo_id={cfg.repo!r}, branch={cfg.revision!r}, exist_ok=True)")
    calls.append(f"upload_folder(repo_id={cfg.repo!r}, folder_path={str(folder)!r}, revision={cfg.revision!r}, "
                 f"commit_message={message!r})")
    print(f"staged {len(files)} files in {folder}:", file=sys.stderr)
    for f in files:
        print(f"  {f}", file=sys.stderr)
    if cfg.dry_run:
        print("dry run: these calls would be made:", file=sys.stderr)
        for c in calls:
            print(f"  {c}", file=sys.stderr)
        print(folder, file=out)
        return PushResult(cfg.repo, folder, files, None, calls)

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    kw = {"token": token} if token else {}  # else huggingface_hub finds it (HF_TOKEN, its login file)
    try:
        api.create_repo(repo_id=cfg.repo, repo_type="model", private=cfg.private, exist_ok=True, **kw)
        if cfg.revision:
            api.create_branch(repo_id=cfg.repo, branch=cfg.revision, exist_ok=True, **kw)
        info = api.upload_folder(repo_id=cfg.repo, folder_path=str(folder), revision=cfg.revision,
                                 commit_message=message, **kw)
    except Exception as exc:  # the Hub's errors (auth, network): one line, never the token
        name = type(exc).__name__
        if name in ("UserError",):
            raise
        hint = ["log in with `hf auth login` or set HF_TOKEN (environment or .env)"] if "401" in str(exc) or \
            "Unauthorized" in name or "token" in str(exc).lower() else []
        raise UserError(f"push to {cfg.repo} failed: {name}: {str(exc).splitlines()[0] if str(exc) else ''}",
                        hint) from None
    url = getattr(info, "commit_url", None) or str(info)
    print(f"https://huggingface.co/{cfg.repo}" + (f"/tree/{cfg.revision}" if cfg.revision else ""), file=out)
    return PushResult(cfg.repo, folder, files, url, calls)


def run(cfg: PushConfig) -> int:
    push(cfg)
    return 0


def build_parser():
    from common.command import make_parser

    return make_parser("push", "Publish a run to the Hugging Face Hub (adapter, merged model or GGUF) with a "
                       "model card written from the run.", PushConfig)


def main(argv=None) -> int:
    from common.command import main_for

    return main_for(build_parser, PushConfig, run, argv)
