"""Find the files a command names by default, where the user's data says they are.

``--system-prompt-file`` defaults to ``system_prompt.txt``. Run from the project folder it
is there; run elsewhere on a copy of ``data/`` (as data/README.md describes it: "the
toolkit prepends ``../system_prompt.txt``") it lies beside the data or one folder up.
The default is looked up in the current directory, then beside each data source, then in
that folder's parent; a missing file names every absolute path searched.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError

DEFAULT_SYSTEM_PROMPT = "system_prompt.txt"


def system_prompt_candidates(spec: str, data: list[str], cwd: Path | None = None) -> list[Path]:
    """Where ``spec`` may be, first match wins: as given, then (for the default name) near the data."""
    from common.data import parse_source

    first = Path(spec) if Path(spec).is_absolute() else (cwd or Path.cwd()) / spec
    found = [first.absolute()]
    if spec != DEFAULT_SYSTEM_PROMPT:  # a name the user chose is taken literally
        return found
    for source in data:
        path, _ = parse_source(str(source))
        if not path.exists():
            continue  # a Hub dataset id, or a missing path (reported by the data loader)
        folder = (path if path.is_dir() else path.parent).absolute()
        for d in (folder, folder.parent):
            c = d / DEFAULT_SYSTEM_PROMPT
            if c not in found:
                found.append(c)
    return found


def find_system_prompt(spec: str | None, data: list[str], cwd: Path | None = None) -> Path | None:
    """The system prompt file to read (None for ``''``/None); UserError naming every path searched."""
    if spec in (None, ""):
        return None
    candidates = system_prompt_candidates(spec, data, cwd)
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"{spec}: system prompt file not found (set --system-prompt-file '' to use none)",
                    [f"searched {c}" for c in candidates])


def load_for_data(spec: str | None, data: list[str]) -> tuple[str | None, Path | None]:
    """(text, path) of the system prompt for a run on ``data``."""
    from common.prompts import load_system_prompt

    path = find_system_prompt(spec, data)
    return (load_system_prompt(path), path) if path is not None else (None, None)
