"""Structured output: schema-constrained decoding in the three engines, the enum field's confidence, and
their reports (``llm-ft eval --format``), on the tiny model trained a little."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]

UNSEEN = ["turn the lights off in the kitchen", "remind me to call mom at 5pm", "what time is it in Tokyo",
          "set an alarm for 7am", "play a song by Queen"]
NO_ENUM = {"type": "object", "required": ["intent", "slots"], "additionalProperties": False,
           "properties": {"intent": {"type": "string", "maxLength": 20},
                          "slots": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 20}}}}


def tied_schema() -> dict:
    """test_eval's intents, each with its own slots (one anyOf branch per intent, as data/schema.json): a
    grammar that dropped the per-intent rules would let a set_timer answer out without its duration."""
    from test_eval import SCHEMA

    slots = {"set_timer": (["duration"], ["duration"]), "play_music": (["song", "artist", "genre"], []),
             "get_weather": (["location", "date"], []), "set_reminder": (["task", "time"], ["task"])}
    return {"type": "object", "anyOf": [
        {"type": "object", "required": ["intent", "slots"], "additionalProperties": False,
         "properties": {"intent": {"const": intent}, "slots": {
             "type": "object", "additionalProperties": False, "required": slots[intent][1],
             "properties": {k: {"type": "string", "minLength": 1} for k in slots[intent][0]}}}}
        for intent in SCHEMA["properties"]["intent"]["enum"]]}


def fmt_of(schema: dict, tmp_path: Path, name: str = "schema.json"):
    from common.structured.schema import load_format

    p = tmp_path / name
    p.write_text(json.dumps(schema))
    return load_format(p)


# ---------------------------------------------------------------------------
# pure parts


def test_enum_field_fallback_and_threshold_answer(tmp_path):
    from test_eval import SCHEMA

    from common.structured.schema import enum_field, with_fallback

    assert enum_field(NO_ENUM) is None
    e = enum_field(SCHEMA)
    assert e.key == "intent" and e.values[0] == "set_timer" and e.fallback is None  # no unknown in this enum
    data = fmt_of(json.loads(Path("data/schema.json").read_text()), tmp_path)
    assert data.enum.key == "intent" and data.enum.fallback == "unknown" and len(data.enum.values) == 14
    # One const per anyOf branch is an enum field too, with the values in the schema's order.
    tied = enum_field(tied_schema())
    assert tied.key == "intent" and tied.values == e.values and tied.fallback is None
    # The fallback keeps the answer valid: data/schema.json wants no slots for unknown.
    assert with_fallback({"intent": "set_timer", "slots": {"duration": "5 min"}}, data) == {"intent": "unknown",
                                                                                           "slots": {}}


def test_per_branch_consts_are_labels_and_keys(tmp_path):
    from test_eval import SCHEMA

    from common.evaluate.metrics import schema_labels
    from common.structured.schema import mentions_schema, top_keys

    data = json.loads(Path("data/schema.json").read_text())
    assert schema_labels(data)[0] == "set_timer" and schema_labels(data)[-1] == "unknown"
    assert schema_labels(tied_schema()) == schema_labels(SCHEMA) == SCHEMA["properties"]["intent"]["enum"]
    assert schema_labels(data, "slots") is None
    assert top_keys(data) == ["intent", "slots"] and top_keys(SCHEMA) == ["intent", "slots"]
    assert mentions_schema('Answer {"intent": ..., "slots": {...}}', data)
    assert not mentions_schema("Answer in JSON", data)


def test_data_schema_compiles_with_nothing_left_out(tmp_path, tiny_tokenizer_dir):
    """data/schema.json ties slots to intents in a form the grammar enforces: a slot of another intent is
    refused while decoding, not only found invalid afterwards."""
    pytest.importorskip("llguidance")
    from common.models import load_tokenizer
    from common.structured.constraint import Constraint

    fmt = fmt_of(json.loads(Path("data/schema.json").read_text()), tmp_path)
    tok = load_tokenizer(tiny_tokenizer_dir)
    c = Constraint(fmt, tok, [tok.eos_token_id])
    assert fmt.notes == []  # no keyword the grammar drops

    def accepted(text: str) -> bool:
        ids = tok.encode(text, add_special_tokens=False)
        return c._template.deep_copy().validate_tokens(ids) == len(ids)

    assert accepted('{"intent": "set_timer", "slots": {"duration": "5 min"}}')
    assert not accepted('{"intent": "set_timer", "slots": {"genre": "jazz"}}')
    assert not accepted('{"intent": "unknown", "slots": {"duration": "5 min"}}')
    assert not accepted('{"intent": "set_timer", "slots": {}}')  # its required duration


def test_calibration_numbers():
    from common.structured.calibration import accuracy_at_coverage, calibration_report, expected_calibration_error

    conf = [0.95, 0.95, 0.55, 0.55, 1.0]
    correct = [True, True, True, False, True]
    # bins: [0.5,0.6) conf .55 acc .5 -> 2/5*.05; [0.9,1.0] conf (.95+.95+1)/3 acc 1 -> 3/5*(1-.9667)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.4 * 0.05 + 0.6 * (1 - 2.9 / 3))
    at = accuracy_at_coverage(conf, correct, 0.6)
    assert at["kept"] == 3 and at["accuracy"] == 1.0 and at["threshold"] == 0.95
    rep = calibration_report(conf, correct)
    assert sum(b["n"] for b in rep["bins"]) == 5 and rep["at_coverage"][0]["accuracy"] == 0.8


def test_value_prefix_and_normalise():
    from common.structured.confidence import normalise, value_prefix

    assert value_prefix('{"intent":  "x", "slots": {}}', "intent") == '{"intent":  "'
    assert value_prefix("garbage", "intent") == '{"intent": "'
    p = normalise([-1000.0, -1001.0, -1002.0])
    assert sum(p) == pytest.approx(1.0) and p[0] > p[1] > p[2]


def test_uncompilable_schema_names_file_and_construct(tmp_path, tiny_tokenizer_dir):
    pytest.importorskip("llguidance")
    from common.errors import UserError
    from common.models import load_tokenizer
    from common.structured.constraint import Constraint

    fmt = fmt_of({"type": "object", "properties": {"code": {"type": "string", "pattern": "(?<=a)b"}}}, tmp_path,
                 "lookbehind.json")
    with pytest.raises(UserError) as err:
        Constraint(fmt, load_tokenizer(tiny_tokenizer_dir), [2])
    assert "lookbehind.json" in err.value.message and "look-around" in err.value.message


def test_uncompilable_schema_in_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    from common.errors import UserError
    from common.structured.constraint import llama_grammar

    fmt = fmt_of({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, tmp_path, "dangling.json")
    with pytest.raises(UserError) as err:
        llama_grammar(fmt)
    assert "dangling.json" in err.value.message


def test_threshold_needs_an_enum_with_a_fallback(tmp_path):
    from test_eval import SCHEMA

    from common.errors import UserError
    from common.structured.classify import check_threshold

    with pytest.raises(UserError, match="no fallback value"):
        check_threshold(0.5, fmt_of(SCHEMA, tmp_path))
    with pytest.raises(UserError, match="needs an enum field"):
        check_threshold(0.5, fmt_of(NO_ENUM, tmp_path, "no-enum.json"))
    check_threshold(None, None)


# ---------------------------------------------------------------------------
# a tiny run trained a little, in the three engines


@pytest.fixture(scope="module")
def run_root(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """A run (tiny llama + LoRA trained 120 steps), its test data and schema, and its merged weights in f16."""
    pytest.importorskip("peft")
    import torch
    from test_eval import SYSTEM, TRAINED, train_adapter
    from test_eval import UNSEEN as SEEN_LATER

    root = tmp_path_factory.mktemp("structured")
    run = root / "runs" / "tiny-run"
    model = train_adapter(tiny_model_dir, run / "adapter", TRAINED, steps=120)
    (run / "config.json").write_text(json.dumps({"model": str(tiny_model_dir), "backend": "torch",
                                                 "base_model": {"path": str(tiny_model_dir)}, "data": ["data"]}))
    (run / "system_prompt.txt").write_text(SYSTEM + "\n")
    merged = root / "merged-f16"
    model.merge_and_unload().to(torch.float16).save_pretrained(str(merged), safe_serialization=True)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special", "chat_template", "generation")):
            (merged / f.name).write_bytes(f.read_bytes())
    data = root / "data"
    data.mkdir()
    rows = [*TRAINED, SEEN_LATER] + [(u, {"intent": "set_timer", "slots": {}}) for u in UNSEEN]
    with open(data / "test.jsonl", "w") as fh:
        for user, answer in rows:
            fh.write(json.dumps({"messages": [{"role": "user", "content": user},
                                              {"role": "assistant", "content": json.dumps(answer)}]}) + "\n")
    (data / "schema.json").write_text(json.dumps(tied_schema()))  # slots tied to intents, as data/schema.json
    return root, run, merged


def gguf_of(model_dir: Path, out: Path, quant: str) -> Path:
    from common.export.arch import load_hparams, spec_for
    from common.export.gguf_file import write_gguf
    from common.export.merge import open_merged
    from common.export.tokenizer import build_vocab
    from common.models import load_tokenizer
    from common.prompts import resolve_template

    hp = load_hparams(model_dir)
    vocab = build_vocab(model_dir, int(hp["vocab_size"]), chat_template=resolve_template(load_tokenizer(model_dir)),
                        eot_token="<|im_end|>", pre_override="gpt-2")
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(open_merged(model_dir, None), hp, spec_for(hp), vocab, out, quant, name="tiny",
                      progress=False).path


def evaluate(target: str, out: Path, **kw) -> dict:
    from common.evaluate.cmd import EvalConfig
    from common.evaluate.cmd import run as run_eval

    run_eval(EvalConfig(target=target, data="data/test.jsonl", out=str(out), max_new_tokens=64, loss=False, **kw))
    return json.loads((out / "metrics.json").read_text())


ENGINES = [pytest.param("torch", marks=pytest.mark.torch), pytest.param("mlx", marks=pytest.mark.mlx),
           pytest.param("llama", marks=pytest.mark.llama)]


@pytest.mark.parametrize("engine", ENGINES)
def test_constrained_answers_are_schema_valid_and_free_ones_unchanged(engine, run_root, monkeypatch):
    pytest.importorskip("llguidance")
    pytest.importorskip({"torch": "torch", "mlx": "mlx_lm", "llama": "llama_cpp"}[engine])
    root, run, _ = run_root
    monkeypatch.chdir(root)
    target, backend = str(run), engine
    if engine == "llama":  # the run exported as an f32 GGUF into RUN/export/ (it belongs to the run)
        from test_chat import write_tiny_gguf

        target = str(write_tiny_gguf(json.loads((run / "config.json").read_text())["base_model"]["path"],
                                     run / "export" / "model.gguf", adapter_dir=run / "adapter"))
        backend = "auto"
    free = evaluate(target, root / f"free-{engine}", backend=backend)
    both = evaluate(target, root / f"both-{engine}", backend=backend, format="schema")
    # --format adds a second decoding; the free numbers and answers stay what they were without it.
    assert both["metrics"] == free["metrics"] and both["samples"] == free["samples"]
    c = both["constrained"]
    assert c["metrics"]["n"] == 9 and c["metrics"]["parse_rate"] == 1.0 and c["metrics"]["schema_valid_rate"] == 1.0
    from common.structured.schema import enum_field

    values = set(enum_field(json.loads((root / "data" / "schema.json").read_text())).values)
    assert all(json.loads(a)["intent"] in values for a in c["answers"])
    conf = c["confidence"]
    assert conf["field"] == "intent" and 0 <= conf["ece"] <= 1
    for row in conf["per_row"]:
        assert row["label"] in values and 0 < row["probability"] <= 1 and len(row["top3"]) == 3
    assert Path(conf["reliability_png"]).read_bytes()[:4] == b"\x89PNG"
    assert c["metrics"]["intent_accuracy"] >= 3 / 9  # the trained rows


@pytest.mark.llama
def test_llama_grammar_checked_one_token_at_a_time_equals_full_grammar(tiny_model_dir, tmp_path):
    """The one-candidate grammar check (full vocabulary only on a rejection) answers, greedily, exactly what
    applying the grammar to the whole vocabulary every token answers (schema validity on a trained model:
    test_constrained_answers_are_schema_valid_and_free_ones_unchanged)."""
    pytest.importorskip("llama_cpp")
    from test_chat import write_tiny_gguf

    from common.generation import load_generator
    from common.structured.constraint import use_format
    from common.structured.schema import load_format

    gguf = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")  # untrained: its argmax is often rejected
    fmt = load_format("data/schema.json")
    gen = load_generator(str(gguf), backend="llama", system_prompt="Answer with JSON.")
    try:
        use_format(gen, fmt)
        stops = set(gen.stop_ids)
        for msg in [*UNSEEN, "set a timer for ten minutes"]:
            prompt = gen.chat_prompt([{"role": "user", "content": msg}])
            ours = gen.generate([{"role": "user", "content": msg}], max_new_tokens=200, temperature=0.0)
            full = []
            for tid in gen.llm.generate(prompt, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True,
                                        grammar=gen.constraint):
                if tid in stops or gen._is_eog(tid) or len(full) == 200:
                    break
                full.append(tid)
            assert ours == gen.tokenizer.decode(full, skip_special_tokens=True), msg
            sampled = [gen.generate([{"role": "user", "content": msg}], max_new_tokens=60, temperature=0.8,
                                    top_p=0.95, seed=seed) for seed in (1, 1, 2)]
            assert sampled[0] == sampled[1]  # seeded
            # (an untrained model writes noise into the slots' strings; the keys and the intent are the grammar's)
            start = re.compile(r'\{\s*"intent"\s*:\s*"(' + "|".join(fmt.enum.values) + r')"\s*,\s*"slots"\s*:\s*\{')
            assert all(start.match(answer) for answer in [ours, *sampled]), [ours, *sampled]
    finally:
        gen.close()


def probabilities(engine: str, model: str | Path, prompts: list[str], answer: str) -> list[dict[str, float]]:
    from test_eval import SYSTEM

    from common.generation import load_generator
    from common.structured.confidence import enum_distribution
    from common.structured.schema import enum_field

    gen = load_generator(str(model), backend=engine, system_prompt=SYSTEM)
    try:
        return [enum_distribution(gen, gen.chat_prompt([{"role": "user", "content": p}]), answer,
                                  enum_field(tied_schema())) for p in prompts]
    finally:
        gen.close()


@pytest.mark.torch
@pytest.mark.mlx
@pytest.mark.llama
def test_enum_probabilities_sum_to_one_and_agree_across_engines(run_root, tmp_path):
    pytest.importorskip("mlx_lm")
    pytest.importorskip("llama_cpp")
    _, _, merged = run_root
    gguf = gguf_of(merged, tmp_path / "merged-f16.gguf", "f16")
    prompts = ["set a timer for ten minutes", "play some jazz", UNSEEN[1]]
    answer = '{"intent": "get_weather", "slots": {}}'  # only its prefix matters: {"intent": "
    got = {"torch": probabilities("torch", merged, prompts, answer), "mlx": probabilities("mlx", merged, prompts, answer),
           "llama": probabilities("llama", gguf, prompts, answer)}
    for engine, rows in got.items():
        for probs in rows:
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4), engine
    assert max(got["torch"][0], key=got["torch"][0].get) == "set_timer"  # trained: the model is sure of it
    for other in ("mlx", "llama"):
        for a, b in zip(got["torch"], got[other], strict=True):
            assert max(abs(a[v] - b[v]) for v in a) < 1e-2, (other, a, b)


def full_pass_logp(engine: str, model, context: list[int], c: list[int], ends: list[int]) -> float:
    """log p(c | context) + log p(one of ends | context + c), from one forward pass over the whole sequence."""
    ids = context + c
    if engine == "torch":
        import torch

        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1).numpy()
    else:
        import mlx.core as mx

        logits = model(mx.array([ids]))[0].astype(mx.float32)
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)
    n = len(context)
    total = sum(logp[n - 1 + j, t] for j, t in enumerate(c))
    return float(total + np.log(np.exp(logp[n - 1 + len(c), ends]).sum()))


@pytest.mark.parametrize("engine", [pytest.param("torch", marks=pytest.mark.torch),
                                    pytest.param("mlx", marks=pytest.mark.mlx)])
def test_scoring_from_the_shared_context_cache_equals_scoring_each_sequence(engine, run_root):
    """The context runs once and its KV cache serves every continuation: the same log-probs as one
    full pass over each context + continuation on its own."""
    pytest.importorskip({"torch": "torch", "mlx": "mlx_lm"}[engine])
    from test_eval import SYSTEM

    from common.generation import load_generator

    _, run, _ = run_root
    gen = load_generator(str(run), backend=engine, system_prompt=SYSTEM)
    try:
        context = gen.chat_prompt([{"role": "user", "content": "play some jazz"}])
        vocab = len(gen.tokenizer)
        continuations = [[5, 9, 30], [17], [40, 41, 42, 43, 44], [vocab - 1, 3]]
        ends = [7, 11]
        cached = gen.score_continuations(context, continuations, ends)
        alone = [full_pass_logp(engine, gen.model, context, c, ends) for c in continuations]
    finally:
        gen.close()
    assert cached == pytest.approx(alone, rel=1e-4, abs=1e-4)


@pytest.mark.torch
def test_schema_without_enum_gives_no_confidence(run_root, tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    root, run, _ = run_root
    monkeypatch.chdir(root)
    no_enum = tmp_path / "no-enum.json"
    no_enum.write_text(json.dumps(NO_ENUM))
    result = evaluate(str(run), tmp_path / "eval", backend="torch", format=str(no_enum), limit=3)
    c = result["constrained"]
    assert "confidence" not in c and c["metrics"]["parse_rate"] == 1.0
    assert not (tmp_path / "eval" / "reliability.png").exists()


@pytest.mark.torch
def test_classify_and_threshold(run_root, tmp_path, monkeypatch):
    pytest.importorskip("llguidance")
    from test_eval import SCHEMA

    from common.structured import Classifier

    root, run, _ = run_root
    monkeypatch.chdir(root)
    schema = dict(SCHEMA, properties=dict(SCHEMA["properties"], intent={
        "enum": [*SCHEMA["properties"]["intent"]["enum"], "unknown"]}))
    path = tmp_path / "with-unknown.json"
    path.write_text(json.dumps(schema))
    with Classifier(str(run), format=str(path), backend="torch", max_new_tokens=64) as clf:
        free = clf(["set a timer for ten minutes", UNSEEN[2]])
        clf.threshold = 1.0  # nothing is that sure: every answer falls back
        held = clf(["set a timer for ten minutes"])
    value, p, answer = free[0]
    assert value == "set_timer" and 0.5 < p <= 1 and answer["intent"] == "set_timer"
    assert all(v in schema["properties"]["intent"]["enum"] for v, _, _ in free)
    assert held[0][0] == "unknown" and held[0][2]["intent"] == "unknown" and held[0][1] < 0.5


# ---------------------------------------------------------------------------
# export: the schema beside the Modelfile, the Ollama requests; the demo's table


def test_export_writes_schema_and_warns_when_the_prompt_does_not_name_it(tmp_path, capsys):
    from common.structured.ollama import export_schema, ollama_usage

    schema = json.loads(Path("data/schema.json").read_text())
    run = tmp_path / "runs" / "r"
    (run / "adapter").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "schema.json").write_text(json.dumps(schema))
    (run / "config.json").write_text(json.dumps({"data": [str(tmp_path / "data")], "base_model": {"path": "x"}}))
    notes: list[str] = []
    out = export_schema(run / "export", run, 'Reply with {"intent": ..., "slots": {...}}', notes)
    assert out == run / "export" / "schema.json" and json.loads(out.read_text()) == schema and notes == []
    export_schema(run / "export", run, "You are helpful.", notes)
    assert len(notes) == 1 and "intent, slots" in notes[0]
    usage = ollama_usage("intent", out, schema, "set a timer for 5 minutes")
    lines = usage.splitlines()
    assert lines[1].strip() == f"ollama run intent --format \"$(cat {out})\" 'set a timer for 5 minutes'"
    body = json.loads(lines[3])
    assert body["format"] == schema and body["model"] == "intent" and body["stream"] is False


def test_demo_summary_has_free_and_constrained_rows(tmp_path, capsys):
    import importlib.util

    def metrics(**m):
        base = {"n": 10, "parse_rate": 1.0, "schema_valid_rate": 0.95, "exact_match": 0.7, "intent_accuracy": 0.95,
                "intent_macro_f1": 0.9, "field_accuracy": 0.8}
        return {**base, **m}

    def write(path, free, constrained=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {"metrics": free}
        if constrained:
            result["constrained"] = {"metrics": constrained, "confidence": {
                "ece": 0.05, "at_coverage": [{"coverage": 0.9, "accuracy": 0.99}]}}
        path.write_text(json.dumps(result))

    write(tmp_path / "eval-base" / "metrics.json", metrics(intent_accuracy=0.1))
    write(tmp_path / "eval" / "metrics.json", metrics(), metrics(schema_valid_rate=1.0, exact_match=0.75))
    write(tmp_path / "export" / "eval-gguf" / "metrics.json", metrics(), metrics(schema_valid_rate=1.0))
    (tmp_path / "summary.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("demo_summary", "scripts/demo_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(str(tmp_path), "model.gguf", "1") == 0
    out = capsys.readouterr().out
    assert "fine-tuned + format" in out and "GGUF + format" in out and "0.050" in out and "99.0%" in out
    write(tmp_path / "export" / "eval-gguf" / "metrics.json", metrics(), metrics(schema_valid_rate=0.99))
    # data/schema.json's per-intent slots are anyOf branches every grammar enforces: a constrained miss fails the bar.
    assert mod.main(str(tmp_path), "model.gguf", "1") == 1
    assert "GGUF + format: 99.0% schema-valid, not 100%" in capsys.readouterr().out


@pytest.mark.torch
def test_chat_one_shot_with_format_shows_top3(run_root, monkeypatch, capsys):
    pytest.importorskip("llguidance")
    from common.chat import main

    root, run, _ = run_root
    monkeypatch.chdir(root)  # the run's data (and so its schema.json) resolve here
    assert main([str(run), "--prompt", "play some jazz", "--format", "schema", "--backend", "torch"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"intent": "play_music", "slots": {"genre": "jazz"}}
    top = captured.err.split("intent: ", 1)[1].splitlines()[0]
    # The three likeliest values with their probabilities (a barely trained tiny model spreads its
    # probability: 'play_music' is 8 tokens long in its vocabulary, 'set_timer' 3).
    assert top.count("%") == 3 and len(top.split(", ")) == 3
    # --threshold needs a fallback value, which this schema's enum lacks: one clear line, exit 2.
    assert main([str(run), "--prompt", "x", "--format", "schema", "--threshold", "0.5", "--backend", "torch"]) == 2
    assert "no fallback value" in capsys.readouterr().err
