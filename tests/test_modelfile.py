"""Modelfile: golden files, injection refused, and the derived TEMPLATE rendered by Go's
real text/template engine equal to the tokenizer's chat template, text for text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from common.errors import UserError
from common.export.modelfile import (
    FAMILIES,
    default_system,
    derive_template,
    detect_family,
    go_template,
    render_family,
    render_modelfile,
    task_parameters,
)
from common.prompts import NAMED_TEMPLATES, render

GOLDEN = Path(__file__).parent / "golden" / "modelfile"
GO_SOURCE = Path(__file__).parent / "go" / "render_template.go"
SYSTEM = 'You are an intent classifier.\nAnswer with JSON only, e.g. {"intent": "set_timer"}.'

# Reference chat templates, written as the model families publish them (simplified where
# they handle tools or images). SmolLM2's inserts a default system prompt.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# family -> (jinja template, bos text, eos text, llama.cpp adds BOS)
CASES = {
    "chatml": (NAMED_TEMPLATES["chatml"], "<|im_start|>", "<|im_end|>", False),
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>", False),
    "llama3": (NAMED_TEMPLATES["llama3"], "<|begin_of_text|>", "<|eot_id|>", True),
    "llama3-nobos": (NAMED_TEMPLATES["llama3"], "<|begin_of_text|>", "<|eot_id|>", False),
    "gemma": (GEMMA, "<bos>", "<eos>", True),
    "mistral": (MISTRAL, "<s>", "</s>", True),
    "phi3": (PHI3, "<s>", "<|endoftext|>", False),
}
CONVERSATIONS = [
    [{"role": "user", "content": "set a timer for ten minutes"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '{"intent": "greet", "slots": {}}'},
     {"role": "user", "content": "and the weather in Paris?\nTomorrow."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "unicode: été 東京 🚀"}],
]


def special(case: str) -> dict[str, str]:
    _, bos, eos, _ = CASES[case]
    return {"bos_token": bos, "eos_token": eos, "pad_token": "", "unk_token": ""}


def jinja(case: str):
    return lambda msgs: render(CASES[case][0], msgs, add_generation_prompt=True, special=special(case))


def strip_bos(case: str, text: str) -> str:
    """llama.cpp adds the BOS token itself when add_bos: the TEMPLATE must not render it."""
    template, bos, _, add_bos = CASES[case]
    return text[len(bos):] if add_bos and "bos_token" in template and text.startswith(bos) else text


def derived(case: str, system: str | None = SYSTEM):
    template, _, eos, add_bos = CASES[case]
    return derive_template(template, special(case), system=system, add_bos=add_bos,
                           extra_stops=[eos] if eos in template else [])


# ---------------------------------------------------------------------------
# Go's text/template


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """A function rendering (template, data) with Go's text/template, built once per session."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (scripts/setup-system.sh installs golang-go; CI has it)")
    d = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(d / "cache"), "GOPATH": str(d / "gopath"), "GO111MODULE": "off",
           "HOME": os.environ.get("HOME", str(d))}
    binary = d / "render_template"
    subprocess.run([go, "build", "-o", str(binary), str(GO_SOURCE)], check=True, env=env, capture_output=True)

    def run(template: str, data: dict) -> str:
        proc = subprocess.run([str(binary)], input=json.dumps({"template": template, "data": data}),
                              capture_output=True, text=True, encoding="utf-8")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return run


