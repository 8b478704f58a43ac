"""``llm-ft serve``: a local web page (Gradio) to try a run, a model or a GGUF file.

The model is loaded once; answers stream into a chat. Requests from every open page go
through one queue (one generation at a time), so a second visitor waits instead of
crashing the engine. Bad requests (an empty message, too many new tokens) get a message in
the page, never a traceback. The server binds to loopback unless ``--share-on-network``
says otherwise, and never opens Gradio's public share tunnel.

Gradio is an optional extra (``pip install 'llm-ft[web]'``): it is imported inside
functions, so this module imports without it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import random
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from common.command import main_for, make_parser
from common.config import opt, register
from common.errors import UserError
from common.structured.schema import json_verdict, load_schema, run_schema  # noqa: F401  (serve's API)

HARD_CAP = 8192  # new tokens per answer the page ever allows, whatever the model's context


@register
@dataclass
class ServeConfig:
    target: str = opt(help="what to serve: a run directory, a model (Hub id, local HF directory or 'default') "
                      "or a .gguf file", positional=True)
    host: str = opt("127.0.0.1", "address to listen on; a non-loopback address needs --share-on-network",
                     cli_only=lambda host: not is_loopback(host))
    port: int = opt(7860, "TCP port to listen on", min=1, max=65535)
    share_on_network: bool = opt(False, "allow a non-loopback --host: anyone who can reach the address can use the "
                                 "model (there is no login)", cli_only=True)
    backend: Literal["auto", "torch", "mlx", "llama"] = opt("auto", "engine; auto = llama.cpp for a .gguf, else the "
                                                           "run's backend if installed, else MLX on Apple Silicon, "
                                                           "else torch")
    system_prompt_file: str | None = opt(None, "system prompt shown (and editable) in the page "
                                            "(default: the run's; none for a model)")
    json_schema: str | None = opt(None, "JSON schema answers are checked against (default: the run's "
                                     "json_schema, or schema.json beside its data)")
    max_new_tokens: int = opt(256, "the page's initial answer length, in tokens", min=1, max=HARD_CAP)
    temperature: float = opt(0.0, "the page's initial temperature (0 = greedy, as eval measures)", min=0)
    top_p: float = opt(1.0, "the page's initial top-p (nucleus sampling; used when temperature > 0)", gt=0,
                       max=1)
    n_ctx: int = opt(4096, "context length for a .gguf target (llama.cpp), in tokens", min=16)
    format: str | None = opt(None, "answer in a JSON schema, as Ollama's format does: 'schema' (the run's schema, "
                             "or export/schema.json beside a GGUF) or a .json file; shows the enum field's top 3 values")
    threshold: float | None = opt(None, "with --format: an enum value below this probability becomes the schema's "
                                        "fallback value (e.g. unknown)", min=0, max=1)


# ---------------------------------------------------------------------------
# pure helpers (tested without a server)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def check_host(host: str, share_on_network: bool) -> str | None:
    """Refuse a non-loopback host unless allowed; return the warning to print when it is."""
    if is_loopback(host):
        return None
    if not share_on_network:
        raise UserError(f"--host {host}: not a loopback address; the page would be reachable from other machines "
                        "with no login. Add --share-on-network if that is what you want, or use --host 127.0.0.1")
    return (f"warning: serving on {host} (--share-on-network): anyone who can reach this address can use the model; "
            "there is no login and no encryption")


def check_port(host: str, port: int) -> None:
    """Fail early, before minutes of model loading, when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                            "pick another port with --port") from None


def seed_for(temperature: float) -> int:
    """A fresh seed per sampled answer (so 'send again' differs); 0 for greedy."""
    return random.randrange(2**31) if temperature > 0 else 0


