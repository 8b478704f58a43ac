"""``llm-ft export RUN|MODEL``: GGUF + Ollama Modelfile, verified in llama.cpp.

A run is merged into its original base weights on the fly (tensor by tensor; no merged
copy on disk) and written as one GGUF; with ``--adapter-only`` the base and the adapter
are written as two GGUFs for Ollama's ``ADAPTER``. Outputs (default ``RUN/export/``):
``model-<quant>.gguf`` (or ``base-<quant>.gguf`` + ``adapter.gguf``), ``Modelfile``,
``verify.json``.

Everything is written into a staging folder beside the outputs and published (each file
renamed over the previous one) only once verification passed, or with ``--no-verify`` /
``--force``. A failed verification keeps its export in ``<name>.failed/`` for inspection and
leaves the published files as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.config import opt, register
from common.errors import UserError
from common.export.gguf_file import QUANTS
from common.io import write_json, write_text

Quant = Literal[QUANTS]  # every type the writer or llama.cpp's quantizer makes, from the writer's own table


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
    verify_prompts: int = opt(8, "held-out prompts for the greedy-answer check", min=1)
    max_new_tokens: int = opt(64, "token limit for each greedy answer in verification", min=1)
    force: bool = opt(False, "publish the export even when verification fails, and replace a Modelfile "
                             "beside --out that llm-ft did not write")


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
    published: bool = True  # False: verification failed and the files above are in the .failed folder

    @property
    def ok(self) -> bool:
        return self.report is None or self.report.passed

    @property
    def verify(self) -> dict[str, Any] | None:
        """verify.json's content (None when verification was skipped)."""
        return self.report.to_dict() if self.report is not None else None

    @property
    def ollama_command(self) -> str:
        return f"ollama create {self.modelfile.parent.parent.name or 'model'} -f {self.modelfile}"


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


MODELFILE_MARK = "written by llm-ft export"  # in the header of every Modelfile we write


class Staging:
    """A folder beside the outputs where an export is built; :meth:`publish` renames its files
    over the published ones, :meth:`keep_failed` sets it aside, :meth:`discard` removes it."""

    def __init__(self, gguf_path: Path):
        self.final_dir = gguf_path.parent
        self.created = not self.final_dir.exists()
        try:
            self.final_dir.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{gguf_path.stem}.staging-", dir=self.final_dir))
        except OSError as exc:
            from common.io import write_error

            raise write_error(self.final_dir, exc) or exc from None
        self.failed_dir = self.final_dir / f"{gguf_path.stem}.failed"

    def staged(self, final: Path | None) -> Path | None:
        return None if final is None else self.dir / final.name

    def publish(self) -> None:
        from common.io import _fsync_dir

        for f in sorted(self.dir.iterdir(), key=lambda p: p.suffix != ".gguf"):  # the GGUFs before the Modelfile
            os.replace(f, self.final_dir / f.name)
        _fsync_dir(self.final_dir)
        self.dir.rmdir()

    def keep_failed(self) -> Path:
        old = self.failed_dir
        if old.exists():  # the previous failed export (ours: it has only our file names) makes way
            shutil.rmtree(old) if all(p.suffix == ".gguf" or p.name in ("Modelfile", "verify.json", "schema.json")
                                      for p in old.iterdir()) else os.replace(old, f"{old}-{int(time.time())}")
        os.replace(self.dir, old)
        return old

    def about_final(self, exc: UserError) -> UserError:
        """``exc`` reworded to name the published file it was building, not the staging folder."""
        if str(self.dir) not in exc.message:
            return exc
        name = exc.message.split(str(self.dir) + os.sep, 1)[-1].split(":", 1)[0]
        kept = "the existing file is unchanged" if (self.final_dir / name).exists() else "nothing was written"
        message = exc.message.replace(str(self.dir), str(self.final_dir)).replace("nothing was written", kept)
        return UserError(message, exc.problems)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.created:
            with contextlib.suppress(OSError):
                self.final_dir.rmdir()


def _check_beside(gguf_path: Path, force: bool) -> None:
    """A Modelfile beside an explicit --out that we did not write is the user's: never replace it."""
    mf = gguf_path.with_name("Modelfile")
    if mf.is_file() and not force and MODELFILE_MARK not in mf.read_text(encoding="utf-8", errors="replace")[:2000]:
        raise UserError(f"{mf}: a Modelfile llm-ft did not write is beside --out {gguf_path}; "
                        "choose another folder, or pass --force to replace it")


