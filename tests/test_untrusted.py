"""Untrusted input stays cheap: chat templates render within bounds of output, loops and
time, and a JSONL row is measured (bytes, nesting) before it is parsed or tokenized. Each
failure is one ``error:`` line naming the file, never a traceback."""

from __future__ import annotations

import json
import time

import pytest

from common.errors import UserError
from common.prompts import NAMED_TEMPLATES, ChatFormatter, render
from common.rows import Conversation, Source

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
# Each of these ran out of memory (MemoryError traceback) or ran for hours before the bounds.
EXPENSIVE = {
    "string repetition": "{{ 'a' * 99999999999 }}",
    "repetition, int first": "{{ 99999999999 * 'a' }}",
    "list repetition": "{{ [1] * 99999999999 }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge range": "{% for i in range(99999999999) %}{% endfor %}",
    "doubling by ~": "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}"
                     "{% endfor %}{{ ns.x }}",
    "doubling by +": "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}"
                     "{% endfor %}{{ ns.x }}",
    "loop over a long string": "{% for c in 'abcd' * 1000000 %}{% for d in 'abcd' * 1000000 %}{% endfor %}"
                               "{% endfor %}",
    "padding method": "{{ 'x'.center(99999999999) }}",
    "padding filter": "{{ 'x'|center(99999999999) }}",
    "% width": "{{ '%999999999s' % 'a' }}",
    "format filter width": "{{ '%999999999s'|format('a') }}",
    "str.format width": "{{ '{:999999999}'.format('a') }}",
    "big power": "{{ 7 ** 99999999 }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "long output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("name", list(EXPENSIVE))
def test_expensive_template_is_refused_quickly(name):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"^evil\.jinja: chat template too expensive \(") as err:
        render(EXPENSIVE[name], CHAT, origin="evil.jinja")
    assert time.monotonic() - start < 15, name  # the render-time bound is 10 s; most stop at once
    assert "Traceback" not in str(err.value)


def test_ordinary_templates_still_render():
    assert render(NAMED_TEMPLATES["chatml"], CHAT, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n")
    ok = "{{ 'ab' * 3 }}{% for x in 'xy' * 2 %}{{ loop.index }}{% endfor %}{{ '%5s|' % 'a' }}{{ 2 ** 10 }}"
    assert render(ok, CHAT) == "ababab1234    a|1024"
    many = "{% for i in range(1000) %}{% for j in range(100) %}.{% endfor %}{% endfor %}"
    assert render(many, CHAT) == "." * 100_000  # 100k iterations and characters: well inside the bounds


def test_cli_names_the_template_file(tmp_path, tiny_model_dir, capsys):
    # Before the bounds: {{ 'a' * 99999999999 }} in --chat-template gave a MemoryError traceback.
    from common.check_data import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    evil = tmp_path / "evil.jinja"
    evil.write_text(EXPENSIVE["string repetition"])
    code = main([str(data), "--model", str(tiny_model_dir), "--chat-template", str(evil),
                 "--system-prompt-file", ""])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert f"{evil}: chat template too expensive" in err


def test_formatter_names_the_models_template_file(tiny_tokenizer_dir):
    from common.models import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.chat_template = EXPENSIVE["nested loops"]
    with pytest.raises(UserError, match="chat template too expensive") as err:
        ChatFormatter(tok).encode(Conversation(CHAT))
    assert str(tiny_tokenizer_dir) in err.value.message


# ---------------------------------------------------------------------------
# JSONL rows


def test_deep_and_long_rows_are_errors_with_file_and_line(tmp_path):
    from common.data import load_file
    from common.row_bounds import MAX_DEPTH, MAX_LINE_BYTES

    good = json.dumps({"messages": CHAT})
    path = tmp_path / "train.jsonl"
    with path.open("w") as f:
        f.write(good + "\n")
        f.write("[" * 200_000 + "]" * 200_000 + "\n")  # was a RecursionError traceback
        f.write('{"a": ' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1) + "\n")  # parses, but over our limit
        f.write(json.dumps({"messages": [{"role": "user", "content": "x" * MAX_LINE_BYTES}, CHAT[1]]}) + "\n")
        f.write(good + "\n")
    start = time.monotonic()
    rows, report = load_file(path)
    assert time.monotonic() - start < 5
    assert [r.source.line for r in rows] == [1, 5]
    assert report.errors == [
        f"{path}:2: JSON nested more than {MAX_DEPTH} levels deep (the limit for one row)",
        f"{path}:3: JSON nested more than {MAX_DEPTH} levels deep (the limit for one row)",
        f"{path}:4: line is 8.0 MiB, over the 8 MiB limit for one row",
    ]


