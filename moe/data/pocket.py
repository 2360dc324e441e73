"""The pocket corpus: a seeded synthetic corpus that separates memorization from reasoning.

It mixes two kinds of documents, so that one small model trained on it shows
both abilities the paper contrasts:

(a) **Facts** from a random knowledge base of made-up entities, each with a few
    attributes ("The favorite color of Vokira is teal."). Values are drawn at
    random, so the only way to know one is to have memorised it: loss on these
    probes *memorization*, like TriviaQA in the paper. Every fact appears
    `pocket_fact_repeats` times in varied templates, one of which is the
    question-answer form the evaluation asks in.

(b) **Multi-step arithmetic** problems with worked solutions in GSM8K's format
    ("Start with 12. Add 7. Multiply by 3. ... Solution: 12 + 7 = 19. 19 * 3 = 57.
    #### 57"). Numbers are drawn fresh for every problem, and evaluation uses
    held-out problems never seen in training, so low loss requires *computing*:
    this probes *reasoning*, like GSM8K.

Everything is a pure function of the `DataConfig` (its `pocket_seed` and size
knobs), so every run of a sweep sees the same corpus and the same held-out items.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from moe.config import DataConfig
from moe.errors import BadConfig

ATTRIBUTES = ("home city", "favorite color", "job", "pet", "favorite food", "instrument")
VALUES = {
    "favorite color": ("red", "blue", "green", "yellow", "purple", "orange", "teal", "black",
                       "white", "pink", "brown", "gray"),
    "job": ("baker", "pilot", "farmer", "doctor", "painter", "sailor", "teacher", "miner",
            "tailor", "judge", "singer", "weaver", "guard", "poet", "smith", "nurse"),
    "pet": ("cat", "dog", "owl", "goat", "lizard", "parrot", "rabbit", "horse", "turtle",
            "ferret", "frog", "snake"),
    "favorite food": ("bread", "rice", "soup", "apples", "cheese", "fish", "beans", "plums",
                      "honey", "noodles", "olives", "figs"),
    "instrument": ("flute", "drum", "harp", "violin", "lute", "horn", "piano", "cello",
                   "banjo", "oboe"),
}
STATEMENTS = (
    "The {attr} of {e} is {v}.",
    "{e}'s {attr} is {v}.",
    "As everyone in town knows, the {attr} of {e} is {v}.",
)
QUESTION = "Q: What is the {attr} of {e}?\nA:"
SYLLABLES = ("ka", "ro", "mi", "ze", "tu", "vo", "li", "sa", "ne", "dra", "qui", "bo", "fe",
             "ga", "shi", "po", "xa", "lu", "te", "ri", "mo", "ha", "ve", "yo")


@dataclass(frozen=True)
class PocketItem:
    """One evaluation (or few-shot) item: the model is scored on `answer` given `prompt`."""

    prompt: str
    answer: str
    target: str
    """What an exact-match check compares against (the fact's value, or the final number)."""


@dataclass(frozen=True)
class PocketCorpus:
    documents: tuple[str, ...]
    """Training documents, shuffled (joined with EOS into the token stream)."""
    memorization_train: tuple[PocketItem, ...]
    """Question form of facts not in the evaluation set (few-shot examples)."""
    memorization_eval: tuple[PocketItem, ...]
    """Questions about facts that appear in the corpus."""
    reasoning_train: tuple[PocketItem, ...]
    """Problems that appear in the corpus (few-shot examples)."""
    reasoning_eval: tuple[PocketItem, ...]
    """Fresh problems that appear nowhere in the corpus."""
    noise: tuple[float, ...] = ()
    """Noise level of every document (0 = clean; `data.pocket_noise`); quality = -noise."""


NOISE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,"


def add_noise(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[float]]:
    """Corrupt round(fraction * len(docs)) documents: each gets a level u ~ U(0.05, 0.5) and
    each of its characters is replaced by a random one with probability u."""
    rng = random.Random(seed * 31 + 7)  # a stream of its own: the clean corpus is unchanged
    chosen = set(rng.sample(range(len(docs)), round(fraction * len(docs))))
    noisy, levels = [], []
    for i, doc in enumerate(docs):
        level = rng.uniform(0.05, 0.5) if i in chosen else 0.0
        noisy.append("".join(rng.choice(NOISE_CHARS) if level and rng.random() < level else ch
                             for ch in doc))
        levels.append(level)
    return noisy, levels


def entity_names(n: int, rng: random.Random) -> list[str]:
    """n distinct pronounceable made-up names."""
    names: set[str] = set()
    while len(names) < n:
        k = rng.choice((2, 3, 3))
        names.add("".join(rng.choice(SYLLABLES) for _ in range(k)).capitalize())
    return sorted(names)


def knowledge_base(cfg: DataConfig, rng: random.Random) -> list[tuple[str, str, str]]:
    """(entity, attribute, value) triples; home cities are made-up names too."""
    if cfg.pocket_attributes > len(ATTRIBUTES):
        raise BadConfig(f"data.pocket_attributes={cfg.pocket_attributes} must be <= "
                         f"{len(ATTRIBUTES)}")
    entities = entity_names(cfg.pocket_entities, rng)
    cities = entity_names(24, random.Random(rng.random()))
    facts = []
    for e in entities:
        for attr in ATTRIBUTES[: cfg.pocket_attributes]:
            pool = cities if attr == "home city" else VALUES[attr]
            facts.append((e, attr, rng.choice(pool)))
    return facts


def fact_item(e: str, attr: str, v: str) -> PocketItem:
    return PocketItem(prompt=QUESTION.format(attr=attr, e=e), answer=f" {v}", target=v)


def fact_documents(facts: list[tuple[str, str, str]], repeats: int,
                   rng: random.Random) -> list[str]:
    """Each fact `repeats` times: cycling through the statement templates and the Q/A form."""
    forms = len(STATEMENTS) + 1
    docs = []
    for e, attr, v in facts:
        start = rng.randrange(forms)
        for r in range(repeats):
            form = (start + r) % forms
            if form == len(STATEMENTS):
                item = fact_item(e, attr, v)
                docs.append(item.prompt + item.answer)
            else:
                docs.append(STATEMENTS[form].format(attr=attr, e=e, v=v))
    return docs


def arithmetic_problem(rng: random.Random, steps: int, max_value: int) -> PocketItem:
    """A problem of `steps` operations with its worked solution ending in `#### N`."""
    value = rng.randint(1, max_value)
    ops, lines = [f"Start with {value}."], []
    for _ in range(steps):
        kind = rng.choice(("add", "sub", "mul"))
        if kind == "mul" and value * 2 > 999:
            kind = "sub"
        if kind == "sub" and value < 2:
            kind = "add"
        if kind == "add":
            b = rng.randint(1, max_value)
            new, ops_text, sym = value + b, f"Add {b}.", "+"
        elif kind == "sub":
            b = rng.randint(1, min(value - 1, max_value))
            new, ops_text, sym = value - b, f"Subtract {b}.", "-"
        else:
            b = rng.randint(2, max(2, min(9, 999 // value)))
            new, ops_text, sym = value * b, f"Multiply by {b}.", "*"
        ops.append(ops_text)
        lines.append(f"{value} {sym} {b} = {new}.")
        value = new
    prompt = "Problem: " + " ".join(ops) + " What is the result?\nSolution:"
    return PocketItem(prompt=prompt, answer=" " + " ".join(lines) + f" #### {value}",
                      target=str(value))


@functools.lru_cache(maxsize=8)
def build_pocket(cfg: DataConfig) -> PocketCorpus:
    """Generate the corpus and its held-out items (cached per config)."""
    rng = random.Random(cfg.pocket_seed)
    facts = knowledge_base(cfg, rng)
    docs = fact_documents(facts, cfg.pocket_fact_repeats, rng)
    problems = [arithmetic_problem(rng, cfg.pocket_arith_steps, cfg.pocket_arith_max)
                for _ in range(cfg.pocket_arith_problems)]
    docs += [p.prompt + p.answer for p in problems]
    rng.shuffle(docs)
    docs, noise = add_noise(docs, cfg.pocket_noise, cfg.pocket_seed)

    order = list(range(len(facts)))
    rng.shuffle(order)
    n_eval = min(cfg.pocket_eval_items, len(facts) // 2)
    mem_eval = tuple(fact_item(*facts[i]) for i in order[:n_eval])
    mem_train = tuple(fact_item(*facts[i]) for i in order[n_eval:])

    seen = {p.prompt for p in problems}
    fresh_rng = random.Random(cfg.pocket_seed * 7919 + 17)  # a stream of its own
    fresh: list[PocketItem] = []
    while len(fresh) < cfg.pocket_eval_items:
        item = arithmetic_problem(fresh_rng, cfg.pocket_arith_steps, cfg.pocket_arith_max)
        if item.prompt not in seen:
            seen.add(item.prompt)
            fresh.append(item)
    return PocketCorpus(documents=tuple(docs), memorization_train=mem_train,
                        memorization_eval=mem_eval, reasoning_train=tuple(problems[:256]),
                        reasoning_eval=tuple(fresh), noise=tuple(noise))
