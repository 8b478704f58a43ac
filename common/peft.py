"""PEFT LoRA adapters: the one place that reads, validates, indexes and writes them.

Both backends write, and merge, export, eval, chat and the MLX loader read, PEFT's layout:
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r, in),
``...lora_B.weight`` (out, r) (``.bias`` with lora_bias), ``...lora_magnitude_vector`` (out,)
for DoRA, ``...lora_embedding_A/B`` for embeddings and whole tensors for ``modules_to_save``,
beside ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``use_rslora``,
``use_dora``, ``fan_in_fan_out``, ``rank_pattern``/``alpha_pattern``, ...). A module's update
is ``s * B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

One acceptance rule (:func:`load_adapter`): a directory passes when its config is a plain
LoRA config and its tensors are complete, chain (r, in) x (out, r), and agree with the
config (rank, DoRA, target modules). Consumers that cannot express some variant (the GGUF
adapter: DoRA; MLX: embeddings, biases) call :meth:`Adapter.refuse` with what they lack.
Every refusal is a UserError naming the file and the key or tensor. Framework-free (numpy).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# peft LoRA variants that change the forward pass in ways nothing here implements
_UNSUPPORTED = ("use_qalora", "use_bdlora", "layer_replication", "target_parameters", "trainable_token_indices",
                "alora_invocation_tokens", "megatron_config")
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
# variants some consumers cannot apply -> how a refusal names them
FEATURES = {"dora": "DoRA", "embedding": "embedding LoRA", "bias": "LoRA bias (lora_bias)",
            "modules_to_save": "modules_to_save", "fan_in_fan_out": "Conv1D layout"}


@dataclass
class ModuleDelta:
    """The adapter's tensors (by key) for one base module (``model.layers.0.self_attn.q_proj``)."""

    module: str
    A: str | None = None
    B: str | None = None
    B_bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False  # lora_embedding_A/B: delta = (B @ A).T
    scaling: float = 1.0
    rank: int = 0
    alpha: float = 0.0


@dataclass
class AdapterModule:
    """One adapted linear layer as arrays, in PEFT orientation (numpy or mlx)."""

    a: Any  # (r, in)
    b: Any  # (out, r)
    magnitude: Any = None  # (out,) DoRA only
    scale: float = 1.0  # multiplies B A x
    alpha: float | None = None  # the lora_alpha that gives ``scale`` (None: derive from scale)

    @property
    def r(self) -> int:
        return int(self.a.shape[0])


