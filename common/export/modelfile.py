"""The Ollama Modelfile: pure functions, no I/O.

- TEMPLATE: an Ollama Go template derived from the chat template for the families we
  know (chatml, llama3, gemma, mistral, phi3), detected from the template text. Each
  family is one :class:`ChatFamily` of literal pieces; :func:`go_template` writes the
  Go template from it and :func:`render_family` renders the same pieces in Python, so
  :func:`derive_template` can check, on probe conversations and the run's own rows,
  that the result equals the tokenizer's chat template text for text. Where it does
  not, no TEMPLATE is written (the GGUF's embedded template is the fallback) and the
  reason is returned. A test renders the Go template with Go's own text/template.
- SYSTEM: the training system prompt, byte for byte.
- PARAMETER stop for each end-of-turn token the template uses, and parameters fitting
  the task (JSON answers: greedy, short num_predict).

Ollama's parser keeps ``\"\"\"...\"\"\"`` values verbatim, but a value containing ``\"\"\"``
ends early, and characters Go's ``strconv.IsPrint`` rejects (zero-width joiners,
non-breaking spaces, control characters) are silently dropped: such text is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.errors import UserError


@dataclass(frozen=True)
class ChatFamily:
    """The literal text around each turn in one chat-template family."""

    name: str
    markers: tuple[str, ...]  # all present in a template of this family
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # what add_generation_prompt appends
    eot: str  # the end-of-turn token (PARAMETER stop)
    system: tuple[str, str] | None = None  # a system turn's wrapper; None: merged into a user turn
    system_into: str = "first_user"  # with system=None: "first_user" (Gemma) or "last_user" (Mistral v0.3)
    system_sep: str = "\n\n"  # between a merged system prompt and the user text


FAMILIES: tuple[ChatFamily, ...] = (
    ChatFamily("chatml", ("<|im_start|>", "<|im_end|>"),
               user=("<|im_start|>user\n", "<|im_end|>\n"), assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
               generation="<|im_start|>assistant\n", eot="<|im_end|>", system=("<|im_start|>system\n", "<|im_end|>\n")),
    ChatFamily("llama3", ("<|start_header_id|>", "<|eot_id|>"),
               user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
               assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
               generation="<|start_header_id|>assistant<|end_header_id|>\n\n", eot="<|eot_id|>",
               system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")),
    ChatFamily("gemma", ("<start_of_turn>", "<end_of_turn>"),
               user=("<start_of_turn>user\n", "<end_of_turn>\n"), assistant=("<start_of_turn>model\n", "<end_of_turn>\n"),
               generation="<start_of_turn>model\n", eot="<end_of_turn>", system=None, system_into="first_user"),
    ChatFamily("mistral", ("[INST]", "[/INST]"),
               user=("[INST] ", "[/INST]"), assistant=(" ", "</s>"), generation="", eot="</s>",
               system=None, system_into="last_user"),
    ChatFamily("phi3", ("<|user|>", "<|assistant|>", "<|end|>"),
               user=("<|user|>\n", "<|end|>\n"), assistant=("<|assistant|>\n", "<|end|>\n"),
               generation="<|assistant|>\n", eot="<|end|>", system=("<|system|>\n", "<|end|>\n")),
)


def detect_family(chat_template: str) -> ChatFamily | None:
    """The family whose marker tokens all appear in the chat template text, if any."""
    for fam in FAMILIES:
        if all(m in chat_template for m in fam.markers):
            return fam
    return None


# ---------------------------------------------------------------------------
# rendering: Python and Go from the same pieces


def render_family(fam: ChatFamily, system: str | None, messages: list[dict[str, Any]], *, prefix: str = "") -> str:
    """What the family's Go template renders for Ollama's data (System + user/assistant
    Messages, ending with a user turn, so with the generation prompt)."""
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    out = [prefix]
    if system and fam.system:
        out.append(fam.system[0] + system + fam.system[1])
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    merge_at = (users[0] if fam.system_into == "first_user" else users[-1]) if users and system and not fam.system else -1
    for i, m in enumerate(turns):
        pre, post = fam.user if m["role"] == "user" else fam.assistant
        text = (system + fam.system_sep + m["content"]) if i == merge_at else m["content"]
        out.append(pre + text + post)
    if turns and turns[-1]["role"] != "assistant":
        out.append(fam.generation)
    return "".join(out)


def _literal(text: str) -> str:
    if "{{" in text or "}}" in text:
        raise UserError(f"chat template piece {text!r} contains Go template delimiters")
    return text


def go_template(fam: ChatFamily, *, prefix: str = "") -> str:
    """The Ollama TEMPLATE (Go text/template) for ``fam``.

    Messages mode mirrors Ollama's data: ``.System`` holds the system prompt, and
    ``.Messages`` (user/assistant; system turns are skipped) ends with the turn to
    answer. The legacy branch (``.Prompt``/``.Response``) renders one exchange.
    Literal text always sits right before an action without ``{{-``, so whitespace
    trimming never eats a newline that belongs to the format.
    """
    u0, u1 = map(_literal, fam.user)
    a0, a1 = map(_literal, fam.assistant)
    gen, pre = _literal(fam.generation), _literal(prefix)
    if fam.system:
        s0, s1 = map(_literal, fam.system)
        system_block = f"{{{{ if .System }}}}{s0}{{{{ .System }}}}{s1}{{{{ end }}}}"
        user_text = "{{ .Content }}"
        legacy_user = "{{ .Prompt }}"
    else:
        sep = _literal(fam.system_sep)
        system_block = ""
        if fam.system_into == "first_user":
            user_text = f"{{{{ if $sys }}}}{{{{ $sys }}}}{sep}{{{{ end }}}}{{{{ $sys = \"\" }}}}{{{{ .Content }}}}"
        else:
            user_text = f"{{{{ if and $.System $last }}}}{{{{ $.System }}}}{sep}{{{{ end }}}}{{{{ .Content }}}}"
        legacy_user = f"{{{{ if .System }}}}{{{{ .System }}}}{sep}{{{{ end }}}}{{{{ .Prompt }}}}"
    lines = [
        "{{- if .Messages }}",
        f"{{{{- $sys := .System }}}}{pre}{system_block}",
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        f"{{{{- if eq .Role \"user\" }}}}{u0}{user_text}{u1}"
        f"{{{{ else if eq .Role \"assistant\" }}}}{a0}{{{{ .Content }}}}{a1}{{{{ end }}}}",
        f"{{{{- if and $last (ne .Role \"assistant\") }}}}{gen}{{{{ end }}}}",
        "{{- end }}",
        "{{- else }}",
        f"{{{{- $sys := .System }}}}{pre}{system_block}",
        f"{{{{- if .Prompt }}}}{u0}{legacy_user}{u1}{{{{ end }}}}{gen}{{{{ .Response }}}}{{{{ if .Response }}}}{a1}{{{{ end }}}}",
        "{{- end }}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# derivation with a check


PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Set a timer for 10 minutes."}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": '{"intent": "greet"}'},
     {"role": "user", "content": "what's the weather in Paris?\nTomorrow, please."}],
)


@dataclass
class DerivedTemplate:
    family: str | None
    template: str | None  # the Go TEMPLATE, or None when it cannot be derived
    stops: list[str]
    note: str


def jinja_renderer(chat_template: str, special: dict[str, str]):
    """``render(messages) -> text`` with the tokenizer's chat template and the generation prompt."""
    from common.prompts import render

    return lambda messages: render(chat_template, messages, add_generation_prompt=True, special=special)


def renders_bos(chat_template: str, special: dict[str, str]) -> bool:
    """Whether the template itself writes ``bos_token`` first (told apart from a turn token that
    happens to be the BOS, as in ChatML models whose BOS is <|im_start|>)."""
    sentinel = "\x00bos\x00"
    probe = jinja_renderer(chat_template, {**special, "bos_token": sentinel})
    return probe([{"role": "user", "content": "x"}]).startswith(sentinel)


def derive_template(chat_template: str, special: dict[str, str], *, system: str | None, add_bos: bool = False,
                    extra_stops: list[str] = (), conversations: list[list[dict[str, str]]] = ()) -> DerivedTemplate:
    """An Ollama TEMPLATE equivalent to ``chat_template``, checked on probe and data conversations.

    ``special`` holds the tokenizer's bos_token/eos_token/... texts. A BOS the template
    renders is left out of the TEMPLATE when llama.cpp adds the BOS token itself
    (``add_bos``), so the token ids match. ``extra_stops`` are further end-of-turn
    tokens (e.g. an EOS the template emits).
    """
    render_jinja = jinja_renderer(chat_template, special)
    bos_text = special.get("bos_token") or ""
    fam = detect_family(chat_template)
    if fam is None:
        return DerivedTemplate(None, None, list(dict.fromkeys(extra_stops)),
                               "chat template family not recognised (chatml, llama3, gemma, mistral, phi3); "
                               "no TEMPLATE written, Ollama falls back to the template embedded in the GGUF")
    stops = list(dict.fromkeys([fam.eot, *extra_stops]))
    bos_in_template = bool(bos_text) and renders_bos(chat_template, special)
    prefix = bos_text if bos_in_template and not add_bos else ""
    checked = 0
    for msgs in list(PROBES) + list(conversations):
        full = ([{"role": "system", "content": system}] if system else []) + [m for m in msgs if m["role"] != "system"]
        want = render_jinja(full)
        if bos_in_template and add_bos and want.startswith(bos_text):
            want = want[len(bos_text):]  # llama.cpp adds the BOS token itself
        got = render_family(fam, system, full, prefix=prefix)
        if got != want:
            return DerivedTemplate(fam.name, None, stops,
                                   f"{fam.name}-style template, but it renders differently from the derived one "
                                   f"(expected {want[:80]!r}..., derived {got[:80]!r}...); no TEMPLATE written, "
                                   "Ollama falls back to the template embedded in the GGUF")
        checked += 1
    return DerivedTemplate(fam.name, go_template(fam, prefix=prefix), stops,
                           f"{fam.name} TEMPLATE, equal to the chat template on {checked} conversations")


def default_system(chat_template: str, special: dict[str, str]) -> str | None:
    """The system prompt a chat template inserts when a conversation has none (SmolLM2, Qwen2.5), or None.

    Ollama only renders a system turn when there is a SYSTEM, so a model trained without
    one gets this text as its SYSTEM to see the same prompt it was trained on.
    """
    fam = detect_family(chat_template)
    if fam is None or fam.system is None:
        return None
    text = jinja_renderer(chat_template, special)([{"role": "user", "content": "x"}])
    pre, post = fam.system
    start, user_at = text.find(pre), text.find(fam.user[0])
    if start < 0 or (0 <= user_at < start):
        return None
    end = text.find(post, start + len(pre))
    return text[start + len(pre): end] if end > 0 else None


# ---------------------------------------------------------------------------
# parameters


def task_parameters(answers: list[str], answer_tokens: list[int], max_seq_length: int) -> tuple[dict[str, Any], str]:
    """PARAMETERs for the task seen in the data, and a one-line reason.

    JSON answers (a classifier or extractor): greedy decoding, num_predict twice the
    longest answer (at least 64 tokens). num_ctx covers the training length, rounded
    up to 256 tokens.
    """
    import json

    params: dict[str, Any] = {"num_ctx": max(512, int(math.ceil(max_seq_length / 256) * 256))}
    reason = f"num_ctx from max_seq_length {max_seq_length}"

    def is_json(text: str) -> bool:
        try:
            return isinstance(json.loads(text), (dict, list))
        except ValueError:
            return False

    if answers and all(is_json(a) for a in answers):
        longest = max(answer_tokens) if answer_tokens else 64
        params = {"temperature": 0, "num_predict": max(64, 2 * longest), **params}
        reason = (f"all {len(answers)} answers are JSON: temperature 0, num_predict {params['num_predict']} "
                  f"(longest answer {longest} tokens); {reason}")
    return params, reason


# ---------------------------------------------------------------------------
# the file


def _check_block(kind: str, text: str) -> None:
    problems = []
    if '"""' in text:
        problems.append(f'{kind} contains """, which ends a Modelfile value early')
    for lineno, line in enumerate(text.split("\n"), 1):
        for ch in line:
            if ch not in "\t\r" and not ch.isprintable():
                problems.append(f"{kind} line {lineno}: character U+{ord(ch):04X} would be dropped by Ollama's "
                                "Modelfile parser (it keeps printable characters only)")
                break
    if problems:
        raise UserError(f"the {kind} cannot be written into a Modelfile unchanged", problems)


def _arg(kind: str, value: str) -> str:
    if "\n" in value or "\r" in value or '"' in value:
        raise UserError(f"{kind} {value!r}: newlines and double quotes cannot appear in a Modelfile argument")
    return f'"{value}"' if (" " in value or "\t" in value) else value


def render_modelfile(model: str, *, adapter: str | None = None, template: str | None = None,
                     system: str | None = None, stops: list[str] = (), parameters: dict[str, Any] | None = None,
                     header: str = "") -> str:
    """The Modelfile text. Paths are written as given (relative ones resolve beside the Modelfile)."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    lines.append(f"FROM {_arg('FROM', model)}")
    if adapter:
        lines.append(f"ADAPTER {_arg('ADAPTER', adapter)}")
    if template is not None:
        _check_block("TEMPLATE", template)
        lines.append(f'TEMPLATE """{template}"""')
    if system is not None:
        _check_block("SYSTEM", system)
        lines.append(f'SYSTEM """{system}"""')
    for stop in stops:
        if "\n" in stop or '"' in stop:
            raise UserError(f"stop token {stop!r} cannot be written into a Modelfile")
        lines.append(f'PARAMETER stop "{stop}"')
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
