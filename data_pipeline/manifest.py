"""The dataset manifest: the one contract between `pretokenize` (which writes it) and everyone who reads a
pretokenized dataset (the tf.data reader, validate, training's config checks, masking, eval batch counts,
resume checks, conversion's special ids, the planner).

    DIR/manifest.json     written last, atomically: a folder with a manifest is complete (DIR may be a
                          gs:// URL: every access goes through data_pipeline.paths)
    DIR/{split}-{i:05d}-of-{n:05d}.tfrecord    the shards it lists (see data_pipeline.records)
    DIR/tokenizer/        the tokenizer files it lists

`Manifest` is a frozen dataclass; `load` checks the format and that every listed shard exists, `write`
replaces the file atomically. The JSON keeps its historical key order, so a manifest read and written
again is byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from data_pipeline import paths
from data_pipeline.errors import DataError

FORMAT = "bert_jax.pretokenized.v1"
FILENAME = "manifest.json"
SPLITS = ("train", "validation")
DTYPES = ("uint16", "int32")
_REQUIRED_KEYS = ("seq_len", "vocab_size", "dtype", "special_ids", "splits")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the five special tokens every tokenizer of ours has."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One TFRecord file: its name inside the dataset folder, row and non-pad token counts, checksum, and
    (when the shard packs exactly its own documents) how many documents it holds."""

    file: str
    rows: int
    tokens: int = 0
    sha256: str | None = None
    documents: int | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"file": self.file, "rows": self.rows, "tokens": self.tokens}
        if self.documents is not None:
            out["documents"] = self.documents
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


