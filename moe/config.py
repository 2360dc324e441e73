"""Run configuration: four frozen dataclasses, read from and written to TOML.

A run is fully described by a `RunConfig` (sections `[model]`, `[train]`,
`[data]`, `[eval]`). Every run writes its resolved config next to its outputs,
and `config_hash` of that config is the run id a sweep uses, so relaunching the
same spec finds the same runs.

Bad input raises `ConfigError` (a `ValueError`) with a one-line message that
names the field and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and why."""


EXPERT_BACKENDS = ("auto", "loop", "torch", "triton", "megablocks")
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the decoder LM. n_experts = 1, top_k = 1 is a dense model."""

    d_model: int = 64
    """Residual stream width."""
    n_layers: int = 2
    """Number of transformer blocks; every block has an MoE (or dense) FFN."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (None = n_heads)."""
    n_experts: int = 8
    """Experts per MoE layer (E)."""
    top_k: int = 2
    """Experts each token is routed to (k); sparsity = 1 - k/E."""
    ffn_mult: float = 2.0
    """Expert hidden width = ffn_mult * d_model (the paper uses 2)."""
    vocab_size: int = 258
    """Embedding rows; must cover the tokenizer's ids."""
    seq_len: int = 128
    """Training context length in tokens."""
    experts_backend: str = "auto"
    """Grouped-matmul backend for the experts: auto | loop | torch | triton | megablocks."""
    tie_embeddings: bool = False
    """Share the input embedding and output head (the paper unties them)."""
    norm_topk_prob: bool = True
    """Renormalise the k router weights to sum to 1 (Mixtral) or not (OLMoE)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init; output projections are scaled by 1/sqrt(2*n_layers)."""

    def __post_init__(self) -> None:
        _positive(self, "d_model", "n_layers", "n_heads", "n_experts", "top_k", "vocab_size",
                  "seq_len", "ffn_mult", "rope_theta", "norm_eps", "init_std")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by "
                              f"model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model.d_model / model.n_heads = {self.d_model // self.n_heads} "
                              "must be even for rotary embeddings")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ConfigError(f"model.n_kv_heads={kv} must be positive and divide "
                              f"model.n_heads={self.n_heads}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be <= model.n_experts="
                              f"{self.n_experts}")
        hidden = self.ffn_mult * self.d_model
        if abs(hidden - round(hidden)) > 1e-9:
            raise ConfigError(f"model.ffn_mult * model.d_model = {hidden} must be a whole number")
        _choice(self, "experts_backend", EXPERT_BACKENDS)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def d_hidden(self) -> int:
        """Expert (SwiGLU) hidden width."""
        return int(round(self.ffn_mult * self.d_model))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def sparsity(self) -> float:
        """1 - k/E: the fraction of expert parameters a token does not use."""
        return 1.0 - self.top_k / self.n_experts

    @property
    def is_dense(self) -> bool:
        return self.n_experts == 1


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and budget. Exactly one of `tokens` and `tpp` is set."""

    tokens: int | None = None
    """Training tokens (the paper's fixed-budget mode)."""
    tpp: float | None = 20.0
    """Tokens per parameter: tokens = tpp * total parameters (the paper counts total)."""
    batch_size: int = 16
    """Sequences per optimizer step (global, across data-parallel ranks)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; batch_size must be divisible by it."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Final learning rate of the cosine / WSD decay."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    schedule: str = "cosine"
    """cosine | wsd (warmup-stable-decay) | constant."""
    decay_frac: float = 0.2
    """WSD only: fraction of steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    aux_loss_coef: float = 1e-2
    """Weight of the load-balance loss."""
    z_loss_coef: float = 1e-3
    """Weight of the router z-loss."""
    seed: int = 0
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk (older ones are deleted)."""
    log_every: int = 5
    """Optimizer steps between metrics.jsonl lines."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16."""
    device: str = "auto"
    """auto | cpu | cuda."""
    num_threads: int = 0
    """torch CPU threads (0 = torch's default)."""

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.tpp is None):
            raise ConfigError("set exactly one of train.tokens and train.tpp "
                              f"(got tokens={self.tokens}, tpp={self.tpp})")
        if self.tokens is not None and self.tokens <= 0:
            raise ConfigError(f"train.tokens={self.tokens} must be positive")
        if self.tpp is not None and self.tpp <= 0:
            raise ConfigError(f"train.tpp={self.tpp} must be positive")
        _positive(self, "batch_size", "grad_accum", "lr", "checkpoint_every", "keep_checkpoints",
                  "log_every")
        _nonnegative(self, "min_lr", "warmup_steps", "weight_decay", "grad_clip",
                     "aux_loss_coef", "z_loss_coef", "num_threads")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by "
                              f"train.grad_accum={self.grad_accum}")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must be <= train.lr={self.lr}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ConfigError(f"train.decay_frac={self.decay_frac} must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "precision", PRECISIONS)
        _choice(self, "device", DEVICES)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training tokens come from.

    `source = "pocket"` generates the synthetic pocket corpus (see
    `moe.data.pocket`) from the `pocket_*` knobs below; any other value is a
    directory of token shards written by `moe data prepare`.
    """

    source: str = "pocket"
    """"pocket" or a directory of token shards."""
    val_fraction: float = 0.02
    """Share of the token stream held out for validation loss."""
    val_batches: int = 4
    """Batches of `train.batch_size` sequences used for the validation loss."""
    pocket_seed: int = 1234
    """Seed of the pocket knowledge base and problems (independent of train.seed)."""
    pocket_entities: int = 200
    """Entities in the synthetic knowledge base."""
    pocket_attributes: int = 4
    """Attributes per entity (each with a random value): facts = entities * attributes."""
    pocket_fact_repeats: int = 8
    """Times each fact statement appears in the corpus (in varied templates)."""
    pocket_arith_problems: int = 4000
    """Multi-step arithmetic problems with worked solutions in the corpus."""
    pocket_arith_steps: int = 3
    """Operations per arithmetic problem."""
    pocket_arith_max: int = 50
    """Operands are drawn from [1, pocket_arith_max]."""
    pocket_eval_items: int = 200
    """Held-out evaluation items per pocket task."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError('data.source must be "pocket" or a directory of token shards')
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5)")
        _positive(self, "val_batches", "pocket_entities", "pocket_attributes",
                  "pocket_fact_repeats", "pocket_arith_steps", "pocket_arith_max",
                  "pocket_eval_items")
        _nonnegative(self, "pocket_arith_problems")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Task evaluation at the end of training (and every `every` steps if > 0)."""

    tasks: tuple[str, ...] = ()
    """Task names from the registry (`moe eval --list`), e.g. pocket-memorization."""
    every: int = 0
    """Evaluate tasks every this many optimizer steps too (0 = only at the end)."""
    max_items: int = 200
    """Items per task (0 = all)."""
    n_shots: int = -1
    """Few-shot examples per prompt (-1 = the task's default)."""
    batch_size: int = 16
    """Items per forward pass."""
    accuracy: bool = True
    """Also compute accuracy by greedy generation (slower than the loss)."""

    def __post_init__(self) -> None:
        _nonnegative(self, "every", "max_items")
        _positive(self, "batch_size")
        if self.n_shots < -1:
            raise ConfigError(f"eval.n_shots={self.n_shots} must be >= 0, or -1 for the default")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines one run; its TOML is the run's `config.toml`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: _section_to_dict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "train": TrainConfig, "data": DataConfig, "eval": EvalConfig,
}


