"""Answer extraction and comparison for accuracy.

- numbers (GSM8K, GSM-Plus, pocket reasoning): the number after the last `####`,
  else the last number in the text; commas, `$` and a trailing period are
  ignored, and numbers compare by value (`1,000` == `1000.0`);
- TriviaQA: SQuAD-style normalisation (lower case, no punctuation, no articles,
  single spaces), then exact match against any alias;
- MATH-500: the contents of the last `\\boxed{...}`, compared after removing
  spaces and `$`, or by value when both sides are numbers.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def extract_number(text: str) -> str | None:
    """The final answer of a worked solution: the first number after the last `####`,
    else the last number anywhere; None when the text holds no number."""
    head, sep, tail = text.rpartition("####")
    if sep:
        found = _NUMBER.search(tail)
        if found:
            return _clean_number(found.group())
    found = _NUMBER.findall(head if sep else text)
    return _clean_number(found[-1]) if found else None


def _clean_number(raw: str) -> str:
    return raw.replace(",", "").replace("$", "")


def parse_number(text: str | None) -> Decimal | None:
    """`text` as an exact decimal (commas and `$` dropped), or None."""
    if text is None:
        return None
    try:
        value = Decimal(_clean_number(text.strip()).rstrip("."))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two number strings have the same value (False if either is not a number)."""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


def normalize_text(text: str) -> str:
    """SQuAD/TriviaQA normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def matches_any(text: str, aliases: tuple[str, ...]) -> bool:
    """Normalised exact match of `text` against any alias."""
    got = normalize_text(text)
    return bool(got) and any(got == normalize_text(a) for a in aliases)


def extract_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def math_equal(a: str | None, b: str | None) -> bool:
    """MATH answers: equal after removing spaces, `$` and `\\!`, or equal as numbers."""
    if a is None or b is None:
        return False
    squash = lambda s: re.sub(r"\s|\$|\\!|\\left|\\right", "", s).replace("dfrac", "frac")
    x, y = squash(a), squash(b)
    return x == y or numbers_equal(x, y)


def number_key(text: str) -> str | None:
    """Vote key of a numeric answer: its value (so `1,000` and `1000.0` agree), or None."""
    value = parse_number(extract_number(text))
    return None if value is None else str(value.normalize())


def text_key(text: str) -> str | None:
    """Vote key of a free-text answer: its normalised text, None when empty."""
    return normalize_text(text) or None
