"""``llm-ft export RUN|MODEL``: GGUF + Ollama Modelfile, verified in llama.cpp.

A run is merged into its original base weights on the fly (tensor by tensor; no merged
copy on disk) and written as one GGUF; with ``--adapter-only`` the base and the adapter
are written as two GGUFs for Ollama's ``ADAPTER``. Outputs (default ``RUN/export/``):
``model-<quant>.gguf`` (or ``base-<quant>.gguf`` + ``adapter.gguf``), ``Modelfile``,
``verify.json``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.config import opt, register
from common.errors import UserError
from common.io import write_json, write_text

Quant = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_s",
                "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


@register
@dataclass
class ExportConfig:
    source: str = opt(help="run directory, or a model (HF directory, .gguf, Hub id, 'default')", positional=True)
    quant: Quant | None = opt(None, "tensor type; f32/f16/bf16/q8_0/q4_0 are written in Python, K-quants "
                                       "(q4_k_m, q5_k_m, q6_k, ...) by llama.cpp's quantizer (needs llm-ft[verify]). "
                                       "Default: q8_0 below 1B parameters, q4_k_m above")
    out: str | None = opt(None, "GGUF file to write (default: RUN/export/model-<quant>.gguf); the Modelfile "
                                   "and verify.json go beside it")
    adapter_only: bool = opt(False, "write the LoRA adapter as its own GGUF plus the base model GGUF, and a "
                                    "Modelfile with FROM base + ADAPTER adapter")
    verify: bool = opt(True, "check the GGUF in llama.cpp: token ids, logits vs the trained model, greedy answers "
                             "(skipped with a note when llama-cpp-python is not installed)")
    ollama_create: str | None = opt(None, "also run 'ollama create NAME' and one smoke prompt (needs ollama on PATH)")
    name: str | None = opt(None, "model name in the GGUF metadata (default: the run or model directory name)")
    pre: str | None = opt(None, "expert: llama.cpp pre-tokenizer name (e.g. gpt-2) for a byte-level BPE tokenizer "
                                   "whose fingerprint llama.cpp does not know; verification then checks the token ids")
    verify_prompts: int = opt(8, "held-out prompts for the greedy-answer check")
    max_new_tokens: int = opt(64, "token limit for each greedy answer in verification")

    def validate(self) -> list[str]:
        problems = []
        if self.verify_prompts < 1:
            problems.append(f"verify_prompts: must be >= 1, got {self.verify_prompts}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        return problems


@dataclass
class Source:
    """What is exported: base weights, optional adapter, and the run's training context."""

    name: str
    base_dir: Path
    adapter_dir: Path | None
    out_dir: Path
    system: str | None = None
    template_override: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    gguf: Path
    modelfile: Path
    quant: str
    adapter_gguf: Path | None = None
    report: Any = None  # VerifyReport or None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.report is None or self.report.passed


def resolve_source(spec: str) -> Source:
    from common.run_dir import RunDir, is_run_dir

    if is_run_dir(spec):
        rd = RunDir.open(spec)
        return Source(rd.path.resolve().name, Path(rd.base_model()), rd.adapter_dir, rd.path / "export",
                      system=rd.system_prompt(), template_override=rd.chat_template_override(), run_config=rd.config())
    from common.models import resolve_model

    model = resolve_model(spec)
    name = model.path.name
    return Source(name, model.path, None, Path("exports") / name)


def load_rows(run_config: dict[str, Any], notes: list[str]):
    """The run's data (train answers, held-out prompts), or empty lists with a note."""
    if not run_config.get("data"):
        return [], []
    from common.data import load_splits
    from common.rows import Conversation

    try:
        splits = load_splits(list(run_config["data"]), valid_fraction=float(run_config.get("valid_fraction", 0.1)),
                             seed=int(run_config.get("seed", 3407)), schema=run_config.get("json_schema"),
                             data_config=run_config.get("data_config"))
    except (UserError, OSError) as exc:
        notes.append(f"training data not readable here ({exc}); probes used instead")
        return [], []
    if splits.report.errors:
        notes.append("training data has errors here; probes used instead")
        return [], []
    train = [r for r in splits.train if isinstance(r, Conversation)]
    held = [r for r in (splits.test or splits.valid) if isinstance(r, Conversation)]
    return train, held


