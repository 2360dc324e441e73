"""Data recipes on top of a token split: a quality-ordered pass and a unique-token budget.

**Curriculum** (`data.order = "ascending-quality"`, Luo et al., ICLR 2026). The training
documents are put in ascending order of their quality score, lowest first, so the
cleanest data come last; documents of equal score are in an order drawn from the seed
(`numpy.random.default_rng([seed, 7])`). Batch i then reads consecutive windows of
that stream: window j = i * n_seqs + b starts at (j mod n_windows) * seq_len, so one
pass over the stream is one epoch (a second epoch repeats the curriculum, starting again
from the noisiest documents: size the budget to one pass, `epochs` <= 1 in result.json,
to end on the cleanest data) and batch i is a pure function of (seed, i): a resumed
run sees exactly the batches an uninterrupted one would have. The validation split is
the same as with `shuffled`, so the two orders are compared on the same tokens.

Quality scores: for the pocket corpus, minus each document's noise level
(`data.pocket_noise`); token shards carry no scores, so the curriculum needs pocket data.

**Repeated data** (`data.unique_tokens` = U > 0): training sees only the first U training
tokens, sampled as usual, so a budget of D tokens repeats them D / U times (epochs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moe.errors import BadConfig, BadInput


@dataclass
class OrderedSplit:
    """Consecutive windows of the documents in ascending quality (see the module doc)."""

    tokens: np.ndarray
    """The training tokens in corpus order; document d ends at its EOS."""
    doc_ends: np.ndarray
    """Exclusive end index of every document in `tokens` (the last may be cut short)."""
    quality: np.ndarray
    """Quality score of every document (higher = cleaner)."""
    seq_len: int
    _streams: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.doc_ends) != len(self.quality):
            raise BadInput(f"{len(self.doc_ends)} documents but {len(self.quality)} "
                             "quality scores")
        if self.tokens.size < self.seq_len + 1:
            raise BadInput(f"not enough tokens for one sequence of {self.seq_len + 1}")

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def order(self, seed: int) -> np.ndarray:
        """Document indices in training order: ascending quality, ties in seeded order."""
        ties = np.random.default_rng([seed, 7]).permutation(len(self.quality))
        return np.lexsort((ties, self.quality))

    def stream(self, seed: int) -> np.ndarray:
        if seed not in self._streams:
            starts = np.concatenate([[0], self.doc_ends[:-1]])
            self._streams[seed] = np.concatenate(
                [self.tokens[starts[d]: self.doc_ends[d]] for d in self.order(seed)])
        return self._streams[seed]

    def batch(self, seed: int, index: int, n_seqs: int, rows: slice | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index`: (inputs, targets) int64 [n_seqs, seq_len] of the ordered stream;
        `rows` picks some of its rows (a rank's or a micro-batch's share), as TokenSplit's."""
        stream = self.stream(seed)
        n_windows = (stream.size - 1) // self.seq_len
        j = ((index * n_seqs + np.arange(n_seqs)) % n_windows)[rows or slice(None)]
        rows = np.stack([stream[s: s + self.seq_len + 1] for s in j * self.seq_len])
        rows_t = torch.from_numpy(rows.astype(np.int64))
        return rows_t[:, :-1], rows_t[:, 1:]


def documents_of(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Exclusive end of every EOS-terminated document, and of a trailing partial one."""
    ends = np.flatnonzero(tokens == eos_id) + 1
    if ends.size == 0 or ends[-1] != tokens.size:
        ends = np.append(ends, tokens.size)
    return ends


def ordered_split(tokens: np.ndarray, quality: np.ndarray, eos_id: int,
                  seq_len: int) -> OrderedSplit:
    """The quality-ordered pass over `tokens`, whose documents have scores `quality`
    (in corpus order; a document cut short by the validation split keeps its score)."""
    ends = documents_of(tokens, eos_id)
    return OrderedSplit(tokens=tokens, doc_ends=ends, quality=np.asarray(quality)[: len(ends)],
                        seq_len=seq_len)


def first_tokens(arrays: list[np.ndarray], budget: int) -> list[np.ndarray]:
    """The first `budget` tokens across `arrays` (for `data.unique_tokens`)."""
    total = sum(a.size for a in arrays)
    if budget > total:
        raise BadConfig(f"data.unique_tokens={budget} exceeds the {total} training tokens; "
                         "lower it or set 0 (all)")
    out, left = [], budget
    for arr in arrays:
        if left <= 0:
            break
        out.append(arr[:left])
        left -= min(left, arr.size)
    return out
