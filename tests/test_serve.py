"""``llm-ft serve`` tested as a person uses it: the server runs in a subprocess on a free loopback
port, headless Chromium opens the page, types, sends and reads the streamed answer. Plus the
pure helpers (host check, JSON verdict, schema lookup) and the request checks in-process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from common.errors import UserError
from common.serve import EMPTY_MESSAGE, ServeConfig, check_host, is_loopback, json_verdict, run, run_schema

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("LLM_FT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SYSTEM = "Answer with JSON."
QUESTION = "set a timer for ten minutes"
ANSWER = {"intent": "set_timer", "slots": {"duration": "ten minutes"}}
SCHEMA = {"type": "object", "required": ["intent", "slots"], "additionalProperties": False,
          "properties": {"intent": {"enum": ["set_timer", "play_music"]},
                         "slots": {"type": "object", "additionalProperties": {"type": "string"}}}}


# ---------------------------------------------------------------------------
# pure helpers and the host check (no model, no Gradio)


def test_non_loopback_host_is_refused_without_share_on_network():
    # Refused before anything is loaded: the target does not even need to exist.
    with pytest.raises(UserError, match="--share-on-network"):
        run(ServeConfig(target="no-such-model", host="0.0.0.0"))
    with pytest.raises(UserError, match="not a loopback address"):
        run(ServeConfig(target="no-such-model", host="192.168.1.20", port=9000))


def test_port_in_use_is_reported_before_loading(capsys):
    from common.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "no-such-model", "--port", str(port)]) == 2  # the model is never looked up
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_cli_exit_code_for_refused_host(capsys):
    from common.cli import main

    assert main(["serve", "no-such-model", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--share-on-network" in err and "Traceback" not in err


def test_loopback_hosts_and_the_network_warning():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(host) and check_host(host, share_on_network=False) is None
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.org", ""):
        assert not is_loopback(host)
    warning = check_host("0.0.0.0", share_on_network=True)
    assert warning.startswith("warning:") and "anyone" in warning and "0.0.0.0" in warning


def test_help_is_complete(capsys):
    from common.serve import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("TARGET", "--host", "--port", "--share-on-network", "--system-prompt-file", "--json-schema",
                 "--max-new-tokens", "--temperature", "--top-p", "--backend"):
        assert flag in out


def test_json_verdict():
    good = json.dumps(ANSWER)
    pretty, verdict = json_verdict(good, SCHEMA)
    assert json.loads(pretty) == ANSWER and "\n  " in pretty and verdict.startswith("**valid**")
    pretty, verdict = json_verdict('{"intent": "dance", "slots": {}}', SCHEMA)
    assert pretty and "**invalid**" in verdict and "intent" in verdict and "dance" in verdict
    assert json_verdict("not json {", SCHEMA) == (None, "**invalid**: the answer is not valid JSON")
    assert json_verdict("hello", None) == (None, None)  # no schema and no JSON: no JSON view at all
    pretty, verdict = json_verdict(' [1, 2] ', None)
    assert json.loads(pretty) == [1, 2] and "no schema" in verdict


def test_run_schema(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)

    def schema_of(config: dict):
        (run / "config.json").write_text(json.dumps(config))
        return run_schema(run)

    assert schema_of({"data": [str(data)]}) is None
    (data / "schema.json").write_text(json.dumps(SCHEMA))
    assert schema_of({"data": [str(data)]}) == data / "schema.json"
    assert schema_of({"data": [f"{data / 'train.jsonl'}:20"]}) == data / "schema.json"  # PATH:N
    (tmp_path / "elsewhere.json").write_text(json.dumps(SCHEMA))
    assert schema_of({"json_schema": str(tmp_path / "elsewhere.json"), "data": [str(data)]}) == tmp_path / "elsewhere.json"
    # Relative paths, as training wrote them, from the folder the run was trained in (RUN/../..).
    assert schema_of({"data": ["data"]}) == tmp_path / "data" / "schema.json"


# ---------------------------------------------------------------------------
# a tiny run: base + a LoRA adapter fitted until it answers QUESTION with ANSWER


def fit_adapter(model_dir: Path, out_dir: Path, steps: int = 120) -> None:
    """Fit a LoRA adapter (peft) on one chat until the tiny model answers it greedily."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.models import load_tokenizer
    from common.prompts import ChatFormatter
    from common.rows import Conversation

    torch.set_num_threads(1)
    fmt = ChatFormatter(load_tokenizer(model_dir), system_prompt=SYSTEM)
    ex = fmt.encode(Conversation([{"role": "user", "content": QUESTION},
                                  {"role": "assistant", "content": json.dumps(ANSWER)}]))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "up_proj",
                                                                           "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.tensor([ex.input_ids])
    labels = torch.tensor([[t if m else -100 for t, m in zip(ex.input_ids, ex.loss_mask, strict=True)]])
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out_dir), safe_serialization=True)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("serve")
    run_dir, data = root / "runs" / "tiny-run", root / "data"
    fit_adapter(tiny_model_dir, run_dir / "adapter")
    data.mkdir()
    (data / "schema.json").write_text(json.dumps(SCHEMA))
    (run_dir / "config.json").write_text(json.dumps({"model": str(tiny_model_dir), "backend": "torch",
                                                     "base_model": {"path": str(tiny_model_dir)},
                                                     "data": [str(data)]}))
    (run_dir / "system_prompt.txt").write_text(SYSTEM + "\n")
    return run_dir


