"""The ``llm-ft`` console command: a table of subcommands, each a module with
``build_parser()``, ``run(cfg)`` and ``main(argv)``. Modules load lazily, so
``llm-ft --help`` imports neither torch nor mlx.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from common import __version__
from common.errors import UserError

# name -> (module, one-line summary). The summary is the help's single source.
COMMANDS: dict[str, tuple[str, str]] = {
    "check-data": ("common.check_data", "lint data files and show token statistics (no model is loaded)"),
    "train": ("common.train.cmd", "fine-tune a model with LoRA/QLoRA (MLX or PyTorch backend)"),
    "eval": ("common.evaluate.cmd", "measure a model, run or GGUF on a test split (JSON metrics, loss)"),
    "chat": ("common.chat", "chat in the terminal with a model, run or GGUF"),
    "merge": ("common.export.merge_cmd", "merge a run's adapter into the original base weights"),
    "export": ("common.export.cmd", "write a GGUF + Ollama Modelfile, verified in llama.cpp"),
    "models": ("common.models.cmd", "list, import and inspect base models"),
    "serve": ("common.serve", "a local web page to try a model (Gradio)"),
    "push": ("common.push.cmd", "publish a run to the Hugging Face Hub (adapter, merged or GGUF) with a model card"),
    "completion": ("common.completion", "print a shell completion script (bash, zsh)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-ft",
        description="Fine-tune chat LLMs with LoRA on a laptop and ship them to Ollama.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'llm-ft COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"llm-ft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def run_command(main_fn: Callable[[], int | None], debug: bool) -> int:
    """Run a subcommand body: user errors become one message and exit 2, no traceback."""
    try:
        return int(main_fn() or 0)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the system refused (a path, not a bug of ours): one line, no traceback
        if exc.filename is None or debug:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc} (--debug shows where)", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        build_parser().parse_args(argv or ["--help"])
        return 0
    from common import quiet

    quiet.setup(quiet.wants_verbose(argv))
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from common.errors import nearest

        hint = nearest(name, COMMANDS)
        print(f"error: unknown command {name!r}" + (f" (did you mean {hint!r}?)" if hint else "") +
              "; run 'llm-ft --help'", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def entry() -> None:  # console_scripts entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()