@dataclass
class Adapter:
    """A validated PEFT adapter directory; tensors stay on disk (memory-mapped) until read."""

    path: Path
    config: dict
    file: Any  # common.export.st_io.SafeTensorsFile
    deltas: dict[str, ModuleDelta] = field(default_factory=dict)  # base weight name -> delta
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key

    use_dora = property(lambda self: bool(self.config.get("use_dora")))
    use_rslora = property(lambda self: bool(self.config.get("use_rslora")))
    fan_in_fan_out = property(lambda self: bool(self.config.get("fan_in_fan_out")))

    def features(self) -> dict[str, list[str]]:
        """Variant -> where it occurs (tensor keys or config keys), for variants some consumers lack."""
        d = self.deltas.values()
        return {"dora": [x.magnitude for x in d if x.magnitude], "embedding": [x.A for x in d if x.embedding],
                "bias": [x.B_bias for x in d if x.B_bias], "modules_to_save": sorted(self.replacements.values()),
                "fan_in_fan_out": [f"{CONFIG}: fan_in_fan_out: true"] if self.fan_in_fan_out else []}

    def refuse(self, kinds: Iterable[str], consumer: str, hint: str = "") -> None:
        """A UserError listing each of ``kinds`` (see FEATURES) present, which ``consumer`` cannot use."""
        found = self.features()
        problems = [f"{FEATURES[kind]}: {', '.join(found[kind][:3])}" + (" ..." if len(found[kind]) > 3 else "")
                    for kind in kinds if found[kind]]
        if problems:
            raise UserError(f"{self.path}: {consumer} cannot use this adapter{hint}", problems)

    def modules(self, consumer: str = "the MLX loader") -> dict[str, AdapterModule]:
        """Linear modules (by module path) as float32 numpy arrays with their scale."""
        self.refuse(("embedding", "bias", "modules_to_save", "fan_in_fan_out"), consumer,
                    " (it applies linear LoRA/DoRA only; merge or export still can)")
        return {d.module: AdapterModule(self.file.float32(d.A), self.file.float32(d.B),
                                        self.file.float32(d.magnitude) if d.magnitude else None, d.scaling, d.alpha)
                for d in sorted(self.deltas.values(), key=lambda d: d.module)}


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def pattern_value(patterns: Mapping[str, Any] | None, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path by suffix or regex."""
    for key, value in (patterns or {}).items():
        if path == key or path.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a UserError naming the file and line."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); truncated?") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _positive(x: Any, integer: bool = False) -> bool:
    ok = not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0
    return ok and (not integer or x == int(x))


def check_config(config: dict, source: Path) -> None:
    """The config half of the acceptance rule: plain LoRA, with well-typed keys."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type: {config.get('peft_type')!r} (only LORA adapters, incl. DoRA/rsLoRA)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _positive(r, integer=True):
        problems.append(f"r: {r!r} (needs a positive integer)")
    if not _positive(alpha):
        problems.append(f"lora_alpha: {alpha!r} (needs a positive number)")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
        if config.get(key) not in (None, True, False):
            problems.append(f"{key}: {config[key]!r} (needs true or false)")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and
                                        all(_positive(v, integer=key == "rank_pattern") for v in pattern.values())):
            problems.append(f"{key}: {pattern!r} (needs an object of module name -> positive number)")
    tm = config.get("target_modules")
    if tm is not None and not isinstance(tm, str) and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        problems.append(f"target_modules: {tm!r} (needs a list of names or a regex)")
    problems += [f"{key}: {config[key]!r} (not supported)" for key in _UNSUPPORTED if config.get(key)]
    if problems:
        raise UserError(f"{source}: unsupported or invalid adapter config", problems)


def open_weights(path: Path):
    """The safetensors file, checked whole: every tensor a float, its bytes inside the file."""
    from common.export.st_io import DTYPES, FLOAT_DTYPES, SafeTensorsFile

    try:
        f = SafeTensorsFile(path)
        size = path.stat().st_size - f.data_start
    except (KeyError, TypeError, ValueError, OSError) as exc:  # a header that parses but is not safetensors'
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    for name, t in f.tensors.items():
        need = math.prod(t.shape) * DTYPES[t.dtype].itemsize
        if t.dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {t.dtype} (adapter tensors are floats)")
        if t.end - t.begin != need or t.begin < 0:
            raise UserError(f"{path}: corrupt: tensor {name!r} spans {t.end - t.begin} bytes, "
                            f"shape {list(t.shape)} {t.dtype} needs {need}")
        if t.end > size:
            raise UserError(f"{path}: truncated: tensor {name!r} ends at data byte {t.end} but the file "
                            f"holds {max(size, 0)} (copy or save the adapter again)")
    return f


def shape_problems(module: str, a: tuple, b: tuple, magnitude: tuple | None = None) -> list[str]:
    """Why lora_A ``a``, lora_B ``b`` (and DoRA magnitude) do not form one module's update."""
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return [f"{module}: lora_A {tuple(a)} and lora_B {tuple(b)} do not chain (r, in) x (out, r)"]
    if magnitude is not None and tuple(magnitude) != (b[0],):
        return [f"{module}: lora_magnitude_vector {tuple(magnitude)} does not match out features {b[0]}"]
    return []


def _targeted(module: str, targets) -> bool:
    if not isinstance(targets, list):
        return True  # a regex, "all-linear" or absent: peft decided; nothing to compare
    return any(module == t or module.endswith("." + t) for t in targets)