def test_deep_element_of_a_json_array(tmp_path):
    from common.data import load_file

    path = tmp_path / "train.json"
    path.write_text("[" + json.dumps({"messages": CHAT}) + ",\n" + "[" * 200_000 + "]" * 200_000 + "]")
    rows, report = load_file(path)
    assert len(rows) == 1 and report.errors == [f"{path}:2: JSON nested more than 64 levels deep "
                                                "(the limit for one row)"]


def test_check_data_on_a_50_mb_row_is_fast(tmp_path, tiny_model_dir, capsys):
    # Before: 94 s and 11.7 GB, the whole row tokenized before truncation.
    from common.check_data import main

    data = tmp_path / "data"
    data.mkdir()
    with (data / "train.jsonl").open("w") as f:
        f.write(json.dumps({"messages": CHAT}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "set a timer " * 4_400_000}, CHAT[1]]}) + "\n")
    start = time.monotonic()
    code = main([str(data), "--model", str(tiny_model_dir), "--system-prompt-file", ""])
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert code == 2 and "Traceback" not in err
    assert f"{data / 'train.jsonl'}:2: line is 50.4 MiB, over the 8 MiB limit for one row" in err


def test_long_rows_are_tokenized_only_as_far_as_max_seq_length(tiny_tokenizer_dir):
    from common.models import load_tokenizer
    from common.prompts import encode_split
    from common.row_bounds import cut_row, max_token_chars

    tok = load_tokenizer(tiny_tokenizer_dir)
    fmt = ChatFormatter(tok)
    words = "set a timer for ten minutes please " * 300_000  # 10 M characters, about 3 M tokens
    long = Conversation([{"role": "user", "content": words}, {"role": "assistant", "content": "ok"}],
                        Source("f.jsonl", 1))
    max_len = 256
    start = time.monotonic()
    kept, stats = encode_split([long], fmt, max_len, "truncate")
    assert time.monotonic() - start < 10
    assert stats["overlong"] == 1 and stats["truncated"] == 1 and stats["tokens_max"] > max_len
    # The first max_len tokens are those of the whole row: the cut lies far past them.
    medium = Conversation([{"role": "user", "content": words[:200_000]}, {"role": "assistant", "content": "ok"}])
    assert cut_row(medium, (max_len + 64) * max_token_chars(tok)) is not None
    whole = fmt.encode(medium)
    assert stats["zero_supervised"] == 1 and not kept  # the answer was cut off: nothing to learn
    bounded = encode_split([medium], fmt, max_len, "truncate")[1]
    assert bounded["tokens_max"] < len(whole)  # measured on the cut row
    ids = fmt.encode(cut_row(medium, (max_len + 64) * max_token_chars(tok))).input_ids
    assert ids[:max_len] == whole.input_ids[:max_len]
    dropped = encode_split([long], fmt, max_len, "drop")[1]
    assert dropped["dropped"] == 1
    with pytest.raises(UserError, match=f"longer than max_seq_length={max_len}"):
        encode_split([long], fmt, max_len, "error")


def test_short_rows_are_not_cut(tiny_tokenizer_dir):
    from common.models import load_tokenizer
    from common.row_bounds import cut_row, max_token_chars

    tok = load_tokenizer(tiny_tokenizer_dir)
    assert max_token_chars(tok) >= len("<|im_start|>")
    assert cut_row(Conversation(CHAT), 10_000) is None