def slug(name: str) -> str:
    """An Ollama model name from a directory name."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"


def _paths(cfg: ExportConfig, src: Source, quant: str) -> tuple[Path, Path | None]:
    if cfg.out:
        gguf = Path(cfg.out)
        if gguf.suffix != ".gguf":
            raise UserError(f"--out {cfg.out}: expected a .gguf file name")
    else:
        gguf = src.out_dir / (f"base-{quant}.gguf" if cfg.adapter_only else f"model-{quant}.gguf")
    return gguf, (gguf.with_name("adapter.gguf") if cfg.adapter_only else None)


def run(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg.source`` as GGUF + Modelfile and verify it; returns what was written."""
    from common.export.arch import load_hparams, spec_for
    from common.export.gguf_file import default_quant, n_params, start_tensors, write_gguf
    from common.export.lora_gguf import scaling_note, write_lora_gguf
    from common.export.merge import load_adapter, open_merged

    src = resolve_source(cfg.source)
    name = cfg.name or src.name
    notes: list[str] = []
    hp = load_hparams(src.base_dir)
    spec = spec_for(hp)
    merged = open_merged(src.base_dir, None if cfg.adapter_only else src.adapter_dir)
    if cfg.quant:
        quant = cfg.quant
    else:
        quant, reason = default_quant(n_params(merged))
        print(f"quant: {reason}", file=sys.stderr)
    gguf_path, adapter_path = _paths(cfg, src, quant)
    # Merging and quantizing start here, on worker threads, and run beside the loading of the
    # adapter and the tokenizer below (about a second of single-threaded Python).
    tensors = start_tensors(merged, hp, spec, quant)
    try:
        adapter = load_adapter(src.adapter_dir) if src.adapter_dir else None
        vocab, formatter = _vocab_and_formatter(cfg, src, spec, merged, notes)
        result_gguf = write_gguf(merged, hp, spec, vocab, gguf_path, quant, name=name, tensors=tensors)
    finally:
        tensors.close()
    print(f"wrote {result_gguf.path} ({result_gguf.path.stat().st_size / 2**20:.1f} MiB, {quant})")
    if adapter_path is not None:
        if adapter is None:
            raise UserError(f"--adapter-only: {cfg.source} is a model, not a run with an adapter")
        write_lora_gguf(adapter, hp, spec, adapter_path, name=f"{name}-adapter")
        print(f"wrote {adapter_path} ({scaling_note(adapter)})")

    train_rows, held_rows = load_rows(src.run_config, notes)
    modelfile = write_modelfile(gguf_path, adapter_path, src, formatter, vocab.add_bos, train_rows, held_rows, notes)

    report = None
    if cfg.verify:
        report = _verify(cfg, src, formatter, quant, gguf_path, adapter_path, held_rows, notes, vocab.raw_text_exact)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    ollama_name = slug(cfg.ollama_create or name)
    print(f"to use it in Ollama: ollama create {ollama_name} -f {modelfile}")
    if cfg.ollama_create:
        ollama_create(ollama_name, modelfile, held_rows, notes)
    return ExportResult(gguf_path, modelfile, quant, adapter_path, report, notes)


def _vocab_and_formatter(cfg: ExportConfig, src: Source, spec, merged, notes: list[str]):
    """The GGUF vocabulary and the chat formatter training used (None without a chat template)."""
    from common.export.tokenizer import build_vocab
    from common.models import load_tokenizer
    from common.prompts import ChatFormatter

    tokenizer = load_tokenizer(src.base_dir)
    try:
        formatter = ChatFormatter(tokenizer, template=src.template_override, system_prompt=src.system)
    except UserError as exc:
        formatter = None
        notes.append(f"no chat template ({exc.message}): no TEMPLATE in the Modelfile, prompts not verified")
    eot = formatter.stop_tokens[0] if formatter and formatter.stop_tokens else None
    starts_special = None
    if formatter is not None:  # does a rendered prompt begin with a special token (or BOS)?
        first = formatter.tokenizer.encode(formatter.prompt_text([{"role": "user", "content": "x"}]),
                                           add_special_tokens=False)[:1]
        starts_special = formatter.add_bos or bool(first and first[0] in formatter.tokenizer.all_special_ids
                                                   + list(formatter.tokenizer.added_tokens_decoder))
    embed = next(n for n in merged.names if n.endswith("embed_tokens.weight"))
    vocab = build_vocab(src.base_dir, merged.info(embed).shape[0], chat_template=formatter.template if formatter else None,
                        eot_token=eot, pre_override=cfg.pre, add_space_prefix=spec.add_space_prefix,
                        prompts_start_special=starts_special, tokenizer=tokenizer)
    if formatter is not None and vocab.add_bos != formatter.add_bos:
        # Training tokenized through ChatFormatter: llama.cpp must add a BOS exactly when it did.
        notes.append(f"BOS: tokenizer.encode {'adds' if vocab.add_bos else 'does not add'} one, training "
                     f"{'did' if formatter.add_bos else 'did not'}; the GGUF follows training")
        vocab.add_bos = formatter.add_bos
    return vocab, formatter


