"""Run configuration: the frozen dataclasses of a run and their validation.

A run is fully described by a `RunConfig` (sections `[model]`, `[train]`,
`[data]`, `[eval]`). Reading and writing TOML lives in `moe.config.tomlio`,
building a config from nested dicts in `moe.config.build`, `--set` overrides in
`moe.config.overrides` and the run id in `moe.config.run_id`; `docs/architecture.md`
("Config contract") describes the whole.

Bad input raises `ConfigError` (a `ValueError`) with a one-line message that
names the field and what to do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moe.config.errors import ConfigError
from moe.config.limits import check_limits
from moe.config.tomlio import dumps_toml

EXPERT_BACKENDS = ("auto", "loop", "torch", "triton", "megablocks")
"""The experts backends' names, in one place: `moe.model.experts` implements exactly these
(tests/test_experts.py checks it) and `moe bench kernels` times them."""
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL_DATA = ("ddp", "fsdp")
ORDERS = ("shuffled", "ascending-quality")


def top_k_fits(top_k: int, n_experts: int) -> bool:
    """top_k <= n_experts: a token is routed to k distinct experts of E. The one home of the
    rule: the config refuses a model that breaks it, a sweep's grid drops its points, the
    router refuses to be built without it."""
    return top_k <= n_experts


def sparsity(top_k, n_experts):
    """1 - k/E: the fraction of expert parameters a token does not use. The one home of the
    rule (numbers or numpy/pandas arrays): the config, the results table and the synthetic
    tables all call it."""
    return 1.0 - top_k / n_experts


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
        if not top_k_fits(self.top_k, self.n_experts):
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
        """1 - k/E (`sparsity`)."""
        return sparsity(self.top_k, self.n_experts)

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
    num_threads: int | str = "auto"
    """torch CPU threads: "auto" (chosen at start from the model's size and the cores free
    then: `moe.train.resources.auto_num_threads`), a count, or 0 (torch's default)."""
    save_every: int = 0
    """Keep a weights-only snapshot every this many steps for `moe merge` (0 = none); kept
    apart from the resume checkpoints and never pruned."""
    ema_decay: float = 0.0
    """EMA of the weights, ema = d * ema + (1 - d) * weights after each step (0 = off)."""
    ema_start: int = 0
    """Optimizer step after which the EMA starts (it is a copy of the weights there)."""
    min_lr_frac: float | None = None
    """Final learning rate as a fraction of `lr` (replaces `min_lr` when set)."""
    compile: bool | None = None
    """torch.compile each block for training and evaluation (unset: on CUDA, off on CPU,
    where compiling costs more than it saves on small models)."""

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
                     "aux_loss_coef", "z_loss_coef")
        if isinstance(self.num_threads, str) and self.num_threads != "auto" or \
                isinstance(self.num_threads, int) and self.num_threads < 0:
            raise ConfigError(f"train.num_threads={self.num_threads!r} must be \"auto\" or a "
                              "count >= 0 (0 = torch's default)")
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
        _nonnegative(self, "save_every", "ema_start")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must be in [0, 1) (0 = off)")
        if self.min_lr_frac is not None and not 0.0 <= self.min_lr_frac <= 1.0:
            raise ConfigError(f"train.min_lr_frac={self.min_lr_frac} must be in [0, 1]")

    @property
    def final_lr(self) -> float:
        """The learning rate the decay ends at: min_lr_frac * lr if set, else min_lr."""
        return self.min_lr if self.min_lr_frac is None else self.min_lr_frac * self.lr


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
    order: str = "shuffled"
    """shuffled (random windows) | ascending-quality (one ordered pass, cleanest data last)."""
    pocket_noise: float = 0.0
    """Fraction of pocket documents with corrupted characters; each gets a noise level in
    (0, 0.5], its quality score is minus that level (0 = a clean corpus)."""
    unique_tokens: int = 0
    """Train on only the first this many training tokens, repeated (0 = all of them)."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError('data.source must be "pocket" or a directory of token shards')
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5)")
        _positive(self, "val_batches", "pocket_entities", "pocket_attributes",
                  "pocket_fact_repeats", "pocket_arith_steps", "pocket_arith_max",
                  "pocket_eval_items")
        _nonnegative(self, "pocket_arith_problems", "unique_tokens")
        _choice(self, "order", ORDERS)
        if not 0.0 <= self.pocket_noise <= 1.0:
            raise ConfigError(f"data.pocket_noise={self.pocket_noise} must be in [0, 1]")


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
    samples: int = 0
    """Self-consistency: sample this many answers per item and report maj@samples (0 = off)."""
    temperature: float = 0.7
    """Sampling temperature of the maj@samples answers."""
    top_p: float = 0.95
    """Nucleus (top-p) mass of the maj@samples answers."""
    seed: int = 0
    """Seed of the maj@samples sampling."""

    def __post_init__(self) -> None:
        _nonnegative(self, "every", "max_items")
        _positive(self, "batch_size")
        if self.n_shots < -1:
            raise ConfigError(f"eval.n_shots={self.n_shots} must be >= 0, or -1 for the default")
        _nonnegative(self, "samples")
        _positive(self, "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"eval.top_p={self.top_p} must be in (0, 1]")


TRACKERS = ("none", "tensorboard", "wandb", "trackio")


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """Experiment tracking: metrics.jsonl scalars also go to a tracker (not in the run id)."""

    tracker: str = "none"
    """none | tensorboard (RUN_DIR/tb) | wandb | trackio; the package is imported only when used."""
    project: str = "moe-sparsity"
    """Project of the wandb / trackio runs."""
    group: str = ""
    """Group of the run ("" = the sweep's name for a run of a sweep)."""
    progress_every_s: float = 30.0
    """Seconds between one-line progress reports on stderr when it is not a terminal (a log
    file, a SLURM job); 0 = none. On a terminal a progress bar is drawn instead."""

    def __post_init__(self) -> None:
        _choice(self, "tracker", TRACKERS)
        if not self.project:
            raise ConfigError("log.project must be a non-empty name")
        if self.progress_every_s < 0:
            raise ConfigError(f"log.progress_every_s={self.progress_every_s} must be >= 0 "
                              "(0 = no progress lines)")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines one run; its TOML is the run's `config.toml`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig())
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        check_limits(self)  # every numeric value bounded and finite (moe.config.limits)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: _section_to_dict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How one run is spread over processes (`torchrun` or a multi-task SLURM job).

    Not part of the run id: the same run trained on other layouts optimises the same
    objective (`moe.train.balance`) on the same global batches.
    """

    data: str = "ddp"
    """ddp (every rank holds all weights) | fsdp (FSDP2: weights, gradients and optimizer
    states sharded over the data-parallel ranks)."""
    expert: int = 1
    """Expert-parallel degree: each rank holds n_experts / expert experts (1 = off)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~1/3 more
    compute)."""
    micro_batch: int = 0
    """Sequences per rank per forward pass; 0 = train.batch_size / train.grad_accum / ranks.
    When set (a planned layout sets it) the step accumulates batch_size / (ranks x
    micro_batch) micro-batches, whatever train.grad_accum says."""
    timeout_min: float = 60.0
    """How long a collective waits for the other ranks before the job fails. Rank 0 alone
    writes checkpoints and evaluates the EMA weights while the others wait at a barrier;
    NCCL's default (10 minutes) is too short for a large model's checkpoint."""

    def __post_init__(self) -> None:
        _choice(self, "data", PARALLEL_DATA)
        _positive(self, "expert", "timeout_min")
        _nonnegative(self, "micro_batch")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "train": TrainConfig, "data": DataConfig, "eval": EvalConfig,
    "parallel": ParallelConfig,
    "log": LogConfig,
}


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


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
