"""The installed-docstring corpus, and the texts the docstring_origin task holds out of it.

The corpus is a real English (technical) corpus that needs no download: the docstrings of the Python
standard library and, optionally, of the installed site-packages, extracted with `ast` (nothing is
imported, so no package code runs). It is deterministic for a given interpreter and set of installed
packages, which makes it a reproducible smoke-test corpus for pretraining.

The docstring_origin task (`data_pipeline.tasks` writes it) asks which of ten packages a docstring comes
from; its texts are selected here, with the same extraction rules, so that the "docstrings" pretraining
source (`data_pipeline.sources`) can leave out every one of them (`heldout_texts`): a model fine-tuned on
the task never saw its fine-tuning or test text during pretraining. The docstring_pairs and docstring_params
tasks (data_pipeline.docstring_pairs, data_pipeline.docstring_params) take the same selection and splits, so
this holds for them too.

Selection: a text found in two of the task's packages is dropped (its label would be ambiguous); for
balance each package keeps at most `cap` docstrings, chosen by a sha256 rank of the text (so the choice does
not depend on file order); a package with fewer than `min_docs` is an error. Splits come from
`splitting.split_of` (the first 8 bytes of sha1 of the text): test below `test_fraction`, validation below
`test_fraction + validation_fraction`, train the rest.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import sys
import sysconfig
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

from data_pipeline.errors import DataError
from data_pipeline.splitting import split_of

# Directory names never descended into: test suites are mostly boilerplate docstrings ("Test that ...")
# and the nested site-packages of a base interpreter would duplicate the venv's packages.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
_MIN_DOC_CHARS = 20
_DEF_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_CACHE_VERSION = 1  # bump when the extraction rules change, so old caches are not reused
_TASK_CACHE_VERSION = 1
TASK_SPLITS = ("train", "validation", "test")


# ---- extraction ---------------------------------------------------------------------------------------------

def python_files(root: str) -> list[str]:
    """Relative paths of all .py files under `root`, sorted, skipping test and cache directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; sorting is only for tidiness (we sort at the end).
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.normpath(os.path.join(rel_dir, name)))
    return sorted(found)


def top_level_name(rel_path: str) -> str:
    """The top-level package or module a path relative to its root belongs to."""
    first = rel_path.split(os.sep, 1)[0]
    return first[:-3] if first.endswith(".py") else first


def _definitions(node) -> Iterator[ast.AST]:
    """Class and function definitions under `node`, in source order.

    Only statement lists are followed (bodies, else/finally blocks, except handlers, match cases):
    definitions cannot occur inside expressions, and skipping expressions is much faster than ast.walk.
    """
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        children = getattr(node, field, None)
        if not isinstance(children, list):
            continue
        for child in children:
            if isinstance(child, _DEF_NODES):
                yield child
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _definitions(child)


