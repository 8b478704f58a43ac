"""Load anything a user can point at and generate from it: one interface for every engine.

Targets: a run directory (base + adapter, never merged), a model spec or Hugging Face
directory (a base model or a merged one), or a ``.gguf`` file (llama.cpp). Engines: each
backend's (common.backends: transformers + peft in ``torch_ft.generate``, mlx-lm in
``mlx_ft.generate``) and llama-cpp-python (``llama``, common.generation.llama) for GGUF files.

Whatever the engine, prompts come from :class:`common.prompts.ChatFormatter` (the chat
template rendered in the sandbox, the system prompt inserted where a conversation has
none), generation stops at the template's end-of-turn tokens, temperature 0 is greedy
and any other temperature samples from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import backends
from common.errors import UserError
from common.prompts import ChatFormatter
from common.rows import Example

Messages = list[dict[str, Any]]
Stream = Callable[[str], None] | None  # receives each piece of text as it is generated


@dataclass
class Target:
    """What a target string names, resolved to files (no weights loaded)."""

    spec: str
    kind: str  # "run" | "model" | "gguf"
    name: str  # short name for reports and default output folders
    model_dir: Path | None = None  # HF directory (the base model of a run)
    adapter_dir: Path | None = None  # PEFT adapter of a run
    gguf_file: Path | None = None
    tokenizer_dir: Path | None = None  # HF tokenizer for a GGUF, when known
    run_dir: Path | None = None  # the run this target belongs to (a run, or a GGUF in RUN/export/)
    system_prompt: str | None = None  # the run's system prompt
    chat_template: str | None = None  # the run's --chat-template override (named or a file)
    backend: str | None = None  # the backend the run was trained with


def _normalise_prompt(text: str | None) -> str | None:
    # The same normalisation as common.prompts.load_system_prompt (idempotent).
    return None if text is None else text.replace("\r\n", "\n").rstrip("\n")


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").exists() or (d / "tokenizer.json").exists()


def _looks_like_run(d: Path) -> bool:
    """A run's config.json names its base model; a model's config.json does not."""
    import json

    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "base_model" in cfg and "model_type" not in cfg


def resolve_target(spec: str, *, tokenizer: str | None = None) -> Target:
    """Say what ``spec`` is: a ``.gguf`` file, a run directory, or a model spec."""
    from common.peft import load_adapter
    from common.run_dir import RunDir, is_run_dir

    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise UserError(f"{p}: GGUF file not found")
        t = Target(spec, "gguf", p.name, gguf_file=p.resolve())
        # A GGUF exported into RUN/export/ belongs to that run: same prompt, same tokenizer.
        run_path = p.resolve().parent.parent
        if p.resolve().parent.name == "export" and is_run_dir(run_path):
            run = RunDir.open(run_path)
            t.run_dir, t.name = run.path, f"{run.path.name}/{p.name}"
            t.system_prompt = _normalise_prompt(run.system_prompt())
            t.chat_template = run.chat_template_override()
            try:
                base = run.base_model()
                t.tokenizer_dir = base if _has_tokenizer(base) else None
            except UserError:
                pass  # the base model is gone: the GGUF's own template still works
        if _has_tokenizer(p.parent):
            t.tokenizer_dir = p.parent.resolve()
        if tokenizer:
            t.tokenizer_dir = Path(tokenizer).expanduser().resolve()
            if not _has_tokenizer(t.tokenizer_dir):
                raise UserError(f"{tokenizer}: no tokenizer here (tokenizer_config.json or tokenizer.json)")
        return t
    if is_run_dir(p):
        run = RunDir.open(p)
        load_adapter(run.adapter_dir)  # one clean error for a broken adapter, before any model loads
        return Target(spec, "run", run.path.resolve().name, model_dir=run.base_model(), adapter_dir=run.adapter_dir,
                      run_dir=run.path, system_prompt=_normalise_prompt(run.system_prompt()),
                      chat_template=run.chat_template_override(), backend=run.config().get("backend"))
    if p.is_dir() and _looks_like_run(p):
        RunDir.open(p)  # a run without its adapter yet: let RunDir say what is missing
    from common.models import resolve_model

    resolved = resolve_model(spec)
    name = resolved.path.name if spec != "default" else "default"
    return Target(spec, "model", name, model_dir=resolved.path)


class Generator:
    """One loaded model that answers chats. Subclasses implement :meth:`_generate`."""

    backend = "?"

    def __init__(self, target: Target, formatter: ChatFormatter):
        self.target = target
        self.formatter = formatter
        self.new_tokens = 0  # tokens generated so far (for tokens/s)
        # When set (common.structured.constraint.use_format), answers follow a JSON schema.
        self.constraint = None

    # -- prompts ---------------------------------------------------------------

    @property
    def system_prompt(self) -> str | None:
        return self.formatter.system_prompt

    @system_prompt.setter
    def system_prompt(self, text: str | None) -> None:
        self.formatter.system_prompt = text

    def chat_prompt(self, messages: Messages) -> list[int]:
        """Token ids of the prompt for ``messages`` (system prompt inserted, generation prompt added)."""
        return self.formatter.prompt_ids(messages)

    def prompt_text(self, messages: Messages) -> str:
        return self.formatter.prompt_text(messages)

    @property
    def stop_ids(self) -> list[int]:
        return list(self.formatter.eot_ids)

    # -- generation ------------------------------------------------------------

    def generate(self, messages: Messages, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stream: Stream = None) -> str:
        """The assistant's answer to ``messages``; ``stream`` gets each piece of text as it comes."""
        _check_sampling(max_new_tokens, temperature, top_p)
        return self._generate(self.chat_prompt(messages), max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, stream=stream)

    def generate_batch(self, batch: Sequence[Messages], *, max_new_tokens: int = 256, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int = 0) -> list[str]:
        """Answers to several chats; engines without batching run them one by one."""
        return [self.generate(m, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
                for m in batch]

    def _generate(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int, stream: Stream) -> str:
        raise NotImplementedError

    def loss(self, examples: Sequence[Example]) -> tuple[float, int] | None:
        """(sum of token losses in nats, number of target tokens) over ``examples``, or None if unsupported.

        Token t+1 is predicted from position t where ``loss_mask[t+1] == 1``, as in training.
        """
        return None

    def score_continuations(self, context: list[int], continuations: Sequence[list[int]],
                            end_ids: Sequence[int] | None = None) -> list[float]:
        """Sum of log-probs (nats) of each continuation's tokens after ``context``, plus the log-probability that
        one of ``end_ids`` comes next (the confidence of an enum field: see common.structured.confidence)."""
        raise NotImplementedError(f"{self.backend} cannot score continuations")

    def describe(self) -> dict[str, Any]:
        """What was loaded, for reports: target, engine, files, prompt source."""
        t = self.target
        out = {"target": t.spec, "kind": t.kind, "name": t.name, "backend": self.backend,
               "model": str(t.gguf_file or t.model_dir), "adapter": str(t.adapter_dir) if t.adapter_dir else None,
               "system_prompt": self.system_prompt is not None}
        if t.kind == "gguf":
            out["tokenizer"] = str(t.tokenizer_dir) if t.tokenizer_dir else "gguf"
        return out

    def close(self) -> None:
        """Free the engine's memory early (optional)."""


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p: must be in (0, 1], got {top_p}")
    if problems:
        raise UserError("invalid generation settings", problems)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str], stream: Stream):
        self.decode, self.stream = decode, stream
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.stream is None:
            return
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.stream(text[len(self.sent):])
            self.sent = text

    def text(self) -> str:
        text = self.decode(self.ids)
        if self.stream is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.stream(text[len(self.sent):])
        return text


