"""Raw text sources: the installed-docstring corpus, text / JSONL files, and TFDS datasets.

Everything here yields plain `str` documents; tokenization and packing happen later.

The docstring corpus is a real English (technical) corpus that needs no download: the docstrings of the
Python standard library and, optionally, of the installed site-packages, extracted with `ast` (nothing is
imported, so no package code runs). It is deterministic for a given interpreter and set of installed
packages, which makes it a reproducible smoke-test corpus for pretraining.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import sys
import sysconfig
from typing import Iterator, Sequence

from data_pipeline.errors import DataError

# Directory names never descended into: test suites are mostly boilerplate docstrings ("Test that ...")
# and the nested site-packages of a base interpreter would duplicate the venv's packages.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
_MIN_DOC_CHARS = 20
_DEF_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_CACHE_VERSION = 1  # bump when the extraction rules change, so old caches are not reused


def _python_files(root: str) -> list[str]:
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


def _top_level_name(rel_path: str) -> str:
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


def _file_docstrings(path: str) -> list[str]:
    """Cleaned docstrings of one source file in source order; [] if it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            source = f.read()
        # Parsing bytes lets `ast` honour PEP 263 encoding declarations.
        tree = ast.parse(source, filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    nodes = [tree] + list(_definitions(tree))
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if isinstance(doc, str):
            doc = inspect.cleandoc(doc)
            if len(doc) >= _MIN_DOC_CHARS:
                docs.append(doc)
    return docs


def _roots(include_site_packages: bool) -> list[str]:
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]]
    if include_site_packages:
        for key in ("purelib", "platlib"):
            if paths[key] not in roots:
                roots.append(paths[key])
    return [os.path.realpath(r) for r in roots]


def _cache_key(include_site_packages: bool, exclude_packages: Sequence[str]) -> str:
    roots = _roots(include_site_packages)
    # The listing of each root (dist-info folders carry versions) is a cheap proxy for "what is installed".
    listing = [sorted(os.listdir(r)) if os.path.isdir(r) else [] for r in roots]
    key = json.dumps([_CACHE_VERSION, sys.version, roots, listing, sorted(exclude_packages)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _build_docstring_corpus(include_site_packages: bool, exclude_packages: Sequence[str]) -> list[str]:
    excluded = set(exclude_packages)
    paths = []
    for root in _roots(include_site_packages):
        for rel in _python_files(root):
            if _top_level_name(rel) not in excluded:
                paths.append(os.path.join(root, rel))
    # Pool.imap keeps input order, so the result equals the serial loop. Processes are forked (spawn would
    # re-run the caller's __main__), which is only safe before multi-threaded native libraries start:
    # with any of them loaded we stay serial. The pretokenize CLI reads its corpus before loading them.
    threaded = any(m in sys.modules for m in ("tensorflow", "tokenizers", "torch", "jax"))
    if len(paths) > 2000 and (os.cpu_count() or 1) > 1 and not threaded:
        with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 8)) as pool:
            per_file = list(pool.imap(_file_docstrings, paths, chunksize=64))
    else:
        per_file = [_file_docstrings(p) for p in paths]
    seen = set()
    docs = []
    for doc in itertools.chain.from_iterable(per_file):
        if doc not in seen:  # exact dedup, first occurrence wins
            seen.add(doc)
            docs.append(doc)
    return docs


def docstring_documents(include_site_packages: bool = True, exclude_packages: Sequence[str] = (),
                        max_documents: int | None = None, cache_dir: str | None = None) -> list[str]:
    """Docstrings of the standard library (and installed packages) as a list of documents.

    Args:
      include_site_packages: also read the running interpreter's purelib/platlib site-packages.
      exclude_packages: top-level package/module names to leave out (held-out text for downstream tasks).
      max_documents: keep only the first N documents (after deduplication).
      cache_dir: if set, the full corpus is stored there as JSONL and reused by later calls with the same
        arguments and the same installed packages.

    Returns:
      Cleaned (`inspect.cleandoc`), exactly deduplicated docstrings of at least 20 characters, in
      deterministic order: files sorted by path relative to their root (stdlib first), source order inside.
    """
    if max_documents is not None and max_documents < 0:
        raise DataError(f"max_documents must be >= 0, got {max_documents}")
    docs = None
    cache_path = None
    if cache_dir:
        key = _cache_key(include_site_packages, exclude_packages)
        cache_path = os.path.join(cache_dir, f"docstrings-{key}.jsonl")
        if os.path.exists(cache_path):
            with open(cache_path, encoding="utf-8") as f:
                docs = [json.loads(line) for line in f]
    if docs is None:
        docs = _build_docstring_corpus(include_site_packages, exclude_packages)
        if cache_path:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                for doc in docs:
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            os.replace(tmp, cache_path)  # atomic: a concurrent reader never sees half a cache
    return docs if max_documents is None else docs[:max_documents]


