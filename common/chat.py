"""``llm-ft chat``: talk to a run, a model or a GGUF in the terminal, tokens streamed as they come.

Interactive mode keeps the conversation (multi-turn) and understands ``/reset``,
``/system TEXT`` and ``/exit``. One-shot mode (``--prompt TEXT``) prints only the answer
on stdout, for scripts. A run is loaded as base + adapter without merging.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TextIO

from common.backends import BackendName
from common.command import main_for, make_parser
from common.config import opt, register
from common.prompts import TEMPLATE_NAMES

HELP = """commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt and start a new conversation (/system alone shows it)
  /exit          leave (also /quit, Ctrl-D)"""


@register
@dataclass
class ChatConfig:
    target: str = opt(help="a run directory, a model (Hub id, HF or merged directory, 'default') or a .gguf file",
                      positional=True)
    prompt: str | None = opt(None, "one-shot: answer this message, print only the answer to stdout, and exit")
    system: str | None = opt(None, "system prompt text (default: the run's; none for a plain model); '' for none")
    temperature: float = opt(0.0, "sampling temperature; 0 is greedy", min=0)
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability", gt=0, max=1)
    max_new_tokens: int = opt(512, "longest answer, in tokens", min=1)
    seed: int = opt(0, "random seed for sampling (temperature > 0)", min=0)
    chat_template: str | None = opt(None, f"override the chat template: {TEMPLATE_NAMES} or a .jinja file")
    backend: BackendName = opt("auto", "engine for runs and models (GGUF files use llama.cpp); "
                                                  "auto = the run's backend, else MLX on Apple Silicon, else torch")
    tokenizer: str | None = opt(None, "Hugging Face tokenizer directory whose chat template renders prompts for a GGUF")
    n_ctx: int = opt(4096, "llama.cpp context length in tokens", min=1)
    format: str | None = opt(None, "answer in a JSON schema, as Ollama's format does: 'schema' (the run's schema, "
                             "or export/schema.json beside a GGUF) or a .json file; shows the enum field's top 3 values")
    threshold: float | None = opt(None, "with --format: an enum value below this probability becomes the schema's "
                                        "fallback value (e.g. unknown)", min=0, max=1)


class ChatSession:
    """A conversation with one generator: the history, the system prompt and the slash commands."""

    def __init__(self, generator, cfg: ChatConfig, out: TextIO, ui):
        self.gen, self.cfg, self.out, self.ui = generator, cfg, out, ui
        self.history: list[dict[str, str]] = []
        self.turns = 0  # answers given in this session (a seed per turn keeps sampling varied yet reproducible)
        self.fmt = None  # common.structured.AnswerFormat when answers follow a schema (--format)

    def reply(self, text: str) -> str:
        """Answer one user message, streaming it to ``out``; the exchange joins the history."""
        self.history.append({"role": "user", "content": text})

        def show(piece: str) -> None:
            self.out.write(piece)
            self.out.flush()

        try:
            answer = self.gen.generate(self.history, max_new_tokens=self.cfg.max_new_tokens,
                                       temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                       seed=self.cfg.seed + self.turns, stream=None if self.fmt else show)
            if self.fmt is not None:  # the answer is shown once its confidence (and any fallback) is known
                answer = self.structured(answer)
                show(answer)
        except BaseException:
            self.history.pop()  # a failed or interrupted turn leaves no half exchange behind
            raise
        self.out.write("\n")
        self.out.flush()
        self.history.append({"role": "assistant", "content": answer})
        self.turns += 1
        return answer

    def structured(self, answer: str) -> str:
        """The answer after --threshold, with the enum field's top 3 values on the terminal (not stdout)."""
        from rich.markup import escape

        from common.structured.classify import confidence_line

        text, line = confidence_line(self.gen, self.history, answer, self.fmt, self.cfg.threshold)
        if line:
            self.ui.print(f"[dim]{escape(line)}[/]")
        return text

    def handle(self, line: str) -> bool:
        """One line of input: a command or a message. False when the user asked to leave."""
        text = line.strip()
        if not text:
            return True
        if text in ("/exit", "/quit", "/bye"):
            return False
        if text == "/reset":
            self.history.clear()
            self.ui.print("[dim]conversation cleared[/]")
        elif text == "/system" or text.startswith("/system "):
            new = text[len("/system"):].strip()
            if not new:
                self.ui.print(f"[dim]system prompt:[/] {self.gen.system_prompt or '(none)'}")
            else:
                self.gen.system_prompt = new
                self.history.clear()
                self.ui.print("[dim]system prompt set; conversation cleared[/]")
        elif text in ("/help", "/?"):
            self.ui.print(HELP)
        elif text.startswith("/") and " " not in text:
            self.ui.print(f"[red]unknown command {text}[/]\n{HELP}")
        else:
            self.reply(text)
        return True


def run(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from rich.console import Console
    from rich.markup import escape

    from common.generation import load_generator

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    ui = Console(stderr=True, highlight=False)
    gen = load_generator(cfg.target, backend=cfg.backend, system_prompt=cfg.system, chat_template=cfg.chat_template,
                         tokenizer=cfg.tokenizer, n_ctx=cfg.n_ctx)
    try:
        session = ChatSession(gen, cfg, stdout, ui)
        from common.structured.classify import setup_format

        session.fmt = setup_format(gen, cfg.format, cfg.threshold)
        for note in session.fmt.notes if session.fmt else []:
            ui.print(f"[yellow]note:[/] {escape(note)}")
        if cfg.prompt is not None:
            session.reply(cfg.prompt)
            return 0
        info = gen.describe()
        ui.print(f"[bold]{escape(info['name'])}[/] ({info['backend']}"
                 + (", adapter" if info.get("adapter") else "") + ")"
                 + (f"; system prompt: {escape(gen.system_prompt[:60])}{'...' if len(gen.system_prompt) > 60 else ''}"
                    if gen.system_prompt else "; no system prompt"))
        ui.print("[dim]/reset, /system TEXT, /exit; Ctrl-D leaves[/]")
        interactive = stdin.isatty()
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        while True:
            if interactive:
                try:
                    line = input(">>> ")
                except EOFError:
                    break
            else:
                line = stdin.readline()
                if not line:  # end of input
                    break
            try:
                if not session.handle(line):
                    break
            except KeyboardInterrupt:  # stop this answer, keep the session
                stdout.write("\n")
                ui.print("[dim](interrupted)[/]")
        return 0
    finally:
        gen.close()


def build_parser():
    parser = make_parser("chat", "Chat in the terminal with a run (base + adapter), a model or a GGUF, tokens streamed.",
                         ChatConfig)
    parser.epilog = HELP.replace("commands:", "interactive commands:")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv=None) -> int:
    return main_for(build_parser, ChatConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