def model_context(target) -> int | None:
    """The context length in tokens of a target's HF model (``max_position_embeddings``), when it says."""
    if target.model_dir is None:
        return None
    try:
        cfg = json.loads((Path(target.model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("max_position_embeddings")
    return int(n) if isinstance(n, int) and n > 0 else None


# ---------------------------------------------------------------------------
# the models behind the page


class Models:
    """The loaded target and, on first use, the run's base model without its adapter."""

    def __init__(self, cfg: ServeConfig):
        from common.generation import load_generator, resolve_target

        self.cfg = cfg
        self.target = resolve_target(cfg.target)
        # The page always sends its own system message, so the engines insert none themselves.
        self.main = load_generator(self.target, backend=cfg.backend, system_prompt="", n_ctx=cfg.n_ctx)
        self.base = None
        self.lock = threading.Lock()  # one generation at a time, whatever the queue does
        self.served = 0  # generations finished or cancelled (the load test counts them)
        ctx = cfg.n_ctx if self.target.kind == "gguf" else model_context(self.target)
        self.context = ctx
        self.token_cap = min(HARD_CAP, ctx) if ctx else HARD_CAP
        self.can_compare = self.target.kind == "run"
        self.default_system = self.target.system_prompt or ""
        if cfg.system_prompt_file:
            from common.prompts import load_system_prompt

            self.default_system = load_system_prompt(cfg.system_prompt_file) or ""
        self.schema_path = Path(cfg.json_schema) if cfg.json_schema else None
        if self.schema_path is None and self.target.run_dir is not None:
            self.schema_path = run_schema(self.target.run_dir)
        self.schema = load_schema(self.schema_path) if self.schema_path else None
        from common.structured.classify import setup_format

        self.fmt = setup_format(self.main, cfg.format, cfg.threshold, data_schema=self.schema_path)
        if self.fmt is not None and self.schema is None:
            self.schema_path, self.schema = self.fmt.path, self.fmt.schema

    def structured(self, messages: list[dict], answer: str) -> tuple[str, str]:
        """(the answer after --threshold, a markdown line with the enum field's top 3 values) under --format."""
        from common.structured.classify import confidence_line

        with self.lock:
            return confidence_line(self.main, messages, answer, self.fmt, self.cfg.threshold, code="`")

    def base_generator(self):
        """The run's base model alone (same tokenizer, template and engine), loaded on first use."""
        if self.base is None:
            from common.generation import load_generator

            base = replace(self.target, kind="model", adapter_dir=None, name=f"{self.target.name}-base")
            engine = {"llama.cpp": "llama"}.get(self.main.backend, self.main.backend)
            self.base = load_generator(base, backend=engine, system_prompt="")
        return self.base

    def title(self) -> str:
        d = self.main.describe()
        what = {"run": "run", "model": "model", "gguf": "GGUF"}[self.target.kind]
        return f"{what} **{d['name']}** on {d['backend']}" + (f" ({d['device']})" if d.get("device") else "")

    def check_request(self, messages: list[dict], max_new_tokens: int) -> None:
        """Raise UserError for a request the model cannot answer (over the cap or the context)."""
        if not 1 <= max_new_tokens <= self.token_cap:
            raise UserError(f"max new tokens must be between 1 and {self.token_cap}, got {max_new_tokens}")
        if self.context:
            used = len(self.main.chat_prompt(messages))
            if used + max_new_tokens > self.context:
                raise UserError(f"the conversation is {used} tokens; with {max_new_tokens} new tokens it is over "
                                f"the model's context of {self.context}: clear the chat or lower max new tokens")

    def stream(self, generator, messages: list[dict], **settings) -> Iterator[str]:
        """Yield the answer so far as it grows; the engine runs in a worker thread.

        Requests wait for the lock in arrival order (one generation at a time). When the
        caller stops iterating (the page went away mid-answer and Gradio closed this
        generator), the engine's next streamed piece raises :class:`Cancelled`, so the
        engine stops and the lock goes to the next request at once.
        """
        pieces: queue.Queue = queue.Queue()
        done = object()
        result: dict[str, Any] = {}
        cancelled = threading.Event()

        def put(piece: str) -> None:
            if cancelled.is_set():
                raise Cancelled("the client went away")
            pieces.put(piece)

        def work():
            with self.lock:
                try:
                    if not cancelled.is_set():  # gone while it waited in the queue: nothing to do
                        result["text"] = generator.generate(messages, stream=put, **settings)
                except Cancelled:
                    pass
                except BaseException as exc:  # re-raised in the page's thread
                    result["error"] = exc
                finally:
                    self.served += 1
                    pieces.put(done)

        threading.Thread(target=work, daemon=True).start()
        text = ""
        try:
            while (piece := pieces.get()) is not done:
                text += piece
                yield text
        finally:
            cancelled.set()  # a no-op after the end; mid-answer it stops the engine at its next piece
        if "error" in result:
            raise result["error"]
        if result.get("text", text) != text:
            yield result["text"]


class Cancelled(Exception):
    """Raised inside an engine's stream callback to stop a generation nobody is waiting for."""


# ---------------------------------------------------------------------------
# the page


EMPTY_MESSAGE = "The message is empty: type something to send."
NO_ANSWER = "*(no answer: the model ended its turn at once)*"


def display(turns: list[dict]) -> list[dict]:
    """The chat as shown: an empty answer gets a note instead of an empty bubble."""
    return [t if t["role"] != "assistant" or t["content"].strip() else {**t, "content": NO_ANSWER} for t in turns]


def build_app(models: Models, cfg: ServeConfig):
    """The Gradio page: a chat, the system prompt, sampling controls, base comparison and a JSON view."""
    import gradio as gr

    json_task = models.schema is not None
    compare_note = ("answer with the run's base model too (without the adapter, loaded on first use)"
                    if models.can_compare else f"only for a run directory; this {models.target.kind} has no base "
                    "model to compare with")
    with gr.Blocks(title=f"llm-ft serve: {models.target.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## llm-ft serve\n{models.title()}" +
                    (f" · answers checked against `{models.schema_path}`" if json_task else ""))
        history, base_history = gr.State([]), gr.State([])  # what each model has seen (plain strings)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    chat = gr.Chatbot(label=models.target.name, elem_id="chat", height=420, buttons=["copy_all"])
                    base_chat = gr.Chatbot(label="base model (no adapter)", elem_id="base-chat", height=420,
                                           visible=False, buttons=["copy_all"])
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    message = gr.Textbox(placeholder="Type a message, then Enter or Send", show_label=False,
                                         elem_id="message", scale=5, autofocus=True)
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
                    clear = gr.Button("Clear", elem_id="clear", scale=1, min_width=80)
                with gr.Column(visible=json_task) as json_box:
                    json_verdict_md = gr.Markdown("answers are checked against the schema" if json_task else "",
                                                  elem_id="json-verdict")
                    json_view = gr.Code(language="json", label=f"{models.target.name}: answer as JSON", elem_id="json", interactive=False)
            with gr.Column(scale=1):
                system = gr.Textbox(models.default_system, label="system prompt", lines=6, max_lines=20,
                                    elem_id="system", info="sent with every message; empty for none")
                temperature = gr.Slider(0.0, 2.0, cfg.temperature, step=0.05, label="temperature",
                                        info="0 = greedy (what eval measures)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, cfg.top_p, step=0.05, label="top-p", elem_id="top-p",
                                  info="nucleus sampling, when temperature > 0")
                max_new = gr.Slider(1, models.token_cap, min(cfg.max_new_tokens, models.token_cap), step=1,
                                    label="max new tokens", elem_id="max-new-tokens")
                compare = gr.Checkbox(False, label="compare with base model", info=compare_note,
                                      interactive=models.can_compare, elem_id="compare")

        def fail(problem: str, shown: dict | None = None) -> dict:
            gr.Warning(problem)
            return {status: f"**error:** {problem}", **(shown or {})}

        def respond(text, hist, base_hist, system_text, temp, top, max_new_tokens, comparing):
            text = (text or "").strip()
            if not text:
                gr.Warning(EMPTY_MESSAGE)
                yield {status: f"**error:** {EMPTY_MESSAGE}"}
                return
            prefix = [{"role": "system", "content": system_text}] if (system_text or "").strip() else []
            user = {"role": "user", "content": text}
            settings = dict(max_new_tokens=int(max_new_tokens), temperature=float(temp), top_p=float(top),
                            seed=seed_for(float(temp)))
            try:
                models.check_request(prefix + hist + [user], settings["max_new_tokens"])
            except UserError as exc:
                yield fail(exc.message)
                return
            yield {message: "", status: "generating..."}
            done: dict = {}
            runs = [(models.main, hist, chat, history)]
            if comparing and models.can_compare:
                runs.append((None, base_hist, base_chat, base_history))
            for generator, seen, box, state in runs:
                answer = ""
                try:
                    generator = generator or models.base_generator()
                    for answer in models.stream(generator, prefix + seen + [user], **settings):
                        yield {box: display([*seen, user, {"role": "assistant", "content": answer}])}
                except Exception as exc:  # UserError or an engine failure: say what, keep the server up
                    problem = exc.message if isinstance(exc, UserError) else \
                        f"generation failed: {type(exc).__name__}: {exc}"
                    shown = {box: display(seen)}
                    if state is history:  # nothing was answered: give the message back, to send again
                        shown[message] = text
                    yield fail(problem, shown)
                    break
                top3 = ""
                if state is history and models.fmt is not None:
                    answer, top3 = models.structured(prefix + seen + [user], answer)
                    done[box] = display([*seen, user, {"role": "assistant", "content": answer}])
                done[state] = [*seen, user, {"role": "assistant", "content": answer}]
                if state is history:
                    pretty, verdict = json_verdict(answer, models.schema)
                    verdict = "\n\n".join(x for x in (verdict, top3) if x)
                    done.update({json_box: gr.Column(visible=json_task or pretty is not None),
                                 json_view: pretty or "", json_verdict_md: verdict or ""})
            else:
                done[status] = ""
            yield done

        def reset():
            return {chat: [], base_chat: [], history: [], base_history: [], status: "", json_view: "",
                    json_verdict_md: "", message: ""}

        inputs = [message, history, base_history, system, temperature, top_p, max_new, compare]
        outputs = [message, chat, base_chat, history, base_history, json_box, json_view, json_verdict_md, status]
        # One queue for both ways of sending: a second request waits for the first to finish.
        for trigger in (send.click, message.submit):
            trigger(respond, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
        clear.click(reset, None, [chat, base_chat, history, base_history, status, json_view, json_verdict_md,
                                  message], queue=False)
        compare.change(lambda on: gr.Chatbot(visible=bool(on)), compare, base_chat, queue=False)
        # The chat's own trash button clears what is shown; forget what the model saw too.
        chat.clear(lambda: ([], ""), None, [history, json_view], queue=False)
        base_chat.clear(lambda: [], None, base_history, queue=False)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def run(cfg: ServeConfig) -> int:
    """Load the target once and serve the page until interrupted."""
    warning = check_host(cfg.host, cfg.share_on_network)
    check_port(cfg.host, cfg.port)
    # Gradio's usage analytics would call out to the internet; nothing leaves this machine.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("llm-ft serve needs Gradio: pip install 'llm-ft[web]'") from None
    if warning:
        print(warning, file=sys.stderr)
    models = Models(cfg)
    demo = build_app(models, cfg)
    try:
        demo.launch(server_name=cfg.host, server_port=cfg.port, share=False, prevent_thread_lock=True, quiet=True,
                    ssr_mode=False, mcp_server=False, show_error=False)
    except OSError:  # taken between check_port and now
        raise UserError(f"--port {cfg.port}: cannot listen on {cfg.host}:{cfg.port}; pick another port with --port") \
            from None
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving {models.target.kind} {models.target.name} at http://{host}:{cfg.port}/ (Ctrl+C to stop)",
          flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0


def build_parser():
    return make_parser("serve", "A local web page (Gradio) to chat with a run, a model or a GGUF file: streaming "
                       "answers, sampling controls, the system prompt, a comparison with the base model, and JSON "
                       "answers checked against the schema. Binds to 127.0.0.1 by default.", ServeConfig)


def main(argv=None) -> int:
    return main_for(build_parser, ServeConfig, run, argv)
