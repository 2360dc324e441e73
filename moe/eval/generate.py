"""Batched text generation with a KV cache: greedy or sampled, cut at EOS, stop strings or budget.

Prompts of similar length are batched and **left-padded**, so every row's next
token sits in the same (last) column; the model's `KVCache` gives each row its
own RoPE positions (counted from its first real token) and hides its padding,
so a row generates the same tokens alone as in any batch. One forward pass
reads the prompts (prefill); each further pass runs one token per row against
the cache. A row leaves the batch at EOS, when its text contains a stop
string, or when its budget is spent. The model runs in the run's precision
(`moe.model.precision`: bf16 autocast on CUDA by default, fp32 on CPU).

Context: the cache holds `seq_len` positions, so a prompt longer than
`seq_len - budget` keeps its newest tokens. (The uncached path, kept as the
reference and for models without `new_cache`, instead slides a `seq_len`
window along; both agree whenever prompt + budget fits.)

Sampling (`Sampling(temperature > 0)`): softmax at that temperature, then the
smallest set of tokens whose probability reaches `top_p` (nucleus sampling).
Each prompt draws from its own `torch.Generator`, seeded from `seed` and the
prompt's key (by default its index in the call): the same call with the same
seed gives the same samples, and a prompt samples the same tokens alone, in any
batch, or on whichever rank of a sharded evaluation holds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe.data.tokenizer import Tokenizer
from moe.errors import BadInput
from moe.model import precision as precision_policy


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is chosen."""

    temperature: float = 0.0
    """0 = greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this total probability."""
    seed: int = 0
    """Seed of the sampling generator."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise BadInput(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise BadInput(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length (less padding), in batches of batch_size."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the earliest stop string."""
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]


def row_seed(seed: int, key: int) -> int:
    """The sampling seed of the prompt with this key (a 63-bit hash of both)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def pick_next(logits_BV: torch.Tensor, sampling: Sampling,
              generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Next token of each row [B] (int64): argmax, or a temperature / top-p sample
    (from one generator, or from one generator per row)."""
    if sampling.greedy:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        outside_BV = sorted_BV.cumsum(-1) - sorted_BV >= sampling.top_p  # mass before it suffices
        sorted_BV = sorted_BV.masked_fill(outside_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)
    return torch.cat([torch.multinomial(probs_BV[r], 1, generator=g)
                      for r, g in enumerate(generator)])