# --------------------------------------------------------------------------- building


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from nested dicts (as parsed from TOML)."""
    if not isinstance(raw, dict):
        raise ConfigError("a run config must be a table with sections [model], [train], [data], "
                          "[eval]")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid: {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        if name == "train":
            values = _budget_mode(values)
        sections[name] = _build_section(name, cls, values)
    return RunConfig(**sections)


def _budget_mode(train: dict[str, Any]) -> dict[str, Any]:
    """A [train] table must give exactly one of tokens and tpp (None counts as absent)."""
    given = [k for k in ("tokens", "tpp") if train.get(k) is not None]
    if len(given) != 1:
        raise ConfigError("set exactly one of train.tokens and train.tpp in [train] "
                          f"(got {' and '.join(given) if given else 'neither'})")
    other = "tpp" if given == ["tokens"] else "tokens"
    return {**train, other: None}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML run config and apply `--set key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return apply_overrides(raw, overrides)


def apply_overrides(raw: dict[str, Any] | RunConfig, overrides: list[str] | tuple[str, ...]
                    ) -> RunConfig:
    """Apply dotted `section.key=value` strings; values are parsed as TOML literals.

    `model.n_experts=16`, `eval.tasks=["pocket-memorization"]`, `data.source=path/to/shards`
    (a bare word that is not a TOML literal is taken as a string).
    """
    data = raw.to_dict() if isinstance(raw, RunConfig) else _deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(data, key.strip(), parse_value(text.strip()))
    return config_from_dict(data)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.field` in nested dicts, rejecting unknown keys with the valid ones."""
    section, dot, name = key.partition(".")
    if not dot or section not in SECTIONS:
        raise ConfigError(f"unknown config key {key!r}; keys look like section.field with section "
                          f"in {sorted(SECTIONS)}")
    valid = field_names(SECTIONS[section])
    if name not in valid:
        raise ConfigError(f"unknown config key {key!r}; valid [{section}] keys: "
                          f"{', '.join(valid)}")
    table = data.setdefault(section, {})
    table[name] = value
    # The budget is either tokens or tpp: setting one on the command line switches mode.
    budget_pair = {"tokens": "tpp", "tpp": "tokens"}
    if section == "train" and name in budget_pair:
        table.pop(budget_pair[name], None)


