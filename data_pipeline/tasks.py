"""Downstream tasks built from installed text, with no download: one per shape of task.

    python -m data_pipeline.tasks {docstring_origin,docstring_pairs,docstring_params} --out DIR [--cache-dir C]

`docstring_origin` (single text): which top-level package does a docstring come from? The docstrings of ten
installed packages (numpy, scipy, sympy, matplotlib, sklearn, networkx, jax, tensorflow, torch, transformers;
each has well over 1,000 distinct docstrings here; scikit-learn, torch and transformers come with the
`downstream` extra: `pip install -e ".[downstream]"`), extracted with the same `ast` rules as the pretraining
corpus. The selection (at most `cap` (1,000) docstrings per package, none found in two packages, a package
with fewer than `min_docs` (1,000) an error) and the hash splits (test / validation / train, about 1,000 /
1,000 / 8,000 documents) are `data_pipeline.docstrings`, which also keeps every text of the task out of the
"docstrings" pretraining source: a model fine-tuned here never saw its fine-tuning or test text during
pretraining.

`docstring_pairs` (text pair): do two docstrings come from the same package? Balanced "same" / "different"
pairs of docstring_origin's texts, each text in one pair at most, within its splits (data_pipeline.docstring_pairs).
`docstring_params` (token classification): the parameter names in a function's docstring, tagged B-PARAM /
I-PARAM / O from the function's signature (data_pipeline.docstring_params). Both take their texts and splits from
docstring_origin's selection (the same --packages / --cap / --min-docs), so they are held out of pretraining
too and no text is in two splits.

Writes train.jsonl, validation.jsonl, test.jsonl and labels.json. docstring_origin: one {"text": ..., "label":
package name} per line (in label-then-rank order), labels.json the sorted label list. docstring_pairs: {"text",
"text_pair", "label"}, labels.json {"kind": "pair", "labels": [...]}; docstring_params: {"tokens": [words],
"tags": [one per word]}, labels.json {"kind": "token", "labels": [the tags]}. `python -m tools.finetune_hf`
reads the shape from labels.json (a plain list is "single").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from data_pipeline.docstring_pairs import PAIR_LABELS, build_pair_task
from data_pipeline.docstring_params import TOKEN_LABELS, build_param_task
from data_pipeline.docstrings import DOCSTRING_ORIGIN, TASKS, TaskSpec, build_task
from data_pipeline.errors import DataError

# The builder of each shape of task (`spec.kind`).
BUILDERS = {"single": build_task, "pair": build_pair_task, "token": build_param_task}


def write_task(out: str, spec: TaskSpec = DOCSTRING_ORIGIN, cache_dir: str | None = None) -> dict:
    """Writes the split files and labels.json into `out`; returns a summary (examples per split and label, or
    per tag for a token task)."""
    splits = BUILDERS[spec.kind](spec, cache_dir)
    if spec.kind == "single":
        labels = sorted({ex["label"] for examples in splits.values() for ex in examples})
    else:
        labels = list(PAIR_LABELS if spec.kind == "pair" else TOKEN_LABELS)
    os.makedirs(out, exist_ok=True)
    for split, examples in splits.items():
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "labels.json"), "w", encoding="utf-8") as f:
        # A single-text task keeps the plain list (an old folder's format, which means "single").
        json.dump(labels if spec.kind == "single" else {"kind": spec.kind, "labels": labels}, f)
    if spec.kind == "token":
        counts = {s: {tag: sum(ex["tags"].count(tag) for ex in exs) for tag in labels} for s, exs in splits.items()}
    else:
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
    parser.add_argument("--max-words", type=int, default=None,
                        help="docstring_params: words kept per example, from the start of its docstring (48)")
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
    if args.max_words is not None:
        if spec.kind != "token":
            parser.exit(2, f"error: --max-words is for docstring_params, not {args.task}\n")
        changes["max_words"] = args.max_words
    spec = dataclasses.replace(spec, **changes)
    try:
        summary = write_task(args.out, spec, args.cache_dir)
    except DataError as e:
        parser.exit(1, f"error: {e}\n")
    print(json.dumps({"out": summary["out"], "labels": summary["labels"], "examples": summary["examples"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
