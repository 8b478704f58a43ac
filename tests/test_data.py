"""The data layer: formats, lint messages (exact file:line), splits, sampling, leakage, schema, fingerprint."""

import json
from pathlib import Path

import pytest

from common.data import (
    find_schema,
    fingerprint,
    hold_out,
    load_file,
    load_splits,
    parse_source,
)
from common.errors import UserError
from common.prompts import encode_split, percentile
from common.rows import Conversation, Source, Text

CHAT = {"messages": [{"role": "user", "content": "set a timer"}, {"role": "assistant", "content": "ok"}]}


def jl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


def chat(user: str, answer, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def problems(report, severity="error"):
    return report.errors if severity == "error" else report.warnings


# ---------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("row, messages", [
    (CHAT, CHAT["messages"]),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "yo"}]},
     [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]),
    ({"prompt": "2+2?", "completion": "4"},
     [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]),
    ({"instruction": "Translate", "input": "chat", "output": "cat"},
     [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]),
    ({"instruction": "Say hi", "input": "", "output": "hi"},
     [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]),
])
def test_formats_become_conversations(tmp_path, row, messages):
    p = write(tmp_path, "d.jsonl", "\n" + jl(row))  # a leading blank line: line numbers still count it
    rows, report = load_file(p)
    assert report.problems == []
    assert rows == [Conversation(messages, Source(str(p), 2))]


def test_text_rows_and_chat_with_tools(tmp_path):
    p = write(tmp_path, "t.jsonl", jl({"text": "domain text"}))
    rows, report = load_file(p)
    assert rows == [Text("domain text", Source(str(p), 1))] and report.formats == {str(p): "text"}
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    row = {"tools": tools, "messages": [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "lookup", "arguments": {}}}]},
        {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]}
    rows, report = load_file(write(tmp_path, "tools.jsonl", jl(row)))
    assert report.problems == []
    assert rows[0].tools == tools and [m["role"] for m in rows[0].messages] == ["user", "assistant", "tool", "assistant"]


def test_bom_crlf_and_blank_lines_accepted_silently(tmp_path):
    p = write(tmp_path, "d.jsonl", b"\xef\xbb\xbf" + (json.dumps(CHAT) + "\r\n\r\n  \r\n" + json.dumps(CHAT) + "\r\n").encode())
    rows, report = load_file(p)
    assert report.problems == []
    assert [r.source.line for r in rows] == [1, 4]
    assert rows[0].messages[1]["content"] == "ok"


# ---------------------------------------------------------------------------
# lint: every case names file:line and says what is wrong


LINT_CASES = [
    # (second line of the file, expected location suffix, key text)
    ('{"messages": [}', ":2:15", "invalid JSON"),
    ("[1, 2]", ":2", "expected a JSON object (one row), got array"),
    ('{"mesages": []}', ":2", "unknown key 'mesages' (did you mean 'messages'?)"),
    ('{"foo": 1}', ":2", "no known format"),
    (json.dumps({"prompt": "a", "complettion": "b"}), ":2", "missing key 'completion' (found 'complettion'"),
    (json.dumps({"messages": "hi"}), ":2", "messages: expected a list"),
    (json.dumps({"messages": ["hi"]}), ":2", "messages[0]: expected an object with 'role' and 'content', got string"),
    (json.dumps({"messages": [{"role": "user", "contnet": "x"}]}), ":2",
     "messages[0]: missing key 'content' (found 'contnet': did you mean 'content'?)"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}), ":2",
     "messages[0].content: expected a string, got number"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistent", "content": "a"}]}), ":2",
     "messages[1].role: unknown role 'assistent' (did you mean 'assistant'?)"),
    (json.dumps({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}), ":2",
     "messages[0].role: unknown role 'human' (did you mean 'user'?)"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}), ":2",
     "messages[1].content: empty content"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                              {"role": "assistant", "content": "a"}]}), ":2",
     "messages[1]: role 'system': a system message may only come first"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                              {"role": "assistant", "content": "a"}]}), ":2",
     "messages[1]: role 'user': two user turns in a row"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}), ":2",
     "must start with a user turn"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), ":2", "messages: no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                              {"role": "user", "content": "q2"}]}), ":2", "the last turn is 'user', not 'assistant'"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                              {"role": "tool", "content": "r"}, {"role": "assistant", "content": "b"}]}), ":2",
     "role 'tool' needs a 'tools' list"),
    (json.dumps({"conversations": [{"from": "humam", "value": "q"}, {"from": "gpt", "value": "a"}]}), ":2",
     "conversations[0].from: unknown role 'humam' (did you mean 'human'?)"),
    (json.dumps({"text": ""}), ":2", "text: empty content"),
    (json.dumps({"instruction": "i", "output": "o", "input": 5}), ":2", "input: expected a string, got number"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "tools": 5}), ":2", "tools: expected a list of objects"),
]