def split_of(text: str, validation_fraction: float) -> str:
    """"train" or "validation" for `text`, from a stable hash (the same in every process and run).

    The first 8 bytes of sha1(text) read as an integer give a uniform number in [0, 1); texts below
    `validation_fraction` go to validation. Identical texts always land in the same split.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise DataError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if u < validation_fraction else "train"


def _resolve_files(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        files = []
        for dirpath, dirnames, filenames in os.walk(pattern):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(os.path.join(dirpath, n) for n in filenames if not n.startswith("."))
        files.sort()
    elif os.path.isfile(pattern):
        files = [pattern]
    else:
        files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"no input files match {pattern!r}")
    return files


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_documents(path: str, txt_mode: str) -> Iterator[str]:
    with _open_text(path) as f:
        if txt_mode == "line":
            for line in f:
                line = line.strip()
                if line:
                    yield line
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line.rstrip("\r\n"))
            elif block:
                yield "\n".join(block).strip()
                block = []
        if block:
            yield "\n".join(block).strip()


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{lineno}: no field {text_field!r} in the JSON object")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield text


def file_documents(pattern: str, text_field: str = "text", txt_mode: str = "block") -> Iterator[str]:
    """Documents from a file, a folder (all files inside, recursive, sorted) or a glob (sorted).

    `.jsonl` / `.json` (optionally `.gz`): one JSON object per line, the document is `record[text_field]`.
    Any other file is UTF-8 text (optionally `.gz`): one document per blank-line-separated block
    (`txt_mode="block"`) or per non-empty line (`txt_mode="line"`).
    Raises DataError naming the pattern if nothing matches, or the file and line of a bad record.
    """
    if txt_mode not in ("block", "line"):
        raise DataError(f"txt_mode must be 'block' or 'line', got {txt_mode!r}")
    for path in _resolve_files(pattern):
        base = path[:-3] if path.endswith(".gz") else path
        try:
            if base.endswith((".jsonl", ".json")):
                yield from _jsonl_documents(path, text_field)
            else:
                yield from _txt_documents(path, txt_mode)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError) as e:  # e.g. a truncated or fake .gz file
            raise DataError(f"{path}: cannot read ({e})") from None


TFDS_PREFIX = "tfds:"


def tfds_documents(name: str, split: str = "train", data_dir: str | None = None,
                   text_feature: str = "text") -> Iterator[str]:
    """The `text_feature` of a TensorFlow Datasets dataset (e.g. "wikipedia/20230601.en", "c4/en"), streamed.

    The dataset must already be prepared under `data_dir` (or TFDS's default folder): nothing is
    downloaded. Raises DataError naming the dataset when it is missing or has no such string feature.
    """
    import tensorflow_datasets as tfds  # heavy (imports TensorFlow): only for TFDS sources

    where = f"{TFDS_PREFIX}{name}[{split}]"
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False, shuffle_files=False)
    except Exception as e:  # pylint: disable=broad-except  (TFDS raises many types; all mean "not usable")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: cannot load the prepared dataset (data_dir={data_dir!r}): {first}") from None
    spec = ds.element_spec
    if not isinstance(spec, dict) or text_feature not in spec:
        have = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise DataError(f"{where}: no feature {text_feature!r} (features: {have})")
    if spec[text_feature].dtype.name != "string" or spec[text_feature].shape.rank != 0:
        raise DataError(f"{where}: feature {text_feature!r} is {spec[text_feature]}, not a scalar string")
    ds = ds.map(lambda ex: ex[text_feature])  # decode only the text, not the other features
    for i, text in enumerate(tfds.as_numpy(ds)):
        try:
            yield text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: example {i} is not UTF-8 ({e.reason} at byte {e.start})") from None


def source_bytes(source: str) -> int | None:
    """Total size in bytes of a file source's uncompressed files (for a progress bar's ETA); None when unknown
    (docstrings, TFDS, or any gzip file)."""
    if source in ("docstrings", "docstrings:stdlib") or source.startswith(TFDS_PREFIX):
        return None
    files = _resolve_files(source)
    if any(f.endswith(".gz") for f in files):
        return None
    return sum(os.path.getsize(f) for f in files)


def iter_documents(source: str, *, text_field: str = "text", cache_dir: str | None = None,
                   max_documents: int | None = None, txt_mode: str = "block", tfds_split: str = "train",
                   tfds_data_dir: str | None = None) -> Iterator[str]:
    """Documents of a named source.

    `source` is "docstrings" (stdlib + site-packages docstrings), "docstrings:stdlib" (standard library
    only: small and fast, for demos and tests), "tfds:NAME" (a prepared TFDS dataset, its split
    `tfds_split` under `tfds_data_dir`, the feature `text_field`) or a file / folder / glob for
    `file_documents`.
    """
    if source in ("docstrings", "docstrings:stdlib"):
        if max_documents is not None and max_documents < 0:
            raise DataError(f"max_documents must be >= 0, got {max_documents}")
        docs = docstring_documents(include_site_packages=(source == "docstrings"), cache_dir=cache_dir)
        if source == "docstrings":  # the downstream task's documents (data_pipeline.tasks) never reach pretraining
            from data_pipeline import tasks  # pylint: disable=import-outside-toplevel  (tasks imports us)
            held_out = tasks.heldout_texts(cache_dir)
            docs = [d for d in docs if d not in held_out]
        yield from (docs if max_documents is None else docs[:max_documents])
        return
    if source.startswith(TFDS_PREFIX):
        docs = tfds_documents(source[len(TFDS_PREFIX):], split=tfds_split, data_dir=tfds_data_dir,
                              text_feature=text_field)
    else:
        docs = file_documents(source, text_field=text_field, txt_mode=txt_mode)
    yield from (docs if max_documents is None else itertools.islice(docs, max_documents))
