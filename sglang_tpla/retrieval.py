"""A small synthetic key/value retrieval task (in the style of RULER's needle tasks), seeded and deterministic.

A document lists random ``key = value`` records (a key is two words from :data:`WORDS` joined by
``-``, a value is a 4-digit number) and then asks for some of them::

    Records:
    - amber-river = 4821
    - quiet-stone = 0937
    ...
    Lookup quiet-stone = 0937
    Lookup amber-river = 4821

The model has to copy, from the context, the value that follows the looked-up key: attention
must match the key's tokens in the cached latent and read the value's tokens from it.

* :func:`training_document` (``seed``, ``index``) -> text with the answers in it (for the training mix,
  ``python -m sglang_tpla.train --retrieval-frac F``).
* :func:`build_task` (``seed``, ``n``) -> :class:`Example` s: ``prompt`` (the records and the earlier
  lookups, ending in ``"Lookup KEY ="``) and ``answer`` (``" VALUE"``), for evaluation.
* :func:`answer_spans` (a training document) -> where its looked-up values are (the trainer's answer weight).
* :func:`extract` / :func:`exact_match` / :func:`score`: the scorer (the first line of a generated
  continuation, whitespace-stripped, equal to the value).

Pure Python (``random.Random``, no global state); no torch, no sglang.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = (
    "amber", "apple", "arrow", "ash", "autumn", "basil", "beach", "birch", "blue", "bold", "brass", "brick", "bright",
    "brook", "canyon", "cedar", "chalk", "cherry", "cider", "clay", "cliff", "cloud", "clover", "coral", "cotton",
    "crane", "creek", "crimson", "crow", "dawn", "delta", "desert", "dune", "dusk", "eagle", "echo", "ember", "fern",
    "field", "flint", "forest", "fox", "frost", "garden", "ginger", "glacier", "gold", "granite", "grove", "harbor",
    "hawk", "hazel", "heron", "hill", "honey", "iron", "island", "ivory", "jade", "juniper", "lake", "lantern",
    "lemon", "lily", "linen", "lotus", "maple", "marble", "meadow", "mint", "moss", "mountain", "night", "oak",
    "ocean", "olive", "orchid", "otter", "pearl", "pebble", "pine", "plum", "pond", "quartz", "quiet", "rain",
    "raven", "reed", "ridge", "river", "robin", "rose", "ruby", "sage", "salt", "sand", "shadow", "silver", "sky",
    "slate", "snow", "spruce", "star", "stone", "storm", "sun", "swift", "thistle", "thunder", "tide", "timber",
    "valley", "velvet", "violet", "willow", "wind", "winter", "wolf", "wren",
)
HEADER = "Records:\n"
RECORD = "- "
LOOKUP = "Lookup "


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # " 1234": what follows the prompt


def _records(rng: random.Random, n_pairs: int) -> list[tuple[str, str]]:
    keys: list[str] = []
    seen = set()
    while len(keys) < n_pairs:
        k = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if k not in seen:
            seen.add(k)
            keys.append(k)
    return [(k, f"{rng.randrange(10000):04d}") for k in keys]


def _document(rng: random.Random, n_pairs: int, n_queries: int) -> tuple[str, list[tuple[str, str]]]:
    recs = _records(rng, n_pairs)
    queries = rng.sample(recs, min(n_queries, n_pairs))
    return HEADER + "".join(f"{RECORD}{k} = {v}\n" for k, v in recs), queries


def _rng(seed: int, index: int, tag: str) -> random.Random:
    return random.Random(f"sglang-tpla-retrieval:{tag}:{seed}:{index}")


def training_document(seed: int, index: int, n_pairs: tuple[int, int] = (4, 16), n_queries: int = 6) -> str:
    """Document ``index`` of the training stream ``seed``: records, then lookups with their answers."""
    rng = _rng(seed, index, "train")
    body, queries = _document(rng, rng.randint(*n_pairs), n_queries)
    return body + "".join(f"{LOOKUP}{k} = {v}\n" for k, v in queries)


def build_task(seed: int, n: int, n_pairs: int = 12, n_queries: int = 4) -> list[Example]:
    """``n`` evaluation examples; example ``i`` asks for the ``i % n_queries``-th lookup of its document
    (earlier lookups of the same document are in the prompt with their answers); at most ``n_pairs`` lookups."""
    out = []
    n_queries = min(n_queries, n_pairs)
    for i in range(n):
        rng = _rng(seed, i // n_queries, "eval")
        body, queries = _document(rng, n_pairs, n_queries)
        j = i % n_queries
        done = "".join(f"{LOOKUP}{k} = {v}\n" for k, v in queries[:j])
        k, v = queries[j]
        out.append(Example(prompt=body + done + f"{LOOKUP}{k} =", answer=f" {v}"))
    return out


def answer_spans(document: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the looked-up values in a :func:`training_document` (the value of
    every ``Lookup KEY = VALUE`` line): the only text a model can get right by copying from the records."""
    spans, pos = [], 0
    for line in document.splitlines(keepends=True):
        if line.startswith(LOOKUP) and " = " in line:
            start = pos + line.index(" = ") + 3
            spans.append((start, pos + len(line.rstrip("\n"))))
        pos += len(line)
    return spans


def extract(continuation: str) -> str:
    """The answer in a generated continuation: its first line, whitespace-stripped."""
    return continuation.split("\n", 1)[0].strip()


def exact_match(continuation: str, answer: str) -> bool:
    return extract(continuation) == answer.strip()


def score(continuations: list[str], examples: list[Example]) -> float:
    """Share of exact matches."""
    if len(continuations) != len(examples):
        raise ValueError(f"{len(continuations)} continuations for {len(examples)} examples")
    if not examples:
        return 0.0
    return sum(exact_match(c, e.answer) for c, e in zip(continuations, examples)) / len(examples)
