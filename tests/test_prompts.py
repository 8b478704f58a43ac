"""Prompts with the tiny ChatML tokenizer: masks, system prompt, named templates, sandbox, length policy."""

import pytest

from common.errors import UserError
from common.prompts import ChatFormatter, apply_length_policy, load_system_prompt, render
from common.rows import Conversation, Example, Source, Text

SYSTEM = "You are an intent classifier. Answer with JSON only."
A1 = '{"intent": "set_timer", "slots": {"duration": "10 minutes"}}'
A2 = '{"intent": "unknown", "slots": {}}'


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def conv(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    msgs += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return Conversation(msgs, Source("f.jsonl", 1))


def learned_spans(tok, ex: Example) -> list[str]:
    """Decoded text of each contiguous run of supervised tokens."""
    spans, cur = [], []
    for tid, m in zip(ex.input_ids, ex.loss_mask, strict=True):
        if m:
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tok.decode(s) for s in spans]


def test_single_turn_mask_learns_the_answer_and_its_end_token(tok):
    fmt = ChatFormatter(tok)
    ex = fmt.encode(conv("set a timer for ten minutes", A1))
    assert learned_spans(tok, ex) == [A1 + "<|im_end|>"]
    assert ex.input_ids[-1] != tok.convert_tokens_to_ids("<|im_end|>") and ex.loss_mask[-1] == 0  # trailing "\n"


def test_multi_turn_every_assistant_turn_learned_nothing_else(tok):
    fmt = ChatFormatter(tok, system_prompt=SYSTEM)
    ex = fmt.encode(conv("set a timer for ten minutes", A1, "thanks", A2))
    assert learned_spans(tok, ex) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    assert len(ex.input_ids) == len(ex.loss_mask)


def test_train_on_prompt_learns_everything(tok):
    ex = ChatFormatter(tok, system_prompt=SYSTEM, train_on_prompt=True).encode(conv("play some jazz", A2))
    assert all(ex.loss_mask) and ex.n_supervised == len(ex)


def test_ids_equal_tokenizing_the_whole_rendered_text(tok):
    fmt = ChatFormatter(tok, system_prompt=SYSTEM)
    for row in (conv("play some jazz", A2), conv("set a timer", A1, "thanks", A2, system="Custom system.")):
        text = fmt.render(fmt.with_system(row.messages))
        assert fmt.encode(row).input_ids == tok.encode(text, add_special_tokens=False)


def test_system_prompt_inserted_only_when_absent(tok):
    fmt = ChatFormatter(tok, system_prompt=SYSTEM)
    text = tok.decode(fmt.encode(conv("play some jazz", A2)).input_ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nplay some jazz")
    text = tok.decode(fmt.encode(conv("play some jazz", A2, system="Own prompt.")).input_ids)
    assert text.count("<|im_start|>system") == 1 and "Own prompt." in text and SYSTEM not in text
    assert ChatFormatter(tok).with_system(conv("hi", "yo").messages)[0]["role"] == "user"  # no prompt: none added


def test_prompt_ids_end_with_the_generation_prompt(tok):
    fmt = ChatFormatter(tok, system_prompt=SYSTEM)
    row = conv("set a timer", A1, "thanks", A2)
    ids = fmt.prompt_ids(row.messages)
    assert tok.decode(ids).endswith("thanks<|im_end|>\n<|im_start|>assistant\n")
    assert fmt.encode(row).input_ids[: len(ids)] == ids  # the answer continues exactly this prompt
    assert fmt.stop_tokens == ["<|im_end|>"]


NAMED = {
    "chatml": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n",
    "llama3": "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>",
    "alpaca": "### Instruction:\nhi\n\n### Response:\nyo<|im_end|>\n\n",
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_templates(tok, name):
    fmt = ChatFormatter(tok, template=name)
    assert fmt.render(conv("hi", "yo").messages) == NAMED[name]
    assert learned_spans(tok, fmt.encode(conv("hi", "yo")))[0].startswith("yo")


def test_template_file_and_unknown_name(tok, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
                    "{% if add_generation_prompt %}[assistant] {% endif %}")
    fmt = ChatFormatter(tok, template=str(path))
    assert fmt.render(conv("hi", "yo").messages) == "[user] hi<|im_end|>[assistant] yo<|im_end|>"
    assert learned_spans(tok, fmt.encode(conv("hi", "yo"))) == ["yo<|im_end|>"]
    with pytest.raises(UserError, match="unknown chat template 'chatmll'"):
        ChatFormatter(tok, template="chatmll")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}",
])
def test_sandbox_blocks_escapes_as_user_errors(template):
    with pytest.raises(UserError, match="chat template failed to render: SecurityError"):
        render(template, [{"role": "user", "content": "x"}])


def test_template_errors_are_user_errors(tok, tmp_path):
    with pytest.raises(UserError, match="does not compile"):
        render("{% for m in messages %}", [])
    with pytest.raises(UserError, match="chat template: only user and assistant"):
        render("{{ raise_exception('only user and assistant') }}", [])
    # a template that does not render conversations as stable prefixes cannot be masked
    unstable = tmp_path / "unstable.jinja"
    unstable.write_text("{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    fmt = ChatFormatter(tok, template=str(unstable))
    with pytest.raises(UserError, match="f.jsonl:1: the chat template does not render conversations as stable"):
        fmt.encode(conv("hi", "yo"))


def test_text_rows_are_fully_supervised(tok):
    ex = ChatFormatter(tok).encode(Text("play some jazz", Source("a.txt", 1)))
    assert ex.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and all(ex.loss_mask)


def test_apply_length_policy():
    exs = [Example([1, 2, 3], [0, 1, 1], Source("f", 1)), Example([1] * 6, [0, 0, 0, 0, 1, 1], Source("f", 2))]
    kept, stats = apply_length_policy(exs, 4, "truncate")
    assert [len(e) for e in kept] == [3, 4] and stats == {"overlong": 1, "truncated": 1, "dropped": 0,
                                                          "no_supervised": 1}
    kept, stats = apply_length_policy(exs, 4, "drop")
    assert kept == exs[:1] and stats["dropped"] == 1 and stats["overlong"] == 1
    with pytest.raises(UserError) as exc:
        apply_length_policy(exs, 4, "error")
    assert exc.value.problems == ["f:2: 6 tokens > max_seq_length 4"]


def test_load_system_prompt(tmp_path):
    p = tmp_path / "s.txt"
    p.write_bytes(b"\xef\xbb\xbfLine one\r\nLine two\r\n\r\n")
    assert load_system_prompt(p) == "Line one\nLine two"
    assert load_system_prompt("") is None and load_system_prompt(None) is None
    p.write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_system_prompt(p)
    with pytest.raises(UserError, match="not found"):
        load_system_prompt(tmp_path / "none.txt")