@pytest.mark.parametrize("line, where, text", LINT_CASES, ids=[c[2][:40] for c in LINT_CASES])
def test_lint_reports_file_line_and_problem(tmp_path, line, where, text):
    first = chat("hi", "ok") if '"text"' not in line else {"text": "ok"}
    if "instruction" in line:
        first = {"instruction": "i", "output": "o"}
    if "conversations" in line:
        first = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    if "prompt" in line:
        first = {"prompt": "p", "completion": "c"}
    p = write(tmp_path, "bad.jsonl", jl(first, line))
    rows, report = load_file(p)
    assert len(rows) == 1 and rows[0].source.line == 1  # the good row survives; the bad one is reported
    errors = report.errors
    assert any(e.startswith(f"{p}{where}: ") and text in e for e in errors), errors


def test_truncated_last_line(tmp_path):
    p = write(tmp_path, "cut.jsonl", jl(CHAT) + '{"messages": [{"role": "user", "content": "hel')
    rows, report = load_file(p)
    assert len(rows) == 1
    [err] = report.errors
    assert err.startswith(f"{p}:2:") and "truncated" in err


def test_not_utf8(tmp_path):
    p = write(tmp_path, "latin.jsonl", jl(CHAT).encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    _, report = load_file(p)
    assert report.errors == [f"{p}:2:14: not UTF-8 text (byte 0xe9)"]


def test_misspelt_optional_key_warns(tmp_path):
    row = dict(CHAT, tols=[])
    p = write(tmp_path, "d.jsonl", jl(row))
    rows, report = load_file(p)
    assert len(rows) == 1 and report.errors == []
    assert report.warnings == [f"{p}:1: unknown key 'tols' ignored (did you mean 'tools'?)"]


def test_json_object_answer_converted_and_counted(tmp_path):
    answer = {"intent": "set_timer", "slots": {"duration": "10 minutes", "note": "café"}}
    p = write(tmp_path, "d.jsonl", jl(chat("timer", answer), {"messages": [{"role": "user", "content": "x"},
                                                                         {"role": "assistant", "content": [1, 2]}]}))
    rows, report = load_file(p)
    assert report.errors == []
    assert rows[0].messages[-1]["content"] == json.dumps(answer, ensure_ascii=False)
    assert '"café"' in rows[0].messages[-1]["content"]
    assert rows[1].messages[-1]["content"] == "[1, 2]"
    assert report.counters["json_object_content"] == 2
    assert report.warnings[0] == f"{p}:1: messages[1].content: answer is a JSON object, not a string; converted to JSON text"
    # a user turn given as an object is not an answer: an error
    _, report = load_file(write(tmp_path, "u.jsonl", jl({"messages": [{"role": "user", "content": {"a": 1}},
                                                                     {"role": "assistant", "content": "x"}]})))
    assert "messages[0].content: expected a string, got object" in report.errors[0]


def test_mixing_formats_names_first_other_line(tmp_path):
    p = write(tmp_path, "mixed.jsonl", jl(CHAT, CHAT, {"prompt": "a", "completion": "b"}, CHAT, {"text": "t"}))
    rows, report = load_file(p)
    assert len(rows) == 3
    assert report.errors == [f"{p}:3: row in 'completion' format, but this file's rows are 'chat' (from line 1); "
                             "use one format per file (2 rows in other formats)"]


def test_json_array_files(tmp_path):
    text = '[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c",\n   "completion": "d"}\n]\n'
    p = write(tmp_path, "d.json", text)
    rows, report = load_file(p)
    assert report.problems == []
    assert [(r.messages[0]["content"], r.source.line) for r in rows] == [("a", 2), ("c", 4)]
    # a .json file written as JSON lines (as the datasets library does) is read as such
    rows, report = load_file(write(tmp_path, "lines.json", jl(CHAT, CHAT)))
    assert len(rows) == 2 and report.problems == []
    # broken arrays: the error names line and column
    p = write(tmp_path, "bad.json", '[\n {"text": "a"}\n {"text": "b"}\n]')
    _, report = load_file(p)
    assert report.errors == [f"{p}:3:2: invalid JSON: expected ',' or ']' after an array element"]
    p = write(tmp_path, "cut.json", '[\n {"text": "a"},\n {"text": "b"}')
    _, report = load_file(p)
    assert report.errors[0].startswith(f"{p}:3:") and "truncated" in report.errors[0]


def test_unsupported_and_missing_files(tmp_path):
    _, report = load_file(write(tmp_path, "d.csv", "a,b\n"))
    assert report.errors == [f"{tmp_path / 'd.csv'}: unsupported file type '.csv': use .jsonl, .json, .txt or .md"]
    _, report = load_file(tmp_path / "nope.jsonl")
    assert report.errors == [f"{tmp_path / 'nope.jsonl'}: file not found"]
    _, report = load_file(write(tmp_path, "empty.jsonl", "\n\n"))
    assert report.errors == [f"{tmp_path / 'empty.jsonl'}: no rows"]


def test_report_raise_if_errors_shows_first_50_then_count(tmp_path):
    p = write(tmp_path, "d.jsonl", jl(*(["{bad"] * 60)))
    _, report = load_file(p)
    with pytest.raises(UserError) as exc:
        report.raise_if_errors()
    text = exc.value.render()
    assert text.splitlines()[0].startswith("60 problems in the data")
    assert f"{p}:50:2: invalid JSON" in text and f"{p}:51:2" not in text
    assert text.splitlines()[-1].strip() == "... and 10 more"


# ---------------------------------------------------------------------------
# domain text


PROSE = "\n\n".join(f"Paragraph {i} says the quick brown fox jumps over the lazy dog number {i}." for i in range(40))


def test_txt_chunked_by_paragraphs_without_tokenizer(tmp_path):
    p = write(tmp_path, "book.txt", "# Title\r\n\r\n" + PROSE)
    rows, report = load_file(p, max_seq_length=64)
    assert report.problems == [] and all(isinstance(r, Text) for r in rows)
    assert all(len(r.text) <= 62 * 4 for r in rows) and len(rows) > 5
    assert rows[0].text.startswith("# Title\n\nParagraph 0") and rows[0].source.line == 1
    assert "\n\n".join(r.text for r in rows) == ("# Title\n\n" + PROSE)  # nothing lost, paragraphs whole
    assert rows[1].source.line == 1 + 2 * (rows[0].text.count("\n\n") + 1)


def test_txt_chunked_by_tokens(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    long_par = " ".join(["thanks please remind me"] * 60)  # one paragraph longer than a chunk
    p = write(tmp_path, "notes.md", PROSE + "\n\n" + long_par + "\n")
    rows, _ = load_file(p, tokenizer=tok, max_seq_length=48)
    sizes = [len(tok.encode(r.text, add_special_tokens=False)) for r in rows]
    assert max(sizes) <= 46  # room left for BOS/EOS
    assert "".join(r.text for r in rows if "remind" in r.text) == long_par  # cut at token boundaries, no loss
    assert rows[-1].source.line == 81


# ---------------------------------------------------------------------------
# splits


def make_dir(tmp_path, train, valid=None, test=None, suffix=".jsonl") -> Path:
    d = tmp_path / "data"
    write(d, f"train{suffix}", jl(*train))
    if valid is not None:
        write(d, f"valid{suffix}", jl(*valid))
    if test is not None:
        write(d, f"test{suffix}", jl(*test))
    return d


def rows_n(n, prefix="q"):
    return [chat(f"{prefix} {i}", f"a {i}") for i in range(n)]


def test_directory_splits(tmp_path):
    d = make_dir(tmp_path, rows_n(10), rows_n(3, "v"), rows_n(2, "t"))
    s = load_splits([str(d)], valid_fraction=0.5, seed=1, schema=None)
    assert (len(s.train), len(s.valid), len(s.test)) == (10, 3, 2)
    assert not s.valid_from_train and s.report.problems == []
    assert s.files == [d / "train.jsonl", d / "valid.jsonl", d / "test.jsonl"]


def test_directory_json_variants_and_missing_train(tmp_path):
    d = tmp_path / "data"
    write(d, "train.json", json.dumps(rows_n(4)))
    write(d, "validation.jsonl", jl(*rows_n(2, "v")))
    s = load_splits([str(d)], valid_fraction=0.5, seed=1)
    assert (len(s.train), len(s.valid), len(s.test)) == (4, 2, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    s = load_splits([str(empty)], valid_fraction=0.1, seed=1)
    assert s.report.errors == [f"{empty}: no train.jsonl (or train.json) in this directory"]
    s = load_splits([str(tmp_path / "missing")], valid_fraction=0.1, seed=1)
    assert s.report.errors == [f"{tmp_path / 'missing'}: data not found"]


def test_valid_fraction_is_seeded_and_deterministic(tmp_path):
    d = make_dir(tmp_path, rows_n(50))
    a = load_splits([str(d)], valid_fraction=0.2, seed=7)
    b = load_splits([str(d)], valid_fraction=0.2, seed=7)
    c = load_splits([str(d)], valid_fraction=0.2, seed=8)
    assert len(a.valid) == 10 and len(a.train) == 40 and a.valid_from_train
    assert a.valid == b.valid and a.train == b.train
    assert a.valid != c.valid
    lines = [r.source.line for r in a.train]
    assert lines == sorted(lines)  # file order is kept
    assert hold_out(rows_n(1), 0.5, 0) == (rows_n(1), [])  # too few rows to hold any out
    assert fingerprint(a) == fingerprint(b)


def test_parse_source_counts():
    assert parse_source("a.jsonl:200") == (Path("a.jsonl"), 200)
    assert parse_source("data") == (Path("data"), None)
    assert parse_source(r"C:\data\train.jsonl") == (Path(r"C:\data\train.jsonl"), None)
    assert parse_source(r"C:\data\train.jsonl:5") == (Path(r"C:\data\train.jsonl"), 5)
    assert parse_source("dir:with:colons/x.jsonl") == (Path("dir:with:colons/x.jsonl"), None)


def test_mixed_sources_with_sample_counts(tmp_path):
    a = write(tmp_path, "a.jsonl", jl(*rows_n(30, "a")))
    b = write(tmp_path, "b.jsonl", jl(*rows_n(5, "b")))
    s1 = load_splits([f"{a}:10", str(b)], valid_fraction=0.0, seed=3)
    s2 = load_splits([f"{a}:10", str(b)], valid_fraction=0.0, seed=3)
    s3 = load_splits([f"{a}:10", str(b)], valid_fraction=0.0, seed=4)
    assert len(s1.train) == 15 and s1.valid == []
    assert s1.train == s2.train and s1.train != s3.train
    assert sum(r.source.file == str(a) for r in s1.train) == 10
    s = load_splits([f"{b}:9"], valid_fraction=0.0, seed=3)
    assert len(s.train) == 5
    assert s.report.warnings == [f"{b}:9: asked for 9 rows, the source has 5; using all of them"]


def test_leakage_warns_with_both_locations(tmp_path):
    d = make_dir(tmp_path, [chat("play jazz", "x"), chat("stop", "y")], [chat("  Play   jazz ", "x", system="S")],
                 [chat("stop", "different answer")])
    s = load_splits([str(d)], valid_fraction=0.1, seed=0)
    assert s.report.errors == []
    assert s.report.warnings == [f"{d / 'valid.jsonl'}:1: same prompt and answer as train row {d / 'train.jsonl'}:1 "
                                 "(leakage into valid)"]
    assert s.report.counters["leaked_valid"] == 1


# ---------------------------------------------------------------------------
# schema


SCHEMA = {"type": "object", "required": ["intent"], "properties": {"intent": {"enum": ["a", "b"]}},
          "additionalProperties": False}


def test_schema_beside_data_validates_every_answer(tmp_path):
    d = make_dir(tmp_path, [chat("1", '{"intent": "a"}'), chat("2", "not json"), chat("3", '{"intent": "c"}'),
                            chat("4", {"intent": "b", "x": 1})], [chat("5", '{"intent": "b"}')])
    write(d, "schema.json", json.dumps(SCHEMA))
    assert find_schema([str(d)]) == d / "schema.json"
    assert find_schema([str(d / "train.jsonl") + ":2"]) == d / "schema.json"
    s = load_splits([str(d)], valid_fraction=0.1, seed=0)
    t = d / "train.jsonl"
    assert s.schema_path == d / "schema.json"
    assert s.report.errors == [
        f"{t}:2: answer is not valid JSON (Expecting value at column 1)",
        f"{t}:3: answer does not match schema.json: 'c' is not one of ['a', 'b'] (at intent)",
        f"{t}:4: answer does not match schema.json: Additional properties are not allowed ('x' was unexpected)",
    ]


def test_explicit_schema(tmp_path):
    d = make_dir(tmp_path, [chat("1", '{"intent": "a"}')])
    other = write(tmp_path, "s.json", json.dumps({"type": "array"}))
    s = load_splits([str(d)], valid_fraction=0.1, seed=0, schema=str(other))
    assert s.report.errors == [f"{d / 'train.jsonl'}:1: answer does not match s.json: {{'intent': 'a'}} is not of type 'array'"]
    with pytest.raises(UserError, match="JSON schema not found"):
        find_schema([str(d)], str(tmp_path / "none.json"))
    bad = write(tmp_path, "bad.json", json.dumps({"type": "nonsense"}))
    s = load_splits([str(d)], valid_fraction=0.1, seed=0, schema=str(bad))
    assert s.report.errors[0].startswith(f"{bad}: not a valid JSON schema")
    assert find_schema([str(d)]) is None


# ---------------------------------------------------------------------------
# fingerprint and token statistics


def test_fingerprint_is_content_only(tmp_path):
    a = make_dir(tmp_path / "a", rows_n(5), rows_n(2, "v"))
    b = make_dir(tmp_path / "b", rows_n(5), rows_n(2, "v"))
    fa = fingerprint(load_splits([str(a)], valid_fraction=0.1, seed=0))
    fb = fingerprint(load_splits([str(b)], valid_fraction=0.1, seed=0))
    assert fa["train"] == fb["train"] and fa["sha256"] == fb["sha256"]  # same content elsewhere: same hash
    assert fa["train"]["rows"] == 5 and fa["valid"]["rows"] == 2 and fa["test"] == {"rows": 0, "sha256": fa["test"]["sha256"]}
    write(b, "train.jsonl", jl(*rows_n(4), chat("q 4", "changed")))
    fc = fingerprint(load_splits([str(b)], valid_fraction=0.1, seed=0))
    assert fc["train"]["sha256"] != fa["train"]["sha256"] and fc["valid"] == fa["valid"]
    json.dumps(fa)  # plain JSON for the run directory


def test_encode_split_stats_and_policies(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from common.prompts import ChatFormatter

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    fmt = ChatFormatter(tok)
    rows = [Conversation(chat(f"play some jazz {i}", "ok " * (1 + 10 * i))["messages"], Source("f", i)) for i in range(3)]
    lengths = [len(fmt.encode(r)) for r in rows]
    exs, stats = encode_split(rows, fmt, max_len=1000, policy="truncate")
    assert stats["rows"] == 3 and stats["tokens_max"] == max(lengths) and stats["tokens_p50"] == sorted(lengths)[1]
    assert stats["supervised_tokens"] == sum(e.n_supervised for e in exs) > 0
    assert stats["overlong"] == stats["zero_supervised"] == 0 and len(exs) == 3
    limit = lengths[0] + 2  # row 0 fits; rows 1 and 2 are longer
    exs, stats = encode_split(rows, fmt, max_len=limit, policy="truncate")
    assert stats["overlong"] == stats["truncated"] == 2 and all(len(e) <= limit for e in exs)
    exs, stats = encode_split(rows, fmt, max_len=limit, policy="drop")
    assert stats["dropped"] == 2 and len(exs) == 1
    with pytest.raises(UserError) as exc:
        encode_split(rows, fmt, max_len=limit, policy="error")
    assert exc.value.problems[0].startswith("f:1: ")
    # truncation that cuts off the whole answer leaves nothing to learn: dropped and counted
    prompt_len = len(fmt.prompt_ids(rows[2].messages))
    exs, stats = encode_split(rows[2:], fmt, max_len=prompt_len, policy="truncate")
    assert exs == [] and stats["zero_supervised"] == 1
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile(list(range(1, 101)), 95) == 95 and percentile([], 50) == 0


def test_shipped_dataset_is_clean():
    root = Path(__file__).resolve().parents[1] / "data"
    if not (root / "train.jsonl").exists():
        pytest.skip("shipped dataset not present")
    s = load_splits([str(root)], valid_fraction=0.1, seed=3407)
    assert s.report.errors == [], s.report.errors[:5]
    assert s.train and s.valid and s.test and s.schema_path == root / "schema.json"