def load_adapter(adapter_dir: str | Path) -> Adapter:
    """Read, validate and index a PEFT adapter directory (the one acceptance rule)."""
    d = Path(adapter_dir)
    cfg_path, weights = d / CONFIG, d / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{d}: not a PEFT adapter (need {CONFIG} and {WEIGHTS})")
    config = read_json(cfg_path)
    check_config(config, cfg_path)
    f = open_weights(weights)
    adapter = Adapter(d, config, f)
    problems = []
    for key in f.keys():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.(weight|bias)", name)
        e = re.fullmatch(r"(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        g = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.weight)?", name)
        if m:
            delta = adapter.deltas.setdefault(m.group(1), ModuleDelta(m.group(1)))
            if m.group(3) == "bias":
                if m.group(2) != "lora_B":
                    problems.append(f"{key}: unexpected LoRA A bias")
                delta.B_bias = key
            else:
                setattr(delta, "A" if m.group(2) == "lora_A" else "B", key)
        elif e:
            delta = adapter.deltas.setdefault(e.group(1), ModuleDelta(e.group(1)))
            delta.embedding = True
            setattr(delta, "A" if e.group(2).endswith("A") else "B", key)
        elif g:
            adapter.deltas.setdefault(g.group(1), ModuleDelta(g.group(1))).magnitude = key
        elif ".base_layer." in name:
            continue  # peft saves the base embedding beside an embedding LoRA; the base dir is the truth
        elif "lora_" in name:
            problems.append(f"{key}: unknown LoRA tensor kind")
        else:  # modules_to_save: a whole replacement tensor
            target = name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            adapter.replacements[target] = key
    by_module, adapter.deltas = adapter.deltas, {}
    for module, delta in sorted(by_module.items()):
        if delta.A is None or delta.B is None:
            problems.append(f"module {module!r} has {'lora_A' if delta.A else 'lora_B'} only")
            continue
        info = f.tensors
        mag = info[delta.magnitude].shape if delta.magnitude else None
        bad = shape_problems(module, info[delta.A].shape, info[delta.B].shape, mag)
        if delta.B_bias and info[delta.B_bias].shape != (info[delta.B].shape[0],):
            bad.append(f"{delta.B_bias}: shape {info[delta.B_bias].shape}, expected ({info[delta.B].shape[0]},)")
        if bad:
            problems += bad
            continue
        delta.rank = int(info[delta.A].shape[0])
        want_r = pattern_value(config.get("rank_pattern"), module, config["r"])
        if delta.rank != want_r:
            problems.append(f"{delta.A}: rank {delta.rank}, but {CONFIG} gives r = {want_r} for {module}")
        if not _targeted(module, config.get("target_modules")) and not delta.embedding:
            problems.append(f"{delta.A}: {module} is not among target_modules {config['target_modules']}")
        delta.alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        delta.scaling = lora_scale(delta.alpha, delta.rank, adapter.use_rslora)
        if delta.magnitude is not None and not adapter.use_dora:
            problems.append(f"{delta.magnitude}: DoRA magnitude present but use_dora is false")
        if delta.embedding and delta.magnitude is not None:
            problems.append(f"{delta.magnitude}: DoRA on an embedding is not supported; train it as plain LoRA")
        if adapter.use_dora and delta.magnitude is None and not delta.embedding:
            problems.append(f"{module}: use_dora is true but lora_magnitude_vector is missing")
        adapter.deltas[f"{module}.weight"] = delta
    if not adapter.deltas and not adapter.replacements and not problems:
        problems.append("no LoRA tensors found")
    if problems:
        raise UserError(f"{weights}: invalid adapter", problems)
    return adapter


def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict[str, AdapterModule], dict]:
    """(linear modules as fp32 numpy, config) of a PEFT adapter, for loaders that apply it unmerged."""
    adapter = load_adapter(adapter_dir)
    return adapter.modules(), adapter.config