@pytest.mark.torch
def test_models_request_checks_and_base_comparison(tiny_run, tiny_model_dir):
    from common.serve import Models

    models = Models(ServeConfig(target=str(tiny_run)))
    assert models.can_compare and models.default_system == SYSTEM and models.schema == SCHEMA
    assert models.context == 512 and models.token_cap == 512  # the tiny model's max_position_embeddings
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    for bad in (0, 513):
        with pytest.raises(UserError, match="max new tokens must be between 1 and 512"):
            models.check_request(chat, bad)
    with pytest.raises(UserError, match="over the model's context of 512"):
        models.check_request(chat, 500)  # the prompt's tokens + 500 > 512
    streamed = list(models.stream(models.main, chat, max_new_tokens=40))
    assert len(streamed) > 1 and json.loads(streamed[-1]) == ANSWER  # pieces arrive before the end
    base = "".join(models.stream(models.base_generator(), chat, max_new_tokens=40))
    assert base != streamed[-1]  # the base model is really loaded without the adapter

    plain = Models(ServeConfig(target=str(tiny_model_dir)))
    assert not plain.can_compare and plain.default_system == "" and plain.schema is None


@pytest.mark.llama
@pytest.mark.torch
def test_models_gguf_target(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from common.export.arch import load_hparams, spec_for
    from common.export.gguf_file import write_gguf
    from common.export.merge import open_merged
    from common.export.tokenizer import build_vocab
    from common.models import load_tokenizer
    from common.prompts import resolve_template
    from common.serve import Models

    hp = load_hparams(tiny_model_dir)
    vocab = build_vocab(tiny_model_dir, int(hp["vocab_size"]), pre_override="gpt-2", eot_token="<|im_end|>",
                        chat_template=resolve_template(load_tokenizer(tiny_model_dir)))
    gguf = write_gguf(open_merged(tiny_model_dir, None), hp, spec_for(hp), vocab, tmp_path / "tiny.gguf", "f32",
                      name="tiny", progress=False).path
    models = Models(ServeConfig(target=str(gguf), n_ctx=256))
    assert not models.can_compare and models.main.backend == "llama.cpp"
    assert models.context == 256 and models.token_cap == 256  # llama.cpp's context, not the HF config's
    chat = [{"role": "user", "content": QUESTION}]
    with pytest.raises(UserError, match="over the model's context of 256"):
        models.check_request(chat, 250)
    streamed = list(models.stream(models.main, chat, max_new_tokens=12))
    assert streamed and streamed[-1] == models.main.generate(chat, max_new_tokens=12)


# ---------------------------------------------------------------------------
# the page in headless Chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(target: Path, tmp_path: Path, *flags: str, timeout_s: float = 240):
    """Run ``llm-ft serve TARGET --port N`` in a subprocess; yield its URL once the page answers."""
    port = free_port()
    log = open(tmp_path / f"serve-{port}.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "common", "serve", str(target), "--port", str(port), *flags],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"llm-ft serve exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llm-ft serve did not answer at {url} within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    """A headless Debian Chromium driven by Playwright, with a fresh profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    pytest.importorskip("gradio", reason="Gradio is not installed (pip install 'llm-ft[web]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (scripts/setup-system.sh installs Debian's chromium)")
    with sync_api.sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                    args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        yield ctx
        ctx.close()


def save_screenshot(page, name: str, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    shutil.copy(ARTIFACTS / name, tmp_path / name)


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


RECORD_BOT_TEXTS = """() => {
  window.botTexts = [];
  const record = () => {
    const bots = document.querySelectorAll('#chat .message.bot');
    if (bots.length) window.botTexts.push(bots[bots.length - 1].innerText);
  };
  new MutationObserver(record).observe(document.querySelector('#chat'),
                                       {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.torch
def test_page_chat_streams_and_reports_an_empty_message(browser, tiny_model_dir, tmp_path):
    from playwright.sync_api import expect
    with serving(tiny_model_dir, tmp_path, "--max-new-tokens", "48") as url:
        page = browser.new_page()
        page.goto(url)
        page.locator("#message textarea").wait_for(timeout=30_000)  # Gradio renders after the load event
        for elem in ("#chat", "#message", "#send", "#system", "#temperature", "#top-p", "#max-new-tokens"):
            expect(page.locator(elem).first).to_be_visible()  # waits while Gradio renders
        # A model has no base to compare with: the toggle is disabled and says why.
        expect(page.locator("#compare input")).to_be_disabled()
        assert "only for a run directory" in page.locator("#compare").inner_text()

        send(page, QUESTION)
        page.locator("#chat .message.user").filter(has_text=QUESTION).wait_for(timeout=30_000)
        bot = page.locator("#chat .message.bot").last
        bot.wait_for(timeout=60_000)
        page.wait_for_function("() => document.querySelector('#status').innerText.trim() === ''", timeout=60_000)
        answer = bot.inner_text().strip()
        assert answer  # the tiny model's gibberish, but an answer
        save_screenshot(page, "serve.png", tmp_path)

        # Two visitors at once: the second request waits in the queue, both get answers.
        other = browser.new_page()
        other.goto(url)
        other.locator("#message textarea").wait_for(timeout=30_000)
        send(page, "play some jazz")
        send(other, "what's the weather in Paris tomorrow")
        for p in (page, other):
            p.locator("#chat .message.bot").nth(-1 if p is other else 1).wait_for(timeout=60_000)
            p.wait_for_function("() => document.querySelector('#status').innerText.trim() === ''", timeout=60_000)
        assert page.locator("#chat .message.bot").count() == 2 and other.locator("#chat .message.bot").count() == 1
        other.close()

        # The prompt plus the most new tokens the slider allows is over the context: a message, no traceback.
        box = page.locator("#max-new-tokens input[type=number]")
        box.fill("512")
        box.press("Enter")
        send(page, "play some jazz")
        page.locator("#status").filter(has_text="over the model's context of 512").wait_for(timeout=15_000)
        assert page.locator("#message textarea").input_value() == "play some jazz"  # kept, to send again
        box.fill("48")
        box.press("Enter")

        send(page, "   ")
        page.locator("#status").filter(has_text=EMPTY_MESSAGE).wait_for(timeout=15_000)
        page.get_by_text(EMPTY_MESSAGE).first.wait_for(timeout=5_000)  # the warning toast says it too
        assert page.locator("#chat .message.bot").count() == 2  # nothing more was sent to the model
        save_screenshot(page, "serve-errors.png", tmp_path)


@pytest.mark.torch
def test_page_compares_with_base_and_checks_json(browser, tiny_run, tmp_path):
    from playwright.sync_api import expect
    with serving(tiny_run, tmp_path, "--max-new-tokens", "40") as url:
        page = browser.new_page()
        page.goto(url)
        page.locator("#message textarea").wait_for(timeout=30_000)
        expect(page.locator("#system textarea")).to_have_value(SYSTEM)  # the run's prompt, editable
        expect(page.locator("#json-verdict")).to_be_visible()  # a JSON task: the run's data has a schema
        page.locator("#compare input").check()
        page.locator("#base-chat").wait_for(state="visible", timeout=10_000)
        page.evaluate(RECORD_BOT_TEXTS)
        send(page, QUESTION)
        page.locator("#base-chat .message.bot").wait_for(timeout=120_000)
        page.wait_for_function("() => document.querySelector('#status').innerText.trim() === ''", timeout=60_000)
        answer = page.locator("#chat .message.bot").last.inner_text()
        assert json.loads(answer) == ANSWER
        # The answer grew in the page, piece by piece (the engine streams at word boundaries).
        texts = [t.strip() for t in page.evaluate("window.botTexts") if t.strip()]
        assert len(set(texts)) > 1 and texts[-1] == answer.strip(), texts
        assert page.locator("#json-verdict").inner_text().startswith("valid")
        assert '"set_timer"' in page.locator("#json").inner_text()
        base_answer = page.locator("#base-chat .message.bot").last.inner_text()
        assert base_answer.strip() and base_answer != json.dumps(ANSWER)
        save_screenshot(page, "serve-compare.png", tmp_path)
