"""``llm-ft chat``: one-shot answers from a tiny model dir and a tiny GGUF, and the interactive
commands (/reset, /system, /exit) fed through stdin."""

import io
import sys
from pathlib import Path

import pytest


def write_tiny_gguf(model_dir, out_path, adapter_dir=None) -> Path:
    """An F32 GGUF through the project's exporter: merge (adapter optional) -> GGUF writer."""
    from common.export.arch import load_hparams, spec_for
    from common.export.gguf_file import write_gguf
    from common.export.merge import open_merged
    from common.export.tokenizer import build_vocab
    from common.models import load_tokenizer
    from common.prompts import resolve_template

    hp = load_hparams(model_dir)
    vocab = build_vocab(model_dir, int(hp["vocab_size"]), chat_template=resolve_template(load_tokenizer(model_dir)),
                        eot_token="<|im_end|>", pre_override="gpt-2")  # the tiny tokenizer pre-tokenizes as GPT-2
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(open_merged(model_dir, adapter_dir), hp, spec_for(hp), vocab, out_path, "f32", name="tiny",
                      progress=False).path


MSG = "set a timer for ten minutes"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def one_shot(capsys, argv) -> tuple[str, str]:
    from common.chat import main

    assert main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.mark.torch
def test_one_shot_prints_only_the_answer(tiny_model_dir, capsys):
    from common.generation import load_generator

    out, _ = one_shot(capsys, [str(tiny_model_dir), "--prompt", MSG, "--max-new-tokens", "12", "--system", "Be brief."])
    expected = load_generator(str(tiny_model_dir), system_prompt="Be brief.").generate(
        [{"role": "user", "content": MSG}], max_new_tokens=12)
    assert out == expected + "\n"  # streamed pieces add up to exactly the greedy answer, nothing else on stdout


@pytest.mark.llama
@pytest.mark.torch
def test_one_shot_gguf_matches_transformers(tiny_model_dir, tiny_gguf, capsys):
    from common.generation import load_generator

    gguf_out, _ = one_shot(capsys, [str(tiny_gguf), "--prompt", MSG, "--max-new-tokens", "12", "--system", "Be brief."])
    hf_out, _ = one_shot(capsys, [str(tiny_model_dir), "--prompt", MSG, "--max-new-tokens", "12", "--system", "Be brief."])
    assert gguf_out == hf_out
    gen = load_generator(str(tiny_gguf), system_prompt="Be brief.")
    hf = load_generator(str(tiny_model_dir), system_prompt="Be brief.")
    msgs = [{"role": "user", "content": MSG}]
    assert gen.chat_prompt(msgs) == hf.chat_prompt(msgs)  # GGUF's embedded template + llama.cpp tokens, one BOS
    assert gen.describe()["chat_template"] == "gguf"
    from common.rows import Conversation

    ex = [hf.formatter.encode(Conversation([*msgs, {"role": "assistant", "content": "ok"}]))]
    (a, n), (b, m) = gen.loss(ex), hf.loss(ex)
    assert n == m and a == pytest.approx(b, rel=1e-4)  # F32 GGUF: llama.cpp logits agree with transformers
    # seeded sampling is reproducible
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert gen.generate(msgs, **kw) == gen.generate(msgs, **kw)