def run(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg.source`` as GGUF + Modelfile and verify it; returns what was written."""
    from common.export.arch import load_hparams, spec_for
    from common.export.gguf_file import default_quant, n_params
    from common.export.merge import open_merged
    from common.peft import load_adapter

    src = resolve_source(cfg.source)
    # The adapter is validated before anything is created: a truncated one left an empty export/ behind.
    adapter = load_adapter(src.adapter_dir) if src.adapter_dir else None
    name = cfg.name or src.name
    notes: list[str] = []
    hp = load_hparams(src.base_dir)
    spec = spec_for(hp)
    merged = open_merged(src.base_dir, None if cfg.adapter_only else adapter)
    if cfg.quant:
        quant = cfg.quant
    else:
        quant, reason = default_quant(n_params(merged))
        print(f"quant: {reason}", file=sys.stderr)
    gguf_path, adapter_path = _paths(cfg, src, quant)
    _check_beside(gguf_path, cfg.force)
    in_run = src.adapter_dir is not None and src.adapter_dir.parent.resolve() in gguf_path.resolve().parents
    with _run_lock(src, in_run):
        stage = Staging(gguf_path)
        try:
            report, modelfile, held_rows, schema_file = _build(cfg, src, merged, hp, spec, quant, name, stage, notes,
                                                  stage.staged(gguf_path), stage.staged(adapter_path), adapter)
            published = report is None or report.passed or cfg.force
            if published:
                stage.publish()
                modelfile = gguf_path.with_name(modelfile.name)
                schema_file = gguf_path.with_name(schema_file.name) if schema_file else None
            else:
                kept = stage.keep_failed()
                gguf_path, modelfile = kept / gguf_path.name, kept / modelfile.name
                adapter_path = kept / adapter_path.name if adapter_path else None
        except UserError as exc:
            stage.discard()
            raise stage.about_final(exc) from None
        except BaseException:
            stage.discard()
            raise
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    result = ExportResult(gguf_path, modelfile, quant, adapter_path, report, notes, published)
    if not published:
        return result  # main() says why; no Ollama hint for an export that failed its check
    for f in (gguf_path, adapter_path, modelfile, schema_file):
        if f is not None:
            print(f"wrote {f} ({f.stat().st_size / 2**20:.1f} MiB)" if f.suffix == ".gguf" else f"wrote {f}")
    if report is not None and not report.passed:
        print(f"warning: verification failed; published anyway (--force): see {gguf_path.with_name('verify.json')}")
    ollama_name = slug(cfg.ollama_create or name)
    print(f"to use it in Ollama: ollama create {ollama_name} -f {modelfile}")
    if schema_file is not None:
        from common.structured.ollama import ollama_usage

        example = held_rows[0].user_text() if held_rows else "Hello"
        print(ollama_usage(ollama_name, schema_file, json.loads(schema_file.read_text(encoding="utf-8")), example))
    if cfg.ollama_create:
        ollama_create(ollama_name, modelfile, held_rows, notes)
    return result


def _run_lock(src: Source, in_run: bool):
    """Writing into a run (RUN/export): one writer at a time there, as for train."""
    if not in_run:
        return contextlib.nullcontext()
    from common.run_dir import RunLock

    return RunLock(src.adapter_dir.parent, "llm-ft export")


def _build(cfg: ExportConfig, src: Source, merged, hp, spec, quant: str, name: str, stage: Staging,
           notes: list[str], gguf_path: Path, adapter_path: Path | None, adapter=None):
    """Write the GGUF(s), the Modelfile and verify.json into the staging folder and verify them."""
    from common.export.gguf_file import start_tensors, write_gguf
    from common.export.lora_gguf import scaling_note, write_lora_gguf

    # Merging and quantizing start here, on worker threads, and run beside the loading of the
    # tokenizer below (about a second of single-threaded Python).
    tensors = start_tensors(merged, hp, spec, quant)
    try:
        vocab, formatter = _vocab_and_formatter(cfg, src, spec, merged, notes)
        write_gguf(merged, hp, spec, vocab, gguf_path, quant, name=name, tensors=tensors)
    finally:
        tensors.close()
    if adapter_path is not None:
        if adapter is None:
            raise UserError(f"--adapter-only: {cfg.source} is a model, not a run with an adapter")
        write_lora_gguf(adapter, hp, spec, adapter_path, name=f"{name}-adapter")
        notes.append(f"adapter GGUF: {scaling_note(adapter)}")

    train_rows, held_rows = load_rows(src.run_config, notes)
    modelfile = write_modelfile(gguf_path, adapter_path, src, formatter, vocab.add_bos, train_rows, held_rows, notes)
    from common.structured.ollama import export_schema

    # The schema Ollama's `format` needs, beside the Modelfile (staged and published with it).
    run_dir = src.out_dir.parent if src.run_config else None
    schema_file = export_schema(gguf_path.parent, run_dir, src.system, notes)
    report = None
    if cfg.verify:
        report = _verify(cfg, src, formatter, quant, gguf_path, adapter_path, held_rows, notes, vocab.raw_text_exact)
    return report, modelfile, held_rows, schema_file


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
    header = f"{src.name}: {MODELFILE_MARK}\nollama create {slug(src.name)} -f Modelfile"
    text = render_modelfile(f"./{gguf_path.name}", adapter=f"./{adapter_path.name}" if adapter_path else None,
                            template=template, system=system, stops=stops, parameters=params, header=header)
    path = gguf_path.with_name("Modelfile")
    write_text(path, text)
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

    def body(cfg: ExportConfig) -> int:
        result = run(cfg)
        if result.published:
            return 0
        print(f"error: verification failed ({'; '.join(result.report.failures[:3]) or 'see verify.json'}); "
              f"the export is kept in {result.gguf.parent} for inspection and the published files are "
              "unchanged (--force publishes it anyway)", file=sys.stderr)
        return 1

    return main_for(build_parser, ExportConfig, body, argv)
