"""Parallel tokenization for pretokenize: batches of documents encoded in a process pool, results in input order.

The output never depends on the number of workers: results are consumed strictly in submission order, and
a single worker encodes in this process. Memory stays flat: at most two batches per worker are in flight
(`Pool.imap` would read the whole input ahead).
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import time
from typing import Iterable, Iterator

import numpy as np

from data_pipeline.tokenization import Tokenizer

BATCH_DOCS = 256  # documents per worker task: large enough to amortise the inter-process hop

_WORKER_TOKENIZER: Tokenizer | None = None  # one per worker process, loaded by its initializer


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER  # pylint: disable=global-statement
    _WORKER_TOKENIZER = Tokenizer.load(tokenizer_dir)


def _encode(tokenizer: Tokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(ids of all documents concatenated, int32; token count per document; utf-8 bytes per document)."""
    ids = tokenizer.encode_batch(docs)
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    return flat, lengths, [len(d.encode("utf-8")) for d in docs]


def _encode_in_worker(docs: list[str]):
    return _encode(_WORKER_TOKENIZER, docs)


def batched(items: Iterable[str], n: int = BATCH_DOCS) -> Iterator[list[str]]:
    """`items` in lists of `n` (the last one shorter)."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


class Encoder:
    """Encodes batches of documents, results in input order: in this process (`workers` 1), or in `workers`
    spawned processes that load the tokenizer from `tokenizer_dir` once and serve every split of a run (the
    pool starts on the first batch). At most 2 batches per worker are in flight, so memory does not grow with
    the corpus (Pool.imap would read the whole input ahead). Use as a context manager."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_dir: str, workers: int):
        self.tokenizer, self.tokenizer_dir, self.workers = tokenizer, tokenizer_dir, workers
        self._pool = None

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def _started_pool(self):
        if self._pool is None:
            # spawn, not fork: the parent may already run TensorFlow / tokenizers threads. One thread per worker.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, _init_worker, (self.tokenizer_dir,))
        return self._pool

    def encode(self, batches: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray, list[int]]]:
        """`_encode` of each batch, in input order."""
        if self.workers == 1:
            for batch in batches:
                yield _encode(self.tokenizer, batch)
            return
        pool, pending = None, collections.deque()
        for batch in batches:
            pool = pool or self._started_pool()
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class EncodedDocs:
    """Encoded documents one by one as (np.int32 ids, utf-8 bytes of the text), with a look-ahead; the
    progress bar advances by each batch's bytes."""

    def __init__(self, results: Iterator, bar):
        self._results, self._bar = results, bar
        self._queue: collections.deque = collections.deque()
        self.bytes = 0  # text bytes of all documents received so far
        self._docs, self._start = 0, time.time()

    def has_next(self) -> bool:
        while not self._queue:
            try:
                flat, lengths, nbytes = next(self._results)
            except StopIteration:
                return False
            self._queue.extend(zip(np.split(flat, np.cumsum(lengths)[:-1]), nbytes) if len(lengths) else [])
            self.bytes += sum(nbytes)
            self._docs += len(nbytes)
            self._bar.set_postfix_str(f"{self._docs / max(time.time() - self._start, 1e-9):.0f} docs/s",
                                      refresh=False)
            self._bar.update(sum(nbytes))  # the bar itself shows MB/s and the ETA
        return True

    def pop(self) -> tuple[np.ndarray, int]:
        return self._queue.popleft()