# ---------------------------------------------------------------------------
# writing


def layer_index(path: str) -> int | None:
    """The transformer block number in a module path (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = _LAYER_RE.search("." + path + ".")
    return int(m.group(1)) if m else None


def peft_targets(paths: list[str]) -> tuple[list[str], list[int] | None]:
    """``target_modules`` (and ``layers_to_transform``) that make PEFT adapt exactly ``paths``.

    Leaf names plus a layer list when the adapted set is leaf names x layers (the usual
    case); otherwise the full module paths, which PEFT matches by suffix.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    layers = sorted({i for i in (layer_index(p) for p in paths) if i is not None})
    if any(layer_index(p) is None for p in paths):
        return sorted(paths), None
    product = {(leaf, i) for leaf in leaves for i in layers}
    actual = {(p.rsplit(".", 1)[-1], layer_index(p)) for p in paths}
    if product != actual or len(actual) != len(paths):
        return sorted(paths), None
    return leaves, layers


def peft_config(paths: list[str], *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                use_rslora: bool = False, use_dora: bool = False, base_model: str | None = None,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> dict:
    """An ``adapter_config.json`` that makes ``peft.PeftModel.from_pretrained`` rebuild this adapter."""
    targets, layers = peft_targets(paths)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(r), "lora_alpha": float(lora_alpha), "lora_dropout": float(lora_dropout),
        "use_rslora": bool(use_rslora), "use_dora": bool(use_dora),
        "target_modules": targets, "layers_to_transform": layers, "layers_pattern": None,
        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True, "revision": None,
    }


def config_for_modules(modules: Mapping[str, AdapterModule], *, use_rslora: bool = False, lora_dropout: float = 0.0,
                       base_model: str | None = None) -> dict:
    """A PEFT config whose alpha (and per-module patterns) reproduce each module's rank and scale."""
    paths = sorted(modules)
    ranks = {p: modules[p].r for p in paths}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank

    def alpha_of(p: str) -> float:
        if modules[p].alpha is not None:
            return float(modules[p].alpha)
        return modules[p].scale * (math.sqrt(ranks[p]) if use_rslora else ranks[p])

    alpha = alpha_of(next(p for p in paths if ranks[p] == r))
    rank_pattern = {p: ranks[p] for p in paths if ranks[p] != r}
    alpha_pattern = {p: alpha_of(p) for p in paths if not math.isclose(alpha_of(p), alpha, rel_tol=1e-6)}
    use_dora = any(m.magnitude is not None for m in modules.values())
    return peft_config(paths, r=r, lora_alpha=alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                       use_dora=use_dora, base_model=base_model, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def peft_tensors(modules: Mapping[str, AdapterModule]) -> dict[str, Any]:
    """PEFT key -> array for each module (PEFT orientation already)."""
    out = {}
    for path, m in modules.items():
        out[f"{PREFIX}{path}.lora_A.weight"] = m.a
        out[f"{PREFIX}{path}.lora_B.weight"] = m.b
        if m.magnitude is not None:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = m.magnitude
    return out


def write_peft_adapter(out_dir: str | Path, tensors: Mapping[str, Any], config: dict,
                       metadata: dict | None = None, whole_dir: bool = False) -> Path:
    """Write PEFT-named numpy ``tensors`` and ``config`` into ``out_dir`` (temp file, fsync, rename).

    With ``whole_dir`` the directory is built aside and swapped in whole (replacing an
    existing one), else each file is replaced atomically in ``out_dir``.
    """
    import numpy as np
    from safetensors.numpy import save_file

    from common.io import atomic_dir, atomic_path, write_json

    out = Path(out_dir)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}
    if whole_dir:
        with atomic_dir(out) as tmp:
            save_file(arrays, str(tmp / WEIGHTS), metadata=meta)
            write_json(tmp / CONFIG, config)
        return out
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
    write_json(out / CONFIG, config)
    return out
