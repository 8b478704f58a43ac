"""``llm-ft serve`` under load, through Gradio's HTTP API (threads of plain HTTP clients, a tiny
model): concurrent chats are queued and all answered, a client that goes away mid-answer frees
its slot, a request over the context is refused with a message."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.torch]

CHAT = [{"role": "user", "content": "set a timer for ten minutes"}]


def call(url: str, text: str, max_new_tokens: int) -> str:
    """Queue one chat request (the page's 'respond' event); return its event id."""
    body = json.dumps({"data": [text, "", 0.0, 1.0, max_new_tokens, False]}).encode()
    req = urllib.request.Request(url + "gradio_api/call/respond", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["event_id"]


def events(url: str, event_id: str, timeout: float = 300):
    """Yield (event, data) from the request's server-sent event stream."""
    with urllib.request.urlopen(f"{url}gradio_api/call/respond/{event_id}", timeout=timeout) as r:
        event = None
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield event, line[6:]


def answer_of(data: str) -> str | None:
    """The assistant's text in a 'respond' update, if the update carries the chat."""
    values = json.loads(data)
    chat = values[1] if isinstance(values, list) and len(values) > 1 else None
    if isinstance(chat, list) and chat and chat[-1].get("role") == "assistant":
        return "".join(p.get("text", "") for p in chat[-1]["content"])
    return None


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Recorded:
    """The real engine, with a record of each generation: pieces streamed, whether it was stopped."""

    def __init__(self, engine):
        self.engine, self.runs = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, messages, *, stream=None, **settings):
        run = {"text": messages[-1]["content"], "pieces": 0, "stopped": False}
        self.runs.append(run)

        def counted(piece):
            run["pieces"] += 1
            stream(piece)

        try:
            return self.engine.generate(messages, stream=counted if stream else None, **settings)
        except Exception as exc:
            run["stopped"] = type(exc).__name__ == "Cancelled"
            raise


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The page served in this process (so the test can see the engine), on a free loopback port."""
    pytest.importorskip("gradio")
    from test_serve import free_port

    from common.serve import Models, ServeConfig, build_app

    cfg = ServeConfig(target=str(tiny_model_dir), port=free_port())
    models = Models(cfg)
    models.main = Recorded(models.main)
    demo = build_app(models, cfg)
    demo.launch(server_name="127.0.0.1", server_port=cfg.port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                mcp_server=False, show_error=False)
    try:
        yield f"http://127.0.0.1:{cfg.port}/", models
    finally:
        demo.close()
        # An engine thread still finishing an abandoned answer must not outlive the test process.
        for t in threading.enumerate():
            if t.name.endswith("(work)"):
                t.join(timeout=60)


def test_twenty_concurrent_chats_are_all_answered(server):
    url, models = server
    before, served = rss_kib(), models.served
    results: dict[int, tuple[str | None, list[str]]] = {}

    def client(i: int) -> None:
        seen, answer = [], None
        for event, data in events(url, call(url, f"request {i}: play some jazz", 24)):
            seen.append(event)
            answer = answer_of(data) or answer
        results[i] = (answer, seen)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(results) == list(range(20))
    for i, (answer, seen) in results.items():
        assert seen[-1] == "complete" and "error" not in seen, (i, seen)
        assert answer, i  # every request got its answer
    assert models.served - served == 20  # one generation each, one at a time
    assert rss_kib() - before < 300_000  # 20 queued chats cost no more than a few MB each


def test_client_that_goes_away_mid_answer_frees_its_slot(server):
    # Before: the abandoned answer ran to max_new_tokens while the next request waited.
    url, models = server
    stream = events(url, call(url, "remind me to call mom at 5pm", 400))
    for _, data in stream:
        if answer_of(data):
            break
    stream.close()  # closes the HTTP connection: the client is gone
    answers = [answer_of(d) for _, d in events(url, call(url, "play some jazz", 4))]
    assert any(answers)  # the next request is answered
    gone = next(r for r in models.main.runs if r["text"] == "remind me to call mom at 5pm")
    assert gone["stopped"], gone  # the engine was stopped at its next piece, not run to the end
    assert models.lock.acquire(timeout=5)  # and nothing holds the slot now
    models.lock.release()


def test_request_over_the_context_is_refused_with_a_message(server):
    # The tiny model's context is 512 tokens: a prompt plus 512 new tokens is over it.
    url, models = server
    runs = len(models.main.runs)
    datas = [d for _, d in events(url, call(url, "play some jazz", 512))]
    assert any("over the model's context of 512" in d for d in datas)
    assert not any(answer_of(d) for d in datas) and len(models.main.runs) == runs  # the engine never ran
    # The server is still up and answers the next request.
    assert any(answer_of(d) for _, d in events(url, call(url, "play some jazz", 4)))
