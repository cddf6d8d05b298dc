"""Downstream classification tasks built from installed text, with no download.

    python -m data_pipeline.tasks docstring_origin --out DIR [--cache-dir C]

`docstring_origin`: which top-level package does a docstring come from? The docstrings of ten installed
packages (numpy, scipy, sympy, matplotlib, sklearn, networkx, jax, tensorflow, torch, transformers; each
has well over 1,000 distinct docstrings here; scikit-learn, torch and transformers come with the `downstream`
extra: `pip install -e ".[downstream]"`), extracted with the same `ast` rules as the pretraining corpus.
The selection (at most `cap` (1,000) docstrings per package, none found in two packages, a package with fewer
than `min_docs` (1,000) an error) and the hash splits (test / validation / train, about 1,000 / 1,000 / 8,000
documents) are `data_pipeline.docstrings`, which also keeps every text of the task out of the "docstrings"
pretraining source: a model fine-tuned here never saw its fine-tuning or test text during pretraining.

Writes train.jsonl, validation.jsonl, test.jsonl (one {"text": ..., "label": package name} per line, in
label-then-rank order) and labels.json (the sorted label list).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from data_pipeline.docstrings import DOCSTRING_ORIGIN, TASKS, TaskSpec, build_task
from data_pipeline.errors import DataError


def write_task(out: str, spec: TaskSpec = DOCSTRING_ORIGIN, cache_dir: str | None = None) -> dict:
    """Writes the split files and labels.json into `out`; returns a summary (examples per split and label)."""
    splits = build_task(spec, cache_dir)
    labels = sorted({ex["label"] for examples in splits.values() for ex in examples})
    os.makedirs(out, exist_ok=True)
    for split, examples in splits.items():
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "labels.json"), "w", encoding="utf-8") as f:
        json.dump(labels, f)
    counts = {s: {lab: sum(ex["label"] == lab for ex in exs) for lab in labels} for s, exs in splits.items()}
    return {"out": out, "labels": labels, "examples": {s: len(exs) for s, exs in splits.items()},
            "per_label": counts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--out", required=True, help="folder for {train,validation,test}.jsonl and labels.json")
    parser.add_argument("--cache-dir", default=None, help="reuse / store the extracted task here")
    parser.add_argument("--packages", default=None,
                        help="comma-separated packages instead of the default ten (changes the task: the "
                             "pretraining corpus then still holds out the default task, not this one)")
    parser.add_argument("--cap", type=int, default=None, help="most docstrings kept per package (default 1000)")
    parser.add_argument("--min-docs", type=int, default=None, help="fewest docstrings a package needs (1000)")
    args = parser.parse_args(argv)
    if args.task not in TASKS:
        parser.exit(2, f"error: unknown task {args.task!r}; choose one of {', '.join(TASKS)}\n")
    spec = TASKS[args.task]
    changes = {}
    if args.packages:
        changes["packages"] = tuple(p for p in args.packages.split(",") if p)
    if args.cap is not None:
        changes["cap"] = args.cap
    if args.min_docs is not None:
        changes["min_docs"] = args.min_docs
    spec = dataclasses.replace(spec, **changes)
    try:
        summary = write_task(args.out, spec, args.cache_dir)
    except DataError as e:
        parser.exit(1, f"error: {e}\n")
    print(json.dumps({"out": summary["out"], "labels": summary["labels"], "examples": summary["examples"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
