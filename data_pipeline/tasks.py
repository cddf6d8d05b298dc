"""Downstream classification tasks built from installed text, with no download.

    python -m data_pipeline.tasks docstring_origin --out DIR [--cache-dir C]

`docstring_origin`: which top-level package does a docstring come from? The docstrings of ten installed
packages (numpy, scipy, sympy, matplotlib, sklearn, networkx, jax, tensorflow, torch, transformers; each
has well over 1,000 distinct docstrings here; scikit-learn, torch and transformers come with the `downstream`
extra: `pip install -e ".[downstream]"`), extracted with the same `ast` rules as the pretraining corpus
(`data_pipeline.sources`). A text found in two of these packages is dropped (its label would be ambiguous).
For balance each package keeps at most `cap` (1,000) docstrings, chosen by a sha256 rank of the text (so the
choice does not depend on file order); a package with fewer than `min_docs` (1,000) is an error. Splits come
from `sources.split_of` (the first 8 bytes of sha1 of the text): test below 0.1, validation below 0.2, train
the rest, so about 8,000 / 1,000 / 1,000 documents.

Writes train.jsonl, validation.jsonl, test.jsonl (one {"text": ..., "label": package name} per line, in
label-then-rank order) and labels.json (the sorted label list). The task's documents are held out of the
pretraining corpus: the "docstrings" source (`sources.iter_documents`) drops every text of
`heldout_texts()`, so a model fine-tuned here never saw its fine-tuning or test text during pretraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys

from data_pipeline import sources
from data_pipeline.errors import DataError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What defines a docstring_origin task: its packages, the per-package cap and minimum, the split sizes."""
    packages: tuple[str, ...]
    cap: int = 1000
    min_docs: int = 1000
    test_fraction: float = 0.1
    validation_fraction: float = 0.1


DOCSTRING_ORIGIN = TaskSpec(packages=("jax", "matplotlib", "networkx", "numpy", "scipy", "sklearn", "sympy",
                                      "tensorflow", "torch", "transformers"))
TASKS = {"docstring_origin": DOCSTRING_ORIGIN}
_CACHE_VERSION = 1


def package_docstrings(packages) -> dict[str, list[str]]:
    """Distinct docstrings of each top-level package (stdlib and site-packages), in file then source order."""
    wanted = set(packages)
    paths = []
    for root in sources._roots(True):  # pylint: disable=protected-access
        for rel in sources._python_files(root):  # pylint: disable=protected-access
            top = sources._top_level_name(rel)  # pylint: disable=protected-access
            if top in wanted:
                paths.append((top, os.path.join(root, rel)))
    files = [p for _, p in paths]
    # As in sources: fork a pool only while no multi-threaded native library is loaded.
    threaded = any(m in sys.modules for m in ("tensorflow", "tokenizers", "torch", "jax"))
    if len(files) > 500 and (os.cpu_count() or 1) > 1 and not threaded:
        with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 8)) as pool:
            extract = sources._file_docstrings  # pylint: disable=protected-access
            per_file = list(pool.imap(extract, files, chunksize=32))
    else:
        per_file = [sources._file_docstrings(p) for p in files]  # pylint: disable=protected-access
    docs: dict[str, dict[str, None]] = {p: {} for p in packages}  # dicts keep first-seen order
    for (top, _), file_docs in zip(paths, per_file):
        for doc in file_docs:
            docs[top][doc] = None
    return {p: list(d) for p, d in docs.items()}


def _rank(text: str) -> str:
    # sha256, not sha1: split_of uses sha1, and ranking by the same hash would put the kept texts in one split.
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_name(text: str, spec: TaskSpec) -> str:
    """"test", "validation" or "train" for `text`, from sources.split_of's stable hash."""
    if sources.split_of(text, spec.test_fraction) == "validation":
        return "test"
    if sources.split_of(text, spec.test_fraction + spec.validation_fraction) == "validation":
        return "validation"
    return "train"


class TooFewDocstrings(DataError):
    """A package of the task has fewer than min_docs unambiguous docstrings here (often: it is not installed).
    `splits` holds the selection as far as it goes (what `heldout_texts` keeps out of the corpus)."""

    def __init__(self, message: str, splits: dict[str, list[dict]]):
        super().__init__(message)
        self.splits = splits


def select_examples(per_package: dict[str, list[str]], spec: TaskSpec) -> dict[str, list[dict]]:
    """The labelled examples of each split: unambiguous texts, at most spec.cap per package."""
    owners: dict[str, int] = {}
    for docs in per_package.values():
        for doc in docs:
            owners[doc] = owners.get(doc, 0) + 1
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    short = []
    for package in sorted(per_package):
        unique = [d for d in per_package[package] if owners[d] == 1]
        if len(unique) < spec.min_docs:
            short.append(f"{package} ({len(unique)}{': is it installed?' if not unique else ''})")
        for doc in sorted(unique, key=_rank)[:spec.cap]:
            splits[split_name(doc, spec)].append({"text": doc, "label": package})
    if short:
        raise TooFewDocstrings(f"packages with fewer than {spec.min_docs} distinct docstrings here: "
                               f"{', '.join(short)}", splits)
    return splits


def build(spec: TaskSpec = DOCSTRING_ORIGIN, cache_dir: str | None = None) -> dict[str, list[dict]]:
    """The task's examples per split; cached in `cache_dir` (keyed by the spec and the installed packages)."""
    if not spec.packages:
        raise DataError("a docstring_origin task needs at least one package")
    if spec.cap < 1 or spec.min_docs < 1:
        raise DataError(f"cap and min_docs must be >= 1, got {spec.cap} and {spec.min_docs}")
    cache_path = None
    if cache_dir:
        key = json.dumps([_CACHE_VERSION, dataclasses.asdict(spec),
                          sources._cache_key(True, ())])  # pylint: disable=protected-access
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache_path = os.path.join(cache_dir, f"task-docstring_origin-{digest}.json")
        if os.path.exists(cache_path):
            with open(cache_path, encoding="utf-8") as f:
                return json.load(f)
    splits = select_examples(package_docstrings(spec.packages), spec)
    if cache_path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(splits, f, ensure_ascii=False)
        os.replace(tmp, cache_path)
    return splits


def heldout_texts(cache_dir: str | None = None, spec: TaskSpec | None = None) -> set[str]:
    """Every text of the task (all splits): what the pretraining corpus must not contain. Where the task cannot
    be built here (a package missing, e.g. sklearn in an environment without scikit-learn), the texts it would
    take from the packages present are held out all the same (a one-line note on stderr); the corpus has no
    text of a missing package anyway. So `python -m tools.demo` runs where scikit-learn is not installed."""
    try:
        splits = build(spec or TASKS["docstring_origin"], cache_dir)
    except TooFewDocstrings as e:
        print(f"note: the docstring_origin task cannot be built here ({e}); the pretraining corpus leaves out "
              "its texts from the packages present", file=sys.stderr)
        splits = e.splits
    return {ex["text"] for examples in splits.values() for ex in examples}


def write_task(out: str, spec: TaskSpec = DOCSTRING_ORIGIN, cache_dir: str | None = None) -> dict:
    """Writes the split files and labels.json into `out`; returns a summary (examples per split and label)."""
    splits = build(spec, cache_dir)
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