class _Rows:
    """Generated tokens of the active rows and the rule that retires a row."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], budgets: list[int]):
        self.tokenizer, self.stop, self.budgets = tokenizer, stop, budgets
        self.tokens: list[list[int]] = [[] for _ in budgets]

    def add(self, i: int, tok: int) -> bool:
        """Append `tok` to row i; False when the row is finished."""
        if tok == self.tokenizer.eos_id:
            return False
        self.tokens[i].append(tok)
        if len(self.tokens[i]) >= self.budgets[i]:
            return False
        text = self.tokenizer.decode(self.tokens[i])
        return not any(s in text for s in self.stop)


def generation_autocast(device: torch.device, precision: str = "auto"):
    """The precision generation runs in (`moe.model.precision`; `auto`: bf16 autocast on
    CUDA, fp32 elsewhere), as training and task scoring."""
    return precision_policy.autocast(precision, device)


def _row_generators(generators, active: list[int]):
    return None if generators is None else [generators[i] for i in active]


def _cached_chunk(model, prompts: list[Sequence[int]], rows: _Rows, *, seq_len: int,
                  device: torch.device, sampling: Sampling, generators) -> None:
    """Generate one left-padded batch with a KV cache, filling `rows`."""
    max_budget = max(rows.budgets)
    keep = max(1, seq_len - max_budget)
    prompts = [list(p[-keep:]) for p in prompts]
    P = max(map(len, prompts))
    pad_B = torch.tensor([P - len(p) for p in prompts], device=device)
    idx_BT = torch.full((len(prompts), P), rows.tokenizer.pad_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        idx_BT[r, P - len(p):] = torch.tensor(p, dtype=torch.long)
    cache = model.new_cache(pad_B, min(seq_len, P + max_budget))
    active = list(range(len(prompts)))
    logits_BV = model(idx_BT.to(device), cache=cache).logits_BTV[:, -1]
    while True:
        next_B = pick_next(logits_BV, sampling, _row_generators(generators, active))
        keep_rows = [r for r, (i, tok) in enumerate(zip(active, next_B.tolist(), strict=True))
                     if rows.add(i, tok)]
        if not keep_rows or cache.length >= cache.max_len:
            return
        if len(keep_rows) < len(active):
            sel_B = torch.tensor(keep_rows, device=device)
            cache.select(sel_B)
            next_B, active = next_B[sel_B], [active[r] for r in keep_rows]
        logits_BV = model(next_B.unsqueeze(1), cache=cache).logits_BTV[:, -1]


def _uncached_chunk(model, prompts: list[Sequence[int]], rows: _Rows, *, seq_len: int,
                    device: torch.device, sampling: Sampling, generators) -> None:
    """The reference: re-run the whole (right-padded) window for every new token."""
    active = list(range(len(prompts)))
    while active:
        # Right-padded (causal: padding after a row cannot change it); a row longer than the
        # context keeps its newest seq_len tokens.
        windows = [[*prompts[i], *rows.tokens[i]][-seq_len:] for i in active]
        idx_BT = torch.full((len(active), max(map(len, windows))), rows.tokenizer.pad_id,
                            dtype=torch.long)
        for r, w in enumerate(windows):
            idx_BT[r, : len(w)] = torch.tensor(w)
        last_B = torch.tensor([len(w) - 1 for w in windows], device=device)
        logits_BTV = model(idx_BT.to(device)).logits_BTV
        logits_BV = logits_BTV[torch.arange(len(active), device=device), last_B]
        next_B = pick_next(logits_BV, sampling, _row_generators(generators, active)).tolist()
        active = [i for i, tok in zip(active, next_B, strict=True) if rows.add(i, tok)]


def generate_ids(model: torch.nn.Module, prompts: list[Sequence[int]], budgets: list[int], *,
                 tokenizer: Tokenizer, stop: tuple[str, ...], seq_len: int, batch_size: int,
                 device: torch.device | str = "cpu", sampling: Sampling = GREEDY,
                 use_cache: bool = True, keys: Sequence[int] | None = None,
                 precision: str = "auto") -> list[list[int]]:
    """Generated token ids of each prompt (EOS excluded; the stop string not yet cut).

    Uses the KV cache when the model has one (`new_cache`) and `use_cache`; the model
    must be in eval mode. Runs under `torch.no_grad()`. `keys` (default: the prompts'
    indices) seed each prompt's sampling generator (see the module docstring).
    """
    device = torch.device(device)
    keys = range(len(prompts)) if keys is None else keys
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    cached = use_cache and hasattr(model, "new_cache")
    run_chunk = _cached_chunk if cached else _uncached_chunk
    out: list[list[int]] = [[] for _ in prompts]
    todo = [i for i, b in enumerate(budgets) if b > 0]
    with torch.no_grad(), generation_autocast(device, precision):
        for chunk in batches_by_length([len(prompts[i]) for i in todo], batch_size):
            chunk = [todo[c] for c in chunk]
            rows = _Rows(tokenizer, stop, [budgets[i] for i in chunk])
            generators = None if sampling.greedy else [
                torch.Generator(device=device).manual_seed(row_seed(sampling.seed, keys[i]))
                for i in chunk]
            run_chunk(model, [prompts[i] for i in chunk], rows, seq_len=seq_len,
                      device=device, sampling=sampling, generators=generators)
            for i, toks in zip(chunk, rows.tokens, strict=True):
                out[i] = toks
    return out


def generate_texts(model: torch.nn.Module, prompts: list[Sequence[int]], budgets: list[int], *,
                   tokenizer: Tokenizer, stop: tuple[str, ...], seq_len: int, batch_size: int,
                   device: torch.device | str = "cpu", sampling: Sampling = GREEDY,
                   use_cache: bool = True, keys: Sequence[int] | None = None,
                   precision: str = "auto") -> list[str]:
    """Continuations of each prompt as text, cut at the first stop string (see generate_ids)."""
    ids = generate_ids(model, prompts, budgets, tokenizer=tokenizer, stop=stop, seq_len=seq_len,
                       batch_size=batch_size, device=device, sampling=sampling,
                       use_cache=use_cache, keys=keys, precision=precision)
    return [cut_at_stop(tokenizer.decode(t), stop) for t in ids]


def greedy_generate(model: torch.nn.Module, prompts: list[Sequence[int]], budgets: list[int], *,
                    tokenizer: Tokenizer, stop: tuple[str, ...], seq_len: int, batch_size: int,
                    device: torch.device | str = "cpu", use_cache: bool = True,
                    precision: str = "auto") -> list[str]:
    """Greedy continuations, each cut at EOS, at the first stop string, or after its budget."""
    return generate_texts(model, prompts, budgets, tokenizer=tokenizer, stop=stop,
                          seq_len=seq_len, batch_size=batch_size, device=device,
                          use_cache=use_cache, precision=precision)