def file_docstrings(path: str) -> list[str]:
    """Cleaned docstrings of one source file in source order; [] if it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            source = f.read()
        # Parsing bytes lets `ast` honour PEP 263 encoding declarations.
        tree = ast.parse(source, filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    docs = []
    for node in [tree] + list(_definitions(tree)):
        doc = ast.get_docstring(node, clean=False)
        if isinstance(doc, str):
            doc = inspect.cleandoc(doc)
            if len(doc) >= _MIN_DOC_CHARS:
                docs.append(doc)
    return docs


def roots(include_site_packages: bool) -> list[str]:
    """The folders the corpus is read from: the standard library, then purelib/platlib site-packages."""
    paths = sysconfig.get_paths()
    found = [paths["stdlib"]]
    if include_site_packages:
        for key in ("purelib", "platlib"):
            if paths[key] not in found:
                found.append(paths[key])
    return [os.path.realpath(r) for r in found]


def _extract_all(paths: list[str], min_parallel: int, chunksize: int,
                 extract: Callable[[str], list] = file_docstrings) -> list[list]:
    """`extract` (`file_docstrings`) of each path, in input order (Pool.imap keeps it, so the result equals the
    serial loop).
    Processes are forked (spawn would re-run the caller's __main__), which is only safe before multi-threaded
    native libraries start: with any of them loaded this stays serial. The pretokenize CLI reads its corpus
    before loading them."""
    threaded = any(m in sys.modules for m in ("tensorflow", "tokenizers", "torch", "jax"))
    if len(paths) > min_parallel and (os.cpu_count() or 1) > 1 and not threaded:
        with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 8)) as pool:
            return list(pool.imap(extract, paths, chunksize=chunksize))
    return [extract(p) for p in paths]


# ---- the corpus -----------------------------------------------------------------------------------------------

def cache_key(include_site_packages: bool, exclude_packages: Sequence[str]) -> str:
    """Names a cached corpus: the extraction rules, the interpreter and (as a cheap proxy for "what is
    installed") the listing of each root, where dist-info folders carry versions."""
    folders = roots(include_site_packages)
    listing = [sorted(os.listdir(r)) if os.path.isdir(r) else [] for r in folders]
    key = json.dumps([_CACHE_VERSION, sys.version, folders, listing, sorted(exclude_packages)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _build_corpus(include_site_packages: bool, exclude_packages: Sequence[str]) -> list[str]:
    excluded = set(exclude_packages)
    paths = [os.path.join(root, rel) for root in roots(include_site_packages) for rel in python_files(root)
             if top_level_name(rel) not in excluded]
    seen = set()
    docs = []
    for doc in itertools.chain.from_iterable(_extract_all(paths, min_parallel=2000, chunksize=64)):
        if doc not in seen:  # exact dedup, first occurrence wins
            seen.add(doc)
            docs.append(doc)
    return docs


def _write_atomically(path: str, write) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a cache


def docstring_documents(include_site_packages: bool = True, exclude_packages: Sequence[str] = (),
                        max_documents: int | None = None, cache_dir: str | None = None) -> list[str]:
    """Docstrings of the standard library (and installed packages) as a list of documents.

    Args:
      include_site_packages: also read the running interpreter's purelib/platlib site-packages.
      exclude_packages: top-level package/module names to leave out.
      max_documents: keep only the first N documents (after deduplication).
      cache_dir: if set, the full corpus is stored there as JSONL and reused by later calls with the same
        arguments and the same installed packages.

    Returns:
      Cleaned (`inspect.cleandoc`), exactly deduplicated docstrings of at least 20 characters, in
      deterministic order: files sorted by path relative to their root (stdlib first), source order inside.
    """
    if max_documents is not None and max_documents < 0:
        raise DataError(f"max_documents must be >= 0, got {max_documents}")
    cache_path = None
    if cache_dir:
        cache_path = os.path.join(cache_dir, f"docstrings-{cache_key(include_site_packages, exclude_packages)}.jsonl")
    if cache_path and os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
    else:
        docs = _build_corpus(include_site_packages, exclude_packages)
        if cache_path:
            _write_atomically(cache_path, lambda f: f.writelines(json.dumps(d, ensure_ascii=False) + "\n"
                                                                 for d in docs))
    return docs if max_documents is None else docs[:max_documents]


def pretraining_documents(cache_dir: str | None = None, include_site_packages: bool = True) -> list[str]:
    """The corpus of the "docstrings" sources: with site-packages, every text of the docstring_origin task is
    left out (`heldout_texts`); the standard library alone holds none of the task's packages."""
    docs = docstring_documents(include_site_packages=include_site_packages, cache_dir=cache_dir)
    if not include_site_packages:
        return docs
    held_out = heldout_texts(cache_dir)
    return [d for d in docs if d not in held_out]


# ---- the docstring_origin task's texts ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What defines a docstring_origin task: its packages, the per-package cap and minimum, the split sizes."""
    kind: ClassVar[str] = "single"  # the task folder's shape (data_pipeline.tasks); not a field: no cache change
    packages: tuple[str, ...]
    cap: int = 1000
    min_docs: int = 1000
    test_fraction: float = 0.1
    validation_fraction: float = 0.1


DOCSTRING_ORIGIN = TaskSpec(packages=("jax", "matplotlib", "networkx", "numpy", "scipy", "sklearn", "sympy",
                                      "tensorflow", "torch", "transformers"))


@dataclasses.dataclass(frozen=True)
class PairTaskSpec(TaskSpec):
    """docstring_pairs (`data_pipeline.docstring_pairs`): pairs of docstring_origin's texts, within its splits."""
    kind: ClassVar[str] = "pair"


@dataclasses.dataclass(frozen=True)
class TokenTaskSpec(TaskSpec):
    """docstring_params (`data_pipeline.docstring_params`): the parameter names tagged in docstring_origin's
    function docstrings, within its splits; an example is the first `max_words` words of its docstring."""
    kind: ClassVar[str] = "token"
    max_words: int = 48


def origin_spec(spec: TaskSpec) -> TaskSpec:
    """The docstring_origin selection a derived task (pairs, tokens) is built from: its texts are held out of
    pretraining already, and its splits are theirs."""
    return TaskSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(TaskSpec)})


# The tasks by name; the one named "docstring_origin" is what the pretraining corpus holds out (the other two
# take their texts from it, so they are held out with it).
TASKS = {"docstring_origin": DOCSTRING_ORIGIN,
         "docstring_pairs": PairTaskSpec(packages=DOCSTRING_ORIGIN.packages),
         "docstring_params": TokenTaskSpec(packages=DOCSTRING_ORIGIN.packages)}


def package_docstrings(packages: Iterable[str]) -> dict[str, list[str]]:
    """Distinct docstrings of each top-level package (stdlib and site-packages), in file then source order."""
    packages = list(packages)
    wanted = set(packages)
    paths = [(top_level_name(rel), os.path.join(root, rel)) for root in roots(True) for rel in python_files(root)
             if top_level_name(rel) in wanted]
    per_file = _extract_all([p for _, p in paths], min_parallel=500, chunksize=32)
    docs: dict[str, dict[str, None]] = {p: {} for p in packages}  # dicts keep first-seen order
    for (top, _), file_docs in zip(paths, per_file):
        for doc in file_docs:
            docs[top][doc] = None
    return {p: list(d) for p, d in docs.items()}


def _rank(text: str) -> str:
    # sha256, not sha1: split_of uses sha1, and ranking by the same hash would put the kept texts in one split.
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_name(text: str, spec: TaskSpec) -> str:
    """"test", "validation" or "train" for `text`, from split_of's stable hash."""
    if split_of(text, spec.test_fraction) == "validation":
        return "test"
    if split_of(text, spec.test_fraction + spec.validation_fraction) == "validation":
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
    splits: dict[str, list[dict]] = {s: [] for s in TASK_SPLITS}
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


def build_task(spec: TaskSpec = DOCSTRING_ORIGIN, cache_dir: str | None = None) -> dict[str, list[dict]]:
    """The task's examples per split; cached in `cache_dir` (keyed by the spec and the installed packages)."""
    if not spec.packages:
        raise DataError("a docstring_origin task needs at least one package")
    if spec.cap < 1 or spec.min_docs < 1:
        raise DataError(f"cap and min_docs must be >= 1, got {spec.cap} and {spec.min_docs}")
    cache_path = None
    if cache_dir:
        key = json.dumps([_TASK_CACHE_VERSION, dataclasses.asdict(spec), cache_key(True, ())])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache_path = os.path.join(cache_dir, f"task-docstring_origin-{digest}.json")
        if os.path.exists(cache_path):
            with open(cache_path, encoding="utf-8") as f:
                return json.load(f)
    splits = select_examples(package_docstrings(spec.packages), spec)
    if cache_path:
        _write_atomically(cache_path, lambda f: json.dump(splits, f, ensure_ascii=False))
    return splits


def heldout_texts(cache_dir: str | None = None, spec: TaskSpec | None = None) -> set[str]:
    """Every text of the task (all splits): what the pretraining corpus must not contain. Where the task cannot
    be built here (a package missing, e.g. sklearn in an environment without scikit-learn), the texts it would
    take from the packages present are held out all the same (a one-line note on stderr); the corpus has no
    text of a missing package anyway. So `python -m tools.demo` runs where scikit-learn is not installed."""
    try:
        splits = build_task(spec or TASKS["docstring_origin"], cache_dir)
    except TooFewDocstrings as e:
        print(f"note: the docstring_origin task cannot be built here ({e}); the pretraining corpus leaves out "
              "its texts from the packages present", file=sys.stderr)
        splits = e.splits
    return {ex["text"] for examples in splits.values() for ex in examples}
