"""The one file-I/O layer for every path a user gives: local paths, and object-store URLs (`gs://`, and any
scheme etils.epath reaches) for data folders, workdirs, init_from and the tools.

Local paths go to `os` / `open` exactly as before (atomic writes: temporary file, fsync, `os.replace`).
A URL (anything with `://`) goes to **etils.epath**. Why epath: it is the layer orbax itself writes
checkpoints through, so our files and orbax's see the same filesystem with the same credentials; it uses
tf.io.gfile when TensorFlow is importable (TensorFlow's GCS client, the one tf.data reads shards with) and
fsspec/gcsfs otherwise (`EPATH_USE_TF=false`), so `s3://` and friends come along. TensorFlow is imported only
when a URL is first touched: local runs, pretokenize and validate stay as light as before.

Object storage has no rename and no partial visibility rules of POSIX, so `atomic_write` on a URL spools the
bytes to a local temporary file and uploads them as one object only when the writer finished without error:
an object appears whole or not at all ("write, then publish"). Nothing here imports jax.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import glob as glob_lib
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator

_COPY_BLOCK = 8 << 20


def is_remote(path: str) -> bool:
    """True for an object-store URL (`gs://bucket/x`, `s3://...`), False for a local path."""
    return "://" in str(path)


def _epath(path: str):
    from etils import epath  # pylint: disable=import-outside-toplevel  (pulls TensorFlow in: URLs only)
    return epath.Path(path)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def abspath(path: str) -> str:
    """A URL unchanged (os.path would turn `gs://b/w` into `/cwd/gs:/b/w`), a local path made absolute."""
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_remote(path):
        p = _epath(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(path)


def getsize(path: str) -> int:
    return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) in the folder `path`; on object storage, the next level of the prefix."""
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return os.listdir(path)


def glob(pattern: str) -> list[str]:
    if is_remote(pattern):
        p = _epath(pattern)
        return sorted(str(x) for x in _epath(str(p.parent)).glob(p.name))
    return sorted(glob_lib.glob(pattern))


def walk_files(path: str) -> Iterator[str]:
    """Every file under the folder `path`, recursively (paths)."""
    if is_remote(path):
        for root, _, files in _epath(path).walk():
            yield from (str(root / f) for f in files)
        return
    for root, _, files in os.walk(path):
        yield from (os.path.join(root, f) for f in files)


def makedirs(path: str) -> None:
    """Creates the folder (and parents); exist_ok. On object storage folders are prefixes: nothing to make
    that a write would not make, but gfile records a marker that keeps `isdir` true for an empty folder."""
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    if is_remote(path):
        _epath(path).unlink()
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    if is_remote(path):
        if _epath(path).exists():
            _epath(path).rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace(src: str, dst: str) -> None:
    """Moves the file `src` over `dst`: os.replace locally; on object storage a server-side copy (the new
    object appears whole) then the delete of `src`."""
    if is_remote(src) or is_remote(dst):
        _epath(src).replace(dst)
    else:
        os.replace(src, dst)


def open(path: str, mode: str = "r", encoding: str | None = None) -> IO:  # noqa: A001  (the layer's open)
    """A file object, locally as `builtins.open`; on object storage (epath's) reads may seek, and a write
    shows only once closed (use `atomic_write` to publish only after the writer succeeded)."""
    if is_remote(path):
        if "b" in mode:
            return _epath(path).open(mode)
        return _epath(path).open(mode, encoding=encoding or "utf-8")
    return builtins.open(path, mode, encoding=encoding)  # pylint: disable=unspecified-encoding


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", encoding: str | None = None, fsync: bool = False):
    """Yields a file to write; `path` shows the new content only after the block finished without error.

    Local: written to `path + ".tmp"` (flushed and fsynced when `fsync`) and renamed over `path`, as always.
    URL: spooled to a local temporary file and uploaded as one object on success; on an error nothing is
    uploaded."""
    if not is_remote(path):
        tmp = path + ".tmp"
        with builtins.open(tmp, mode, encoding=encoding) as f:  # pylint: disable=unspecified-encoding
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with tempfile.TemporaryFile(mode="w+b") as spool:
        if "b" in mode:
            yield spool
        else:
            import io  # pylint: disable=import-outside-toplevel
            text = io.TextIOWrapper(spool, encoding=encoding or "utf-8", write_through=True)
            yield text
            text.flush()
            text.detach()
        spool.seek(0)
        upload(spool, path)


def upload(fileobj: IO[bytes], path: str) -> None:
    """Copies the readable binary `fileobj` into the object `path` (one object, shown when complete)."""
    with _epath(path).open("wb") as out:
        for block in iter(lambda: fileobj.read(_COPY_BLOCK), b""):
            out.write(block)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """`text` into `path`, atomically and durably (see `atomic_write`)."""
    with atomic_write(path, "w", encoding="utf-8", fsync=True) as f:
        f.write(text)


def copy(src: str, dst: str) -> None:
    """Copies one file between any two places (local or URL); the destination appears complete."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copyfile(src, dst)
        return
    with open(src, "rb") as f:
        if is_remote(dst):
            upload(f, dst)
        else:
            with builtins.open(dst, "wb") as out:
                shutil.copyfileobj(f, out, _COPY_BLOCK)


def copy_tree(src: str, dst: str) -> None:
    """Copies the folder `src` into `dst` (files of the same name replaced), between any two places."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    for file in walk_files(src):
        rel = file[len(src.rstrip("/")) + 1:]
        target = join(dst, *rel.split("/"))
        if not is_remote(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        copy(file, target)


_LOCAL_COPIES: dict[str, str] = {}


def local_copy(path: str) -> str:
    """A local path with the content of `path` (a folder or a file): `path` itself when local, else a copy
    downloaded once per process (removed at exit), a file keeping its name. For libraries that read only
    local files (tokenizers, sentencepiece, transformers): a tokenizer folder is a few MB at most."""
    if not is_remote(path):
        return path
    key = path.rstrip("/")
    if key not in _LOCAL_COPIES:
        local = tempfile.mkdtemp(prefix="bert_jax_remote_")
        atexit.register(shutil.rmtree, local, True)
        if isdir(key):
            copy_tree(key, local)
        else:
            local = os.path.join(local, basename(key))
            copy(key, local)
        _LOCAL_COPIES[key] = local
    return _LOCAL_COPIES[key]