def write_modelfile(gguf_path: Path, adapter_path: Path | None, src: Source, formatter, add_bos: bool,
                    train_rows, held_rows, notes: list[str]) -> Path:
    """Derive TEMPLATE/stops/parameters and write the Modelfile beside the GGUF."""
    from common.export.modelfile import default_system, derive_template, render_modelfile, task_parameters
    from common.prompts import generation_prompt_messages

    system, template, stops = src.system, None, []
    if formatter is not None:
        if system is None:
            system = default_system(formatter.template, formatter.special)
            if system is not None:
                notes.append("no training system prompt: SYSTEM is the chat template's own default")
        convs = [generation_prompt_messages(r)[0] for r in (held_rows or train_rows)[:16]]
        derived = derive_template(formatter.template, formatter.special, system=system, add_bos=add_bos,
                                  extra_stops=formatter.stop_tokens, conversations=convs)
        template, stops = derived.template, derived.stops
        notes.append(f"Modelfile: {derived.note}")
    answers = [r.messages[-1]["content"] for r in train_rows if r.messages and r.messages[-1]["role"] == "assistant"]
    lengths = [len(formatter.tokenizer.encode(a, add_special_tokens=False)) for a in answers] if formatter else []
    params, reason = task_parameters(answers, lengths, int(src.run_config.get("max_seq_length", 2048)))
    notes.append(f"parameters: {reason}")
    header = f"{src.name}: written by llm-ft export\nollama create {slug(src.name)} -f Modelfile"
    text = render_modelfile(f"./{gguf_path.name}", adapter=f"./{adapter_path.name}" if adapter_path else None,
                            template=template, system=system, stops=stops, parameters=params, header=header)
    path = gguf_path.with_name("Modelfile")
    write_text(path, text)
    print(f"wrote {path}")
    return path


def _verify(cfg: ExportConfig, src: Source, formatter, quant: str, gguf_path: Path, adapter_path: Path | None,
            held_rows, notes: list[str], raw_text_exact: bool = True):
    from common.export.gguf_file import llama_cpp_available

    if not llama_cpp_available():
        notes.append("verification skipped: llama-cpp-python is not installed (pip install 'llm-ft[verify]')")
        return None
    if formatter is None:
        notes.append("verification skipped: the model has no chat template")
        return None
    from common.export.verify import print_report, verify_gguf
    from common.prompts import generation_prompt_messages

    held = [generation_prompt_messages(r)[0] for r in held_rows[: cfg.verify_prompts]]
    report = verify_gguf(gguf_path, formatter=formatter,
                         quant=quant, model_dir=src.base_dir, adapter_dir=src.adapter_dir, lora=adapter_path,
                         conversations=held[:4], held_out=held, max_tokens=cfg.max_new_tokens,
                         raw_text_exact=raw_text_exact)
    write_json(gguf_path.with_name("verify.json"), {**report.to_dict(), "export_notes": notes})
    print_report(report)
    return report


def ollama_create(name: str, modelfile: Path, held_rows, notes: list[str]) -> None:
    """``ollama create`` + one smoke prompt, when ollama is installed."""
    exe = shutil.which("ollama")
    if exe is None:
        notes.append("--ollama-create: 'ollama' is not on PATH; run the command above where Ollama is installed")
        print(f"note: {notes[-1]}")
        return
    proc = subprocess.run([exe, "create", name, "-f", str(modelfile)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"ollama create {name} failed: {proc.stderr.strip()[-500:]}")
    prompt = held_rows[0].user_text() if held_rows else "Hello"
    smoke = subprocess.run([exe, "run", name, prompt], capture_output=True, text=True, timeout=600)
    print(f"ollama run {name} {prompt!r} -> {smoke.stdout.strip()[:300]!r}")


def build_parser():
    from common.command import make_parser

    return make_parser("export", "Write a GGUF (merged model, or base + LoRA adapter) and an Ollama Modelfile, "
                       "then verify the GGUF in llama.cpp against the trained model.", ExportConfig)


def main(argv=None) -> int:
    from common.command import main_for

    return main_for(build_parser, ExportConfig, lambda cfg: 0 if run(cfg).ok else 1, argv)