@dataclasses.dataclass(frozen=True)
class Split:
    rows: int
    shards: tuple[Shard, ...]
    tokens: int = 0
    documents: int | None = None

    def host_rows(self, process_index: int, process_count: int) -> int:
        """Rows of the shards host `process_index` reads (shards[process_index::process_count])."""
        return sum(s.rows for s in self.shards[process_index::process_count])

    def to_json(self) -> dict:
        out: dict[str, Any] = {"rows": self.rows, "tokens": self.tokens}
        if self.documents is not None:
            out["documents"] = self.documents
        out["shards"] = [s.to_json() for s in self.shards]
        return out


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizer folder inside the dataset (`dir`), its kind and files with their checksums."""

    type: str
    dir: str = "tokenizer"
    files: tuple[str, ...] = ()
    sha256: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"type": self.type, "dir": self.dir, "files": list(self.files), "sha256": dict(self.sha256)}


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a pretokenized dataset holds. `special_token_ids`: every id masking must never pick (the five
    special tokens plus any [unusedN]); `args`: pretokenize's arguments (a re-run with the same ones is a no-op)."""

    seq_len: int
    vocab_size: int
    dtype: str
    special_ids: SpecialIds
    splits: Mapping[str, Split]
    vocab_hash: str | None = None
    lowercase: bool | None = None
    special_token_ids: tuple[int, ...] = ()
    tokenizer: TokenizerFiles | None = None
    packing: str | None = None
    source: str | None = None
    validation_fraction: float | None = None
    text_bytes: int | None = None
    args: Mapping[str, Any] | None = None
    created_by: str | None = None

    def split(self, name: str) -> Split:
        """The split `name`; DataError when the dataset has none."""
        if name not in self.splits:
            raise DataError(f"no split {name!r} in this dataset (has {sorted(self.splits)})")
        return self.splits[name]

    def rows(self, split: str) -> int:
        """Rows of `split`, 0 when the dataset has no such split."""
        return self.splits[split].rows if split in self.splits else 0

    def to_json(self) -> dict:
        """The manifest.json object, keys in their historical order (optional ones only when set)."""
        out: dict[str, Any] = {"format": FORMAT, "seq_len": self.seq_len, "vocab_size": self.vocab_size}
        optional = {"vocab_hash": self.vocab_hash}
        out.update({k: v for k, v in optional.items() if v is not None})
        out["dtype"] = self.dtype
        if self.lowercase is not None:
            out["lowercase"] = self.lowercase
        out["special_ids"] = self.special_ids.to_json()
        out["special_token_ids"] = list(self.special_token_ids)
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.to_json()
        rest = {"packing": self.packing, "source": self.source, "validation_fraction": self.validation_fraction,
                "text_bytes": self.text_bytes}
        out.update({k: v for k, v in rest.items() if v is not None})
        out["splits"] = {name: s.to_json() for name, s in self.splits.items()}
        if self.args is not None:
            out["args"] = dict(self.args)
        if self.created_by is not None:
            out["created_by"] = self.created_by
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str = FILENAME) -> "Manifest":
        """Parses a manifest.json object; DataError (naming `where`) when it is not one of ours."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{where}: format is {found!r}, expected {FORMAT!r}")
        missing = [k for k in _REQUIRED_KEYS if k not in obj]
        if missing:
            raise DataError(f"{where}: missing keys {missing}")
        if obj["dtype"] not in DTYPES:
            raise DataError(f"{where}: dtype {obj['dtype']!r} is neither 'uint16' nor 'int32'")
        try:
            tok = obj.get("tokenizer")
            return cls(
                seq_len=int(obj["seq_len"]), vocab_size=int(obj["vocab_size"]), dtype=obj["dtype"],
                special_ids=SpecialIds(**{k: int(v) for k, v in obj["special_ids"].items()}),
                splits={name: Split(rows=int(s.get("rows", 0)), tokens=int(s.get("tokens", 0)),
                                    documents=s.get("documents"),
                                    shards=tuple(Shard(**sh) for sh in s.get("shards", ())))
                        for name, s in obj["splits"].items()},
                vocab_hash=obj.get("vocab_hash"), lowercase=obj.get("lowercase"),
                special_token_ids=tuple(int(i) for i in obj.get("special_token_ids", ())),
                tokenizer=TokenizerFiles(type=tok["type"], dir=tok.get("dir", "tokenizer"),
                                         files=tuple(tok.get("files", ())), sha256=dict(tok.get("sha256", {})))
                if tok else None,
                packing=obj.get("packing"), source=obj.get("source"),
                validation_fraction=obj.get("validation_fraction"), text_bytes=obj.get("text_bytes"),
                args=obj.get("args"), created_by=obj.get("created_by"))
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def path(data_dir: str) -> str:
    return paths.join(data_dir, FILENAME)


def read(file: str) -> Manifest:
    """The manifest in the JSON file `file` (a dataset's manifest.json, or a workdir's copy of it)."""
    try:
        with paths.open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: invalid JSON ({e})") from None
    return Manifest.from_json(obj, file)


def load(data_dir: str) -> Manifest:
    """The manifest of the pretokenized dataset `data_dir`, after checking its format and that every listed
    shard exists. Raises DataError (one line, naming the path) when anything is missing or malformed."""
    if not data_dir:
        raise DataError("data.dir is empty: point it at a folder written by `python -m data_pipeline.pretokenize`")
    if not paths.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist")
    file = path(data_dir)
    if not paths.isfile(file):
        raise DataError(f"{data_dir!r} has no {FILENAME} (not a pretokenized dataset, or unfinished)")
    manifest = read(file)
    present = _listing(data_dir)
    for name, split in manifest.splits.items():
        for shard in split.shards:
            if shard.file not in present:
                raise DataError(f"{file}: shard {shard.file!r} of split {name!r} is missing")
    return manifest


def _listing(data_dir: str):
    """The names in `data_dir` that are files: one listing instead of a stat per shard (on object storage each
    stat is a round trip, and a dataset may have thousands of shards)."""
    if paths.is_remote(data_dir):
        return set(paths.listdir(data_dir))
    return {n for n in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, n))}


def write(data_dir: str, manifest: Manifest) -> None:
    """Writes `data_dir/manifest.json` atomically (a reader sees the old file or the new one, never half)."""
    write_json(path(data_dir), manifest.to_json())


def write_json(file: str, obj) -> None:
    """`obj` as indented JSON in `file`, written to a temporary file, flushed and renamed over it (on object
    storage: uploaded as one object once complete; `data_pipeline.paths.atomic_write`)."""
    with paths.atomic_write(file, "w", encoding="utf-8", fsync=True) as f:
        json.dump(obj, f, indent=1)


def synthetic(seq_len: int, vocab_size: int, special_ids: SpecialIds, train_rows: int = 0,
              validation_rows: int = 0) -> Manifest:
    """A manifest with no data behind it, for the tools that build a run without reading data (the planner,
    the benchmark): the shapes and special ids training's checks and masking read."""
    splits = {name: Split(rows=rows, shards=(Shard(f"{name}-00000-of-00001.tfrecord", rows),) if rows else ())
              for name, rows in (("train", train_rows), ("validation", validation_rows))}
    return Manifest(seq_len=seq_len, vocab_size=vocab_size, dtype="uint16" if vocab_size <= 65536 else "int32",
                    special_ids=special_ids, splits=splits,
                    special_token_ids=tuple(sorted(set(dataclasses.astuple(special_ids)))))