def ollama_data(system: str | None, messages: list[dict]) -> dict:
    """Ollama's messages-mode data: the Modelfile SYSTEM is prepended as a system message
    (server/routes.go) and also given as .System (template.collate)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + messages
    return {"System": system or "", "Messages": msgs}


@pytest.mark.parametrize("case", list(CASES))
def test_go_template_equals_chat_template(go_render, case):
    d = derived(case)
    assert d.template is not None, d.note
    for conv in CONVERSATIONS:
        want = strip_bos(case, jinja(case)([{"role": "system", "content": SYSTEM}, *conv]))
        assert go_render(d.template, ollama_data(SYSTEM, conv)) == want


@pytest.mark.parametrize("case", list(CASES))
def test_go_template_legacy_prompt_response(go_render, case):
    d = derived(case)
    conv = CONVERSATIONS[0]
    want = strip_bos(case, jinja(case)([{"role": "system", "content": SYSTEM}, *conv]))
    got = go_render(d.template, {"System": SYSTEM, "Prompt": conv[0]["content"], "Response": ""})
    assert got == want


@pytest.mark.parametrize("case", ["chatml", "llama3", "gemma", "mistral", "phi3"])
def test_go_template_without_system(go_render, case):
    d = derived(case, system=None)
    assert d.template is not None, d.note
    for conv in CONVERSATIONS:
        want = strip_bos(case, jinja(case)(conv))
        assert go_render(d.template, ollama_data(None, conv)) == want


def test_python_rendering_matches_go_for_every_family(go_render):
    for fam in FAMILIES:
        for conv in CONVERSATIONS:
            assert go_render(go_template(fam), ollama_data(SYSTEM, conv)) == render_family(fam, SYSTEM, conv)


# ---------------------------------------------------------------------------
# derivation


def test_detect_family():
    assert detect_family(NAMED_TEMPLATES["chatml"]).name == "chatml"
    assert detect_family(GEMMA).name == "gemma"
    assert detect_family(NAMED_TEMPLATES["alpaca"]) is None


def test_unknown_family_writes_no_template():
    d = derive_template(NAMED_TEMPLATES["alpaca"], {"bos_token": "<s>", "eos_token": "</s>"}, system=SYSTEM)
    assert d.template is None and "not recognised" in d.note


def test_template_that_differs_is_not_written():
    # SmolLM2's template inserts its own system prompt when there is none; a TEMPLATE without it would differ
    d = derived("smollm2", system=None)
    assert d.template is None and "renders differently" in d.note
    assert default_system(SMOLLM2, special("smollm2")) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system(NAMED_TEMPLATES["chatml"], special("chatml")) is None


def test_stops_are_end_of_turn_tokens_only():
    assert derived("chatml").stops == ["<|im_end|>"]
    assert derived("llama3").stops == ["<|eot_id|>"]
    assert derived("gemma").stops == ["<end_of_turn>"]
    assert derived("phi3").stops == ["<|end|>"]


def test_task_parameters():
    params, reason = task_parameters(['{"intent": "a"}', '{"intent": "b", "slots": {}}'], [6, 40], 1000)
    assert params == {"temperature": 0, "num_predict": 80, "num_ctx": 1024}
    assert "JSON" in reason
    params, _ = task_parameters(["Sure, here you go.", '{"a": 1}'], [5, 5], 300)
    assert params == {"num_ctx": 512}


# ---------------------------------------------------------------------------
# golden files and injection


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", ["chatml", "llama3", "gemma", "mistral", "phi3"])
def test_modelfile_golden(case):
    d = derived(case)
    params, _ = task_parameters(['{"intent": "set_timer"}'], [12], 1024)
    text = render_modelfile("./model-q8_0.gguf", template=d.template, system=SYSTEM, stops=d.stops,
                            parameters=params, header=f"llm-ft export ({case})\nollama create NAME -f Modelfile")
    _golden(f"{case}.Modelfile", text)


def test_modelfile_with_adapter_golden():
    text = render_modelfile("./base-f16.gguf", adapter="./adapter.gguf", template=derived("chatml").template,
                            system=SYSTEM, stops=["<|im_end|>"], parameters={"num_ctx": 512})
    _golden("adapter.Modelfile", text)


def ollama_parse(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile parser (parser/parser.go ParseFile), transcribed: a value ends at the
    first newline after which the trimmed buffer is a complete (quoted) value, and only
    spaces, newlines and runes Go's strconv.IsPrint accepts are kept."""
    def unquote(s):
        if s[:3] == '"""':
            return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
        if s[:1] == '"':
            return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
        return s, True

    commands, state, buf, name = [], "nil", "", ""
    for ch in text + "\n":
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif ch not in " \t\r\n":
                state, buf = "name", ch
        elif state == "comment":
            state = "nil" if ch in "\r\n" else "comment"
        elif state == "name":
            if ch.isalpha():
                buf += ch
            else:
                name, buf = buf.lower(), ""
                state = "param" if name == "parameter" else "value"
        elif state == "param":
            if ch in " \t":
                name, buf, state = buf, "", "value"
            else:
                buf += ch
        elif state == "value":
            if ch in "\r\n":
                value, ok = unquote(buf.strip())
                if ok:
                    commands.append(("model" if name == "from" else name, value))
                    state, buf = "nil", ""
                    continue
                buf += ch
            elif ch in " \t" or ch.isprintable():
                buf += ch
    return commands


def test_system_prompt_is_kept_byte_for_byte():
    system = "Line one.\n\n  indented line\twith tab\nquotes \" and ' and ``` fences; ends with a quote\""
    text = render_modelfile("m.gguf", system=system, stops=["<|im_end|>"], parameters={"temperature": 0})
    assert ollama_parse(text) == [("model", "m.gguf"), ("system", system), ("stop", "<|im_end|>"),
                                  ("temperature", "0")]


def test_golden_modelfiles_parse_as_ollama_reads_them():
    for path in GOLDEN.glob("*.Modelfile"):
        commands = dict(ollama_parse(path.read_text(encoding="utf-8")))
        assert commands["system"] == SYSTEM
        assert commands["template"].startswith("{{- if .Messages }}")


@pytest.mark.parametrize("system, problem", [
    ('Answer with """triple quotes"""', '"""'),
    ("zero\u200dwidth joiner", "U+200D"),
    ("non\u00a0breaking space", "U+00A0"),
    ("bell \x07", "U+0007"),
])
def test_unsafe_system_is_refused(system, problem):
    with pytest.raises(UserError) as exc:
        render_modelfile("m.gguf", system=system)
    assert problem in exc.value.render()


def test_directive_injection_through_arguments_is_refused():
    with pytest.raises(UserError):
        render_modelfile("m.gguf\nPARAMETER temperature 2")
    with pytest.raises(UserError):
        render_modelfile("m.gguf", stops=['x"\nSYSTEM """evil'])
    # a path with spaces is quoted so Ollama reads it whole
    assert render_modelfile("./my model.gguf").splitlines()[0] == 'FROM "./my model.gguf"'
