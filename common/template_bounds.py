"""A Jinja sandbox with a budget: chat templates come from model repositories and
``--chat-template`` files, so rendering one must not exhaust memory or run forever.

Jinja's ``ImmutableSandboxedEnvironment`` stops attribute escapes and mutation, not cost:
``{{ 'a' * 99999999999 }}`` raises MemoryError and nested ``range(100000)`` loops run for
hours. :class:`BoundedEnvironment` adds, per render:

- every ``for`` loop's iterable is wrapped (an AST rewrite at compile time) in a counter
  that also checks the clock, so an empty-bodied loop still spends its budget;
- ``*``, ``**``, ``+`` and ``%`` are intercepted and refused before a result over the size
  limit is built; every ``~`` operand is size-checked;
- padding methods and filters (``center``, ``ljust``, ``format`` ...) are refused widths
  over the size limit; every call and attribute lookup also checks the clock;
- the output is streamed and counted.

Exceeding any bound raises :class:`TemplateTooExpensive`; MemoryError and RecursionError
(a recursive macro) are reported the same way by the caller.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OUTPUT_CHARS = 4_000_000  # one render's text; also the largest string or list a template may build
MAX_ITERATIONS = 1_000_000  # loop iterations per render, all loops together
MAX_SECONDS = 10.0  # wall time per render (a normal chat template renders in well under 10 ms)
MAX_RANGE = 100_000  # items in one range(), as jinja's own sandbox allows

# str methods whose integer arguments are widths of the result
_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}
_BIG_NUMBER = re.compile(r"\d{7,}")  # a width or precision of 1,000,000 or more in a format string


class TemplateTooExpensive(Exception):
    """A render went over one of the bounds; the message says which."""


class _Budget:
    def __init__(self):
        self.deadline = time.monotonic() + MAX_SECONDS
        self.iterations = 0

    def tick(self, n: int = 1) -> None:
        self.iterations += n
        if self.iterations > MAX_ITERATIONS:
            raise TemplateTooExpensive(f"more than {MAX_ITERATIONS:,} loop iterations")
        if time.monotonic() > self.deadline:
            raise TemplateTooExpensive(f"rendering took more than {MAX_SECONDS:g} s")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_size(value: Any, what: str) -> Any:
    if _size(value) > MAX_OUTPUT_CHARS:
        raise TemplateTooExpensive(f"{what} of {_size(value):,} items (limit {MAX_OUTPUT_CHARS:,})")
    return value


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus per-render bounds on iterations, sizes and time."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._local = threading.local()  # one budget per rendering thread (serve renders concurrently)
        self.globals["range"] = self._range
        for name in ("center", "indent", "format", "truncate", "wordwrap"):
            self.filters[name] = self._width_checked(self.filters[name])

    # -- the budget ---------------------------------------------------------

    def _budget(self) -> _Budget:
        budget = getattr(self._local, "budget", None)
        if budget is None:  # rendered without render_bounded (e.g. a macro called from Python)
            budget = self._local.budget = _Budget()
        return budget

    def render_bounded(self, template, **variables) -> str:
        """Render ``template`` streaming, with a fresh budget; raises TemplateTooExpensive."""
        self._local.budget = _Budget()
        try:
            out, size = [], 0
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateTooExpensive(f"output longer than {MAX_OUTPUT_CHARS:,} characters")
                out.append(chunk)
            return "".join(out)
        finally:
            self._local.budget = None

    # -- compile-time rewrite -------------------------------------------------

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = self._wrap("_bounded_iter", loop.iter)
        for concat in tree.find_all(nodes.Concat):
            concat.nodes = [self._wrap("_bounded_value", n) for n in concat.nodes]
        return tree

    @staticmethod
    def _wrap(hook: str, node):
        return nodes.Call(nodes.EnvironmentAttribute(hook), [node], [], None, None, lineno=node.lineno)

    def _bounded_iter(self, iterable):
        budget = self._budget()
        for item in iterable:
            budget.tick()
            yield item

    def _bounded_value(self, value):
        return _check_size(value, "a concatenated value")

    # -- runtime hooks --------------------------------------------------------

    def _range(self, *args):
        rng = range(*args)
        if len(rng) > MAX_RANGE:
            raise TemplateTooExpensive(f"range() of {len(rng):,} items (limit {MAX_RANGE:,})")
        return rng

    def call_binop(self, context, operator, left, right):
        self._budget().tick(0)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                    raise TemplateTooExpensive(f"a repetition of {len(seq) * n:,} items "
                                               f"(limit {MAX_OUTPUT_CHARS:,})")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 1024 \
                    and abs(left) not in (0, 1):
                raise TemplateTooExpensive(f"a power with exponent {right}")
        elif operator == "%" and isinstance(left, str) and _BIG_NUMBER.search(left):
            raise TemplateTooExpensive("a % format with a width over a million")
        elif operator == "+" and _size(left) + _size(right) > MAX_OUTPUT_CHARS:
            raise TemplateTooExpensive(f"a sum of {_size(left) + _size(right):,} items")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        __self._budget().tick(0)
        name = getattr(__obj, "__name__", "")
        if isinstance(getattr(__obj, "__self__", None), str):
            if name in _WIDTH_METHODS:
                __self._check_widths(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self._budget().tick(0)
        # the sandbox wraps str.format itself, so the format string is checked where it is looked up
        if isinstance(obj, str) and attribute in ("format", "format_map") and _BIG_NUMBER.search(obj):
            raise TemplateTooExpensive("a format string with a width over a million")
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._budget().tick(0)
        return super().getitem(obj, argument)

    @staticmethod
    def _check_widths(args, kwargs) -> None:
        for v in (*args, *kwargs.values()):
            if isinstance(v, int) and v > MAX_OUTPUT_CHARS:
                raise TemplateTooExpensive(f"a width of {v:,} (limit {MAX_OUTPUT_CHARS:,})")

    def _width_checked(self, fn):
        def filt(value, *args, **kwargs):
            self._check_widths(args, kwargs)
            if isinstance(value, str) and fn.__name__.endswith("format") and _BIG_NUMBER.search(value):
                raise TemplateTooExpensive("a format string with a width over a million")
            return fn(value, *args, **kwargs)

        # jinja passes the environment/context to filters marked for it; keep the marks.
        filt.__dict__.update(fn.__dict__)
        filt.__name__ = fn.__name__
        return filt
