"""Peak GPU memory of a training layout, and the layout planner (torch-free).

A layout spreads one run over `gpus` = nodes x gpus_per_node ranks: data parallel over all
of them (`ddp`: every rank holds every weight; `fsdp`: FSDP2 shards weights, gradients
and optimizer states over all ranks), expert parallel degree P (each rank keeps E/P
experts of every layer), `micro_batch` sequences per rank per forward, `grad_accum`
micro-batches per step (batch_size = gpus x micro_batch x grad_accum), optional
activation checkpointing (AC).

Estimated peak bytes per GPU, with N parameters (N_x of them in experts), L layers, D
width, H expert hidden width, E experts, K top-k, V vocabulary, t = micro_batch x seq_len
tokens, `a` bytes per activation (2 for bf16, 4 for fp32):

    states      ddp:  20 N                 fp32 weight 4 + gradient 4 + DDP bucket 4 + Adam 8
                fsdp: 16 (N - N_x) / G + 16 N_x / G      everything sharded over the G ranks
                      (an expert layer's E/P experts are sharded over the G/P ranks that
                      hold the same experts, so each rank keeps 1/G of them too)
    transient   fsdp: 8 x (2 blocks of unsharded weights: attention + router + N_x/(L P)
                      + embedding and head), bf16 weight 2 + bf16 gradient 2 + fp32 reduce 4
    activations t x [L x A_layer + V (a + 8)]            the logits in bf16, fp32 for the loss
                A_layer = (9a + 24) D + 8E + K (3aD + 5aH)
                with AC: t x [L a D + A_layer + V (a + 8)]   block inputs + one block again

A_layer counts what autograd keeps per token of one block: norm inputs and their fp32
copies, q, k, v and their rotated copies, the attention output (attention); the fp32
router logits and probabilities, and per routed slot the gathered row, gate and up
projections, the SwiGLU product and the expert output (experts). On one CPU process the
estimate is compared with the measured peak in `benchmarks/bench_parallel.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe.config import RunConfig
from moe.params import count_params

GIB = 2 ** 30
HEADROOM = 0.9
"""Plan to at most this fraction of a GPU's memory (allocator fragmentation, CUDA context,
communication buffers)."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one run is spread over a cluster's GPUs."""

    nodes: int
    gpus: int
    data: str
    """ddp | fsdp."""
    fsdp: int
    """Ranks the weights are sharded over (1 = not sharded)."""
    expert: int
    """Expert-parallel degree."""
    micro_batch: int
    """Sequences per GPU per forward pass."""
    grad_accum: int
    activation_checkpointing: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Peak bytes per GPU, by kind."""

    states: float
    """Weights, gradients and optimizer states (sharded or not)."""
    transient: float
    """Unsharded weights and gradients of the blocks in flight (FSDP)."""
    activations: float

    @property
    def total_gib(self) -> float:
        return (self.states + self.transient + self.activations) / GIB


def estimate_memory(cfg: RunConfig, layout: Layout, act_bytes: int = 2) -> MemoryEstimate:
    """The formula of the module docstring."""
    m, counts = cfg.model, count_params(cfg.model)
    n_expert = counts.experts_total
    if layout.data == "fsdp":
        states = 16 * counts.total / layout.gpus
        block = (counts.attention + counts.router + n_expert / layout.expert) / m.n_layers
        transient = 8 * (2 * block + counts.embedding)
    else:
        states, transient = 20 * counts.total, 0.0
    a = act_bytes
    per_layer = (9 * a + 24) * m.d_model + 8 * m.n_experts + m.top_k * (
        3 * a * m.d_model + 5 * a * m.d_hidden)
    logits = m.vocab_size * (a + 8)
    layers = (m.n_layers * a * m.d_model + per_layer if layout.activation_checkpointing
              else m.n_layers * per_layer)
    tokens = layout.micro_batch * m.seq_len
    return MemoryEstimate(states=states, transient=transient,
                          activations=tokens * (layers + logits))


def candidate_layouts(cfg: RunConfig, nodes: int, gpus_per_node: int):
    """Layouts on `nodes` nodes, most preferred first: no AC, DDP, less expert parallelism,
    bigger micro-batches (fewer, larger matmuls and less communication)."""
    gpus = nodes * gpus_per_node
    batch = cfg.train.batch_size
    if batch % gpus:
        return
    per_gpu = batch // gpus
    experts = [p for p in (1, 2, 4, 8, 16, 32, 64) if p <= gpus_per_node and
               gpus % p == 0 and cfg.model.n_experts % p == 0 and
               (p == 1 or not cfg.model.is_dense)]
    data_expert = [("ddp", 1)] + [("fsdp", p) for p in experts]
    micro = [mb for mb in range(per_gpu, 0, -1) if per_gpu % mb == 0]
    for ac in (False, True):
        for data, p in data_expert:
            for mb in micro:
                yield Layout(nodes=nodes, gpus=gpus, data=data,
                             fsdp=gpus if data == "fsdp" else 1, expert=p, micro_batch=mb,
                             grad_accum=per_gpu // mb, activation_checkpointing=ac)


def plan_layout(cfg: RunConfig, *, gpus_per_node: int, gpu_mem_gib: float, min_nodes: int,
                max_nodes: int, run_name: str = "") -> tuple[Layout, MemoryEstimate]:
    """The first layout (fewest nodes, then `candidate_layouts` order) that fits in memory."""
    budget = HEADROOM * gpu_mem_gib
    smallest = None
    for nodes in range(min_nodes, max_nodes + 1):
        for layout in candidate_layouts(cfg, nodes, gpus_per_node):
            mem = estimate_memory(cfg, layout)
            if mem.total_gib <= budget:
                return layout, mem
            if smallest is None or mem.total_gib < smallest[1].total_gib:
                smallest = (layout, mem)
    best = f"; the smallest estimate is {smallest[1].total_gib:.1f} GiB on {smallest[0].gpus} " \
           "GPUs" if smallest else ""
    raise ValueError(f"run {run_name} does not fit {gpu_mem_gib:g} GiB per GPU on "
                     f"{min_nodes}-{max_nodes} nodes of {gpus_per_node} GPUs{best}; raise "
                     "max_nodes in the cluster profile or shrink the run")


def parallel_section(layout: Layout) -> dict:
    """The run config's [parallel] values for a planned layout."""
    return {"data": layout.data, "expert": layout.expert,
            "activation_checkpointing": layout.activation_checkpointing,
            "micro_batch": layout.micro_batch}