def run_interactive(target: str, script: str, monkeypatch, capsys) -> tuple[str, str]:
    from common.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main([target, "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.mark.torch
def test_interactive_reset_and_system(tiny_model_dir, monkeypatch, capsys):
    from common.chat import ChatConfig, ChatSession
    from common.generation import load_generator

    target = str(tiny_model_dir)
    out, err = run_interactive(target, f"{MSG}\nplay some jazz\n/reset\n{MSG}\n/system Be brief.\n{MSG}\n/exit\n"
                               "never read\n", monkeypatch, capsys)
    gen = load_generator(target)

    def answer(*turns):
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return gen.generate(msgs, max_new_tokens=8)

    a1 = answer(MSG)
    a2 = answer(MSG, a1, "play some jazz")  # multi-turn: the history is part of the prompt
    without_reset = answer(MSG, a1, "play some jazz", a2, MSG)
    assert without_reset != a1  # so the next check can tell a reset from no reset
    gen.system_prompt = "Be brief."
    a4 = answer(MSG)
    # after /reset the same message gets the fresh answer; after /system, the new prompt's; /exit stops reading
    assert out == f"{a1}\n{a2}\n{a1}\n{a4}\n"
    assert "conversation cleared" in err and "system prompt set" in err

    # the history itself, driven through the same command handler
    session = ChatSession(load_generator(target), ChatConfig(target=target, max_new_tokens=4), io.StringIO(), _Quiet())
    session.handle(MSG)
    session.handle("again")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    session.handle("/reset")
    assert session.history == []
    session.handle(MSG)
    session.handle("/system You are terse.")
    assert session.history == [] and session.gen.system_prompt == "You are terse."
    assert session.gen.prompt_text([{"role": "user", "content": "x"}]).startswith("<|im_start|>system\nYou are terse.")
    assert session.handle("/exit") is False


@pytest.mark.llama
def test_interactive_gguf_multi_turn(tiny_gguf, monkeypatch, capsys):
    from common.generation import load_generator

    out, _ = run_interactive(str(tiny_gguf), f"{MSG}\n{MSG}\n/reset\n{MSG}\n", monkeypatch, capsys)
    gen = load_generator(str(tiny_gguf))
    a1 = gen.generate([{"role": "user", "content": MSG}], max_new_tokens=8)
    a2 = gen.generate([{"role": "user", "content": MSG}, {"role": "assistant", "content": a1},
                       {"role": "user", "content": MSG}], max_new_tokens=8)
    assert out == f"{a1}\n{a2}\n{a1}\n"


class _Quiet:
    def print(self, *args, **kwargs):
        pass


def test_chat_help_and_bad_flags(capsys):
    from common.chat import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--prompt", "--system", "--temperature", "--top-p", "--max-new-tokens", "--backend"):
        assert flag in out
    assert main(["x", "--top-p", "1.5"]) == 2
    assert "--top-p: must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_loading_a_generator_leaves_autograd_on(tiny_model_dir):
    # Regression: the transformers generator switched autograd off process-wide, so any
    # training later in the same process (tests, serve) failed with "does not require grad".
    torch = pytest.importorskip("torch")
    from common.generation import load_generator

    gen = load_generator(str(tiny_model_dir), system_prompt="")
    gen.generate([{"role": "user", "content": "hello"}], max_new_tokens=2)
    assert torch.is_grad_enabled()
    w = torch.ones(2, requires_grad=True)
    (w * 3).sum().backward()
    assert w.grad.tolist() == [3.0, 3.0]


def test_every_registered_engine_loads_a_model_and_agrees_on_its_loss(tiny_model_dir):
    # Guards the registry's engine lines: each backend's generator loads through load_generator, not by name.
    from common.backends import REGISTRY, installed
    from common.generation import load_generator
    from common.rows import Conversation

    names = [n for n in sorted(REGISTRY) if installed(n)]
    if not names:
        pytest.skip("no backend framework installed")
    msgs = [{"role": "user", "content": MSG}]
    losses = {}
    for name in names:
        gen = load_generator(str(tiny_model_dir), backend=name, system_prompt="Be brief.")
        assert gen.describe()["backend"] == name == type(gen).backend
        assert isinstance(gen.generate(msgs, max_new_tokens=4), str) and gen.new_tokens > 0
        total, count = gen.loss([gen.formatter.encode(Conversation([*msgs, {"role": "assistant", "content": "ok"}]))])
        losses[name] = total / count
        gen.close()
    first = losses[names[0]]
    assert all(v == pytest.approx(first, rel=1e-3) for v in losses.values()), losses
