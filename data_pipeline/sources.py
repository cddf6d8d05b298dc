"""Raw text sources by name: the installed-docstring corpus, text / JSONL files, and TFDS datasets.

Everything here yields plain `str` documents; tokenization and packing happen later. The docstring corpus
itself (extraction, cache, the downstream task's texts it leaves out) is `data_pipeline.docstrings`.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
from typing import Iterator

from data_pipeline import paths
from data_pipeline.docstrings import docstring_documents, pretraining_documents
from data_pipeline.errors import DataError

# docstring_documents is re-exported: the corpus is one of the sources, and callers (tools/, tests/) read the
# raw corpus as sources.docstring_documents.
__all__ = ["TFDS_PREFIX", "docstring_documents", "file_documents", "iter_documents", "source_bytes",
           "tfds_documents"]


def _resolve_files(pattern: str) -> list[str]:
    if paths.is_remote(pattern):
        return _resolve_remote(pattern)
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


def _resolve_remote(pattern: str) -> list[str]:
    """The files of an object-store folder, a single object, or a glob (a `*` in the last part), sorted;
    names starting with "." left out as locally."""
    if any(c in pattern for c in "*?["):
        files = [p for p in paths.glob(pattern) if not paths.isdir(p)]
    elif paths.isdir(pattern):
        files = [p for p in paths.walk_files(pattern)
                 if not any(part.startswith(".") for part in p[len(pattern.rstrip("/")) + 1:].split("/"))]
    else:
        files = [pattern] if paths.exists(pattern) else []
    if not files:
        raise DataError(f"no input files match {pattern!r}")
    return sorted(files)


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(paths.open(path, "rb") if paths.is_remote(path) else path, "rt", encoding="utf-8")
    return paths.open(path, encoding="utf-8")


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
    return sum(paths.getsize(f) for f in files)


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
        # "docstrings": the downstream task's documents (data_pipeline.docstrings.heldout_texts) are left out.
        docs = pretraining_documents(cache_dir, include_site_packages=(source == "docstrings"))
        yield from (docs if max_documents is None else docs[:max_documents])
        return
    if source.startswith(TFDS_PREFIX):
        docs = tfds_documents(source[len(TFDS_PREFIX):], split=tfds_split, data_dir=tfds_data_dir,
                              text_feature=text_field)
    else:
        docs = file_documents(source, text_field=text_field, txt_mode=txt_mode)
    yield from (docs if max_documents is None else itertools.islice(docs, max_documents))