def choose_engine(target: Target, backend: str) -> str:
    """``llama`` for GGUF files; for the rest, a registered backend (``auto``: the run's own
    backend if installed, else :func:`common.backends.resolve`'s choice)."""
    if target.kind == "gguf":
        if backend not in ("auto", "llama"):
            raise UserError(f"{target.gguf_file}: a GGUF file runs in llama.cpp; --backend {backend} does not apply")
        return "llama"
    if backend == "llama":
        raise UserError(f"{target.spec}: --backend llama needs a .gguf file (export one with 'llm-ft export')")
    return backends.resolve(backend, prefer=target.backend)


def load_generator(target: str | Target, *, backend: str = "auto", system_prompt: str | None = None,
                   chat_template: str | None = None, tokenizer: str | None = None, n_ctx: int = 4096,
                   device: str | None = None, dtype: str = "auto") -> Generator:
    """Load ``target`` (a run dir, a model spec or dir, a ``.gguf``) for generation.

    ``system_prompt``: None uses the target's (a run's training prompt; none for a plain
    model); "" uses none. ``chat_template`` overrides the template (a name or a .jinja file).
    ``tokenizer``: a Hugging Face tokenizer directory whose template a GGUF is rendered with.
    ``n_ctx``: llama.cpp context length (tokens). ``device``/``dtype``: torch placement.
    """
    t = target if isinstance(target, Target) else resolve_target(target, tokenizer=tokenizer)
    prompt = t.system_prompt if system_prompt is None else (system_prompt or None)
    template = chat_template or t.chat_template
    engine = choose_engine(t, backend)
    if engine == "llama":
        from common.generation.llama import LlamaGenerator

        return LlamaGenerator.load(t, system_prompt=prompt, chat_template=template, n_ctx=n_ctx)
    return backends.engine_class(engine).load(t, system_prompt=prompt, chat_template=template, device=device,
                                              dtype=dtype)


def missing_extra(engine: str, exc: ImportError) -> UserError:
    extra = backends.REGISTRY[engine].extra if engine in backends.REGISTRY else "verify"
    return UserError(f"the {engine} engine is not installed ({exc.name or exc}): pip install 'llm-ft[{extra}]'")
