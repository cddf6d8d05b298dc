"""The docstring_pairs task: do two docstrings come from the same package? (a text-pair task)

Built from docstring_origin's selection (`data_pipeline.docstrings`), split by split, so its texts are held
out of the pretraining corpus as well and no text is in two splits. In each split, each package's texts are
ordered by a sha256 rank; the first half (an even count) makes consecutive "same" pairs, the rest goes into a
pool of "different" pairs, in which each text (in rank order) is paired with the earliest waiting text of
another package. Every text is in at most one pair; the two labels are balanced by keeping as many pairs of
each as the scarcer one has (the lowest-ranked pairs), and the rows are written in pair-rank order.
"""

from __future__ import annotations

import hashlib

from data_pipeline.docstrings import TaskSpec, build_task, origin_spec

PAIR_LABELS = ("different", "same")


def _rank(text: str) -> str:
    # Salted, so that the pairing order is not docstring_origin's cap order (its ranks are plain sha256).
    return hashlib.sha256(("docstring_pairs\0" + text).encode("utf-8")).hexdigest()


def make_pairs(examples: list[dict]) -> list[dict]:
    """One split's docstring_origin examples ({"text", "label"}) -> balanced {"text", "text_pair", "label"}."""
    by_package: dict[str, list[str]] = {}
    for ex in examples:
        by_package.setdefault(ex["label"], []).append(ex["text"])
    same, pool = [], []
    for package in sorted(by_package):
        texts = sorted(by_package[package], key=_rank)
        half = 2 * (len(texts) // 4)
        same += [(texts[i], texts[i + 1]) for i in range(0, half, 2)]
        pool += [(text, package) for text in texts[half:]]
    different, waiting = [], []  # waiting: unpaired (text, package), oldest first
    for text, package in sorted(pool, key=lambda item: _rank(item[0])):
        partner = next((i for i, (_, other) in enumerate(waiting) if other != package), None)
        if partner is None:
            waiting.append((text, package))
        else:
            different.append((waiting.pop(partner)[0], text))
    n = min(len(same), len(different))

    def pair_rank(pair):
        return _rank(pair[0] + "\0" + pair[1])

    rows = [(pair_rank(p), p, "same") for p in sorted(same, key=pair_rank)[:n]]
    rows += [(pair_rank(p), p, "different") for p in sorted(different, key=pair_rank)[:n]]
    return [{"text": a, "text_pair": b, "label": label} for _, (a, b), label in sorted(rows)]


def build_pair_task(spec: TaskSpec, cache_dir: str | None = None) -> dict[str, list[dict]]:
    """The pairs of each split of docstring_origin's selection under `spec` (packages, cap, min_docs, splits)."""
    splits = build_task(origin_spec(spec), cache_dir)
    return {split: make_pairs(examples) for split, examples in splits.items()}