def parse_value(text: str) -> Any:
    """Parse a TOML literal (`16`, `1e-3`, `true`, `"x"`, `[1, 2]`); else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def valid_keys() -> list[str]:
    """Every dotted key a config accepts (for error messages and --help)."""
    return [f"{s}.{n}" for s, cls in SECTIONS.items() for n in field_names(cls)]


def config_hash(cfg: RunConfig, length: int = 10) -> str:
    """Short content hash of the resolved config: a sweep's run id."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# --------------------------------------------------------------------------- type checks


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    valid = field_names(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in valid:
            raise ConfigError(f"unknown config key '{section}.{name}'; valid [{section}] keys: "
                              f"{', '.join(valid)}")
        kwargs[name] = _coerce(f"{section}.{name}", value, hints[name])
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - kw_only dataclass, names already checked
        raise ConfigError(f"[{section}]: {exc}") from None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(key, v, item_tp) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)  # lets `tokens = 1.25e11` mean an integer budget
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be finite, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - all fields use the types above
        raise ConfigError(f"{key}: unsupported field type {tp}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise ConfigError(f"{_section_of(obj)}.{name}={getattr(obj, name)} must be positive")


def _nonnegative(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{_section_of(obj)}.{name}={getattr(obj, name)} must be >= 0")


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(f"{_section_of(obj)}.{name}={getattr(obj, name)!r} must be one of "
                          f"{', '.join(choices)}")


def _section_of(obj: Any) -> str:
    for name, cls in SECTIONS.items():
        if isinstance(obj, cls):
            return name
    return type(obj).__name__  # pragma: no cover


def _section_to_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _deepcopy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}


# --------------------------------------------------------------------------- TOML out


def dumps_toml(data: dict[str, Any]) -> str:
    """Write nested dicts of scalars and lists as TOML (tables, then nested tables).

    Keys whose value is None are omitted, since TOML has no null; reading the
    file back gives the field's default, which for every optional field here is
    None as well.
    """
    lines: list[str] = []
    _dump_table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(lines: list[str], prefix: list[str], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append("")
        lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        _dump_table(lines, [*prefix, key], value)


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
