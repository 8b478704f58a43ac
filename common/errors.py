"""User-facing errors: one clear message, no traceback, non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a model).

    The CLI prints ``message`` and each of ``problems`` (``file:line: problem``)
    without a traceback and exits with status 2; ``--debug`` shows the traceback.
    """

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None, max_shown: int = 50):
        self.message = message
        self.problems = list(problems or [])
        self.max_shown = max_shown
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.message]
        shown = self.problems[: self.max_shown]
        lines += [f"  {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


def nearest(name: str, candidates) -> str | None:
    """The closest valid name to a misspelt one, or None when nothing is close."""
    import difflib

    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None
