"""The docstring_params task: tag the function's parameter names in its docstring (token classification, BIO).

Built from docstring_origin's selection (`data_pipeline.docstrings`), split by split, so its texts are held
out of the pretraining corpus as well and no text is in two splits. Of the selected texts, those that are the
docstring of a function (`def`, found with `ast` in the same files; the first such function in file and source
order) become examples: the docstring is cut into words (runs of letters and digits; every other non-space
character, "_" included, is a word of its own, as BERT's pre-tokenizer splits text), and every identifier in it
that names one of the function's parameters (not `self` / `cls`, not an English function word such as `a`;
not after "." or an apostrophe) is an entity: B-PARAM on its first word, I-PARAM on the rest (`axis_name` is
`axis` `_` `name`: B I I), O elsewhere. An example is the first `max_words` words (48) of its docstring; one
with no parameter name among them is left out. Rows: {"tokens": [...], "tags": [...]}.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import os
import re

from data_pipeline import docstrings
from data_pipeline.docstrings import TokenTaskSpec, build_task, origin_spec
from data_pipeline.errors import DataError

TOKEN_LABELS = ("B-PARAM", "I-PARAM", "O")
_WORD = re.compile(r"[^\W_]+|\S")
_IDENTIFIER = re.compile(r"(?<![\w.'\u2019])[A-Za-z_][A-Za-z0-9_]*(?!\w)")
# Parameter names that are also common English words: in prose they are nearly never the parameter.
_NOT_PARAMS = frozenset({"self", "cls", "a", "an", "the", "to", "of", "on", "at", "by", "it", "be", "i", "s",
                         "this", "that", "all", "any", "no", "one", "do", "so", "up"})
_CACHE_VERSION = 1


def function_params(path: str) -> list[tuple[str, list[str]]]:
    """(cleaned docstring, parameter names) of each function in one source file with a docstring, in source
    order; the docstring cleaned and filtered as `docstrings.file_docstrings` does; [] if unreadable."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    found = []
    # The same walk as the corpus's, so the docstrings match its texts exactly.
    for node in docstrings._definitions(tree):  # pylint: disable=protected-access
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not isinstance(doc, str):
            continue
        doc = inspect.cleandoc(doc)
        if len(doc) >= docstrings._MIN_DOC_CHARS:  # pylint: disable=protected-access
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [
                x.arg for x in (a.vararg, a.kwarg) if x is not None]
            found.append((doc, names))
    return found


def tag_words(text: str, params, max_words: int) -> tuple[list[str], list[str]]:
    """The first `max_words` words of `text` and their BIO tags (B-PARAM / I-PARAM / O) for `params`."""
    wanted = set(params) - _NOT_PARAMS
    spans = [m.span() for m in _IDENTIFIER.finditer(text) if m.group() in wanted]
    words, tags = [], []
    k = 0  # the first entity span not yet passed
    for m in _WORD.finditer(text):
        if len(words) == max_words:
            break
        while k < len(spans) and spans[k][1] <= m.start():
            k += 1
        inside = k < len(spans) and spans[k][0] <= m.start() < spans[k][1]
        words.append(m.group())
        tags.append("O" if not inside else "B-PARAM" if m.start() == spans[k][0] else "I-PARAM")
    return words, tags


def package_function_params(packages) -> dict[str, list[str]]:
    """Function docstring -> its parameter names, over the packages' files (the first function wins)."""
    wanted = set(packages)
    paths = [os.path.join(root, rel) for root in docstrings.roots(True) for rel in docstrings.python_files(root)
             if docstrings.top_level_name(rel) in wanted]
    per_file = docstrings._extract_all(paths, min_parallel=500, chunksize=32,  # pylint: disable=protected-access
                                       extract=function_params)
    params: dict[str, list[str]] = {}
    for found in per_file:
        for doc, names in found:
            params.setdefault(doc, names)
    return params


def _select(splits: dict[str, list[dict]], params: dict[str, list[str]], max_words: int) -> dict[str, list[dict]]:
    out = {}
    for split, examples in splits.items():
        rows = []
        for ex in examples:
            if ex["text"] in params:
                words, tags = tag_words(ex["text"], params[ex["text"]], max_words)
                if "B-PARAM" in tags:
                    rows.append({"tokens": words, "tags": tags})
        out[split] = rows
    return out


def build_param_task(spec: TokenTaskSpec, cache_dir: str | None = None) -> dict[str, list[dict]]:
    """The tagged examples of each split of docstring_origin's selection under `spec`; cached in `cache_dir`."""
    if spec.max_words < 1:
        raise DataError(f"max_words must be >= 1, got {spec.max_words}")
    splits = build_task(origin_spec(spec), cache_dir)
    cache_path = None
    if cache_dir:
        key = json.dumps([_CACHE_VERSION, dataclasses.asdict(spec), docstrings.cache_key(True, ())])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache_path = os.path.join(cache_dir, f"task-docstring_params-{digest}.json")
        if os.path.exists(cache_path):
            with open(cache_path, encoding="utf-8") as f:
                return json.load(f)
    result = _select(splits, package_function_params(spec.packages), spec.max_words)
    if cache_path:
        docstrings._write_atomically(  # pylint: disable=protected-access
            cache_path, lambda f: json.dump(result, f, ensure_ascii=False))
    return result
