"""tools.benchmark_data end to end on a tiny corpus: the JSON's structure and internal consistency (never its
speed): the local pool and Beam's DirectRunner writing the same shards, the reader from local disk and from a
bucket on the GCS emulator it starts (connecting to nothing but 127.0.0.1); the Beam row reported missing when
apache_beam is; bad arguments refused with one error line before any work."""

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from data_pipeline import manifest as manifest_lib
from data_pipeline.tokenization import Tokenizer
from tests.gcs_emulator import connect_targets, traced

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("wordpiece", "sentencepiece-unigram")


def _tool(*args, timeout=300, prefix=(), python=("-m", "tools.benchmark_data")):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([*prefix, sys.executable, *python, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _shard_bytes(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if n.endswith(".tfrecord")}


@pytest.mark.slow
def test_benchmark_data_reports_consistent_figures(tmp_path):
    out, trace = tmp_path / "scratch", str(tmp_path / "strace.log")
    p = _tool("--max-documents", "300", "--reader-batches", "3", "--batch-size", "8", "--seq-len", "64",
              "--vocab-size", "500", "--workers", "2", "--out", str(out), "--bucket", "gs://bench/data",
              "--gcs-emulator", prefix=traced([], trace))
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["settings"] == {"source": "docstrings:stdlib", "max_documents": 300, "vocab_size": 500, "seq_len": 64,
                             "batch_size": 8, "reader_batches": 3, "workers": 2, "tokenizers": list(KINDS),
                             "window_shards": 1, "runner": "DirectRunner", "bucket": "gs://bench/data",
                             "gcs_emulator": True}
    # The tool, the emulator, its proxy and Beam's workers connect to loopback only (Beam's gRPC: also ::1);
    # no name lookups either (Beam's DirectRunner would look up github.com for its Prism runner's binary).
    assert connect_targets(trace) <= {"127.0.0.1", "::1"}
    assert r["machine"]["nproc"] == os.cpu_count() and len(r["machine"]["loadavg_start"]) == 3
    assert r["corpus"]["documents"] == 300 and r["corpus"]["mb"] > 0
    assert set(r["pretokenize"]) == set(KINDS)
    for kind in KINDS:
        pre = r["pretokenize"][kind]
        manifest = manifest_lib.load(str(out / kind / "data"))
        splits = manifest.splits.values()
        assert pre["mb"] == pytest.approx(r["corpus"]["mb"]) == pytest.approx(manifest.text_bytes / 1e6)
        assert pre["documents"] == 300 == sum(s.documents for s in splits)
        assert pre["rows"] == sum(s.rows for s in splits) and pre["tokens"] == sum(s.tokens for s in splits)
        assert pre["seconds"] > 0 and pre["fixed_s"] > 0  # on a tiny corpus the fixed cost may be most of it
        assert pre["mb_per_s"] == pytest.approx(pre["mb"] / pre["seconds"])
        assert pre["docs_per_s"] == pytest.approx(300 / pre["seconds"])
        assert pre["rows_per_s"] == pytest.approx(pre["rows"] / pre["seconds"])
        if pre["seconds"] > pre["fixed_s"]:
            assert pre["mb_per_s_after_fixed"] == pytest.approx(pre["mb"] / (pre["seconds"] - pre["fixed_s"]))
        else:
            assert pre["mb_per_s_after_fixed"] is None
        # the vocabulary trained beforehand is the one pretokenize loaded (not one trained in the timed call)
        tok = Tokenizer.load(str(out / kind / "vocab"))
        assert pre["vocab_size"] == tok.vocab_size == manifest.vocab_size and 100 < tok.vocab_size <= 500
        assert manifest.vocab_hash == tok.vocab_hash and manifest.args["vocab_size"] is None
        assert (manifest.tokenizer.type == "wordpiece") == (kind == "wordpiece")
        assert manifest.seq_len == 64
        # Beam's DirectRunner: the same vocabulary, the same shards byte for byte, the same totals
        beam = r["pretokenize_beam"][kind]
        assert beam["runner"] == "DirectRunner" and beam["same_shards_as_pool"] is True
        assert manifest_lib.load(str(out / kind / "beam" / "data")).splits == manifest.splits
        assert _shard_bytes(out / kind / "beam" / "data") == _shard_bytes(out / kind / "data") != {}
        assert {k: beam[k] for k in ("mb", "documents", "rows", "tokens", "shards", "vocab_size")} \
            == {k: pre[k] for k in ("mb", "documents", "rows", "tokens", "shards", "vocab_size")}
        assert beam["mb_per_s"] == pytest.approx(beam["mb"] / beam["seconds"]) and beam["fixed_s"] > 0
    reader = r["reader"]
    assert reader["tokenizer"] == "wordpiece" and reader["tokens"] == 3 * 8 * 64
    assert reader["tokens_per_s"] == pytest.approx(reader["tokens"] / reader["seconds"])
    assert reader["batches_per_s"] == pytest.approx(3 / reader["seconds"])
    assert reader["rows_per_s"] == pytest.approx(3 * 8 / reader["seconds"])
    assert reader["rows_per_epoch"] <= r["pretokenize"]["wordpiece"]["rows"]
    # the same shards read from the bucket (copied there untimed): the same batches' worth of tokens
    bucket = r["reader_bucket"]
    assert bucket["bucket"] == "gs://bench/data" and bucket["gcs_emulator"] is True
    assert {k: bucket[k] for k in ("tokenizer", "tokens", "shards", "rows_per_epoch", "window_shards")} \
        == {k: reader[k] for k in ("tokenizer", "tokens", "shards", "rows_per_epoch", "window_shards")}
    assert bucket["tokens_per_s"] == pytest.approx(bucket["tokens"] / bucket["seconds"])
    targets = r["targets"]
    assert {k: t["target"] for k, t in targets.items()} == {
        "wordpiece_mb_per_s": 3.0, "sentencepiece-unigram_mb_per_s": 8.0, "wordpiece_beam_mb_per_s": 3.0,
        "sentencepiece-unigram_beam_mb_per_s": 8.0, "reader_tokens_per_s": 10e6, "reader_bucket_tokens_per_s": 10e6}
    assert targets["wordpiece_mb_per_s"]["value"] == r["pretokenize"]["wordpiece"]["mb_per_s"]
    assert targets["sentencepiece-unigram_beam_mb_per_s"]["value"] \
        == r["pretokenize_beam"]["sentencepiece-unigram"]["mb_per_s"]
    assert targets["reader_tokens_per_s"]["value"] == reader["tokens_per_s"]
    assert targets["reader_bucket_tokens_per_s"]["value"] == bucket["tokens_per_s"]
    assert all(t["met"] == (t["value"] >= t["target"]) for t in targets.values())
    assert r["not_measured"] == {}
    assert "MB/s" in p.stdout and "M tokens/s" in p.stdout
    assert (out / "corpus.jsonl").exists()  # --out is kept; the default temporary folder is removed
    url = re.search(r"GCS emulator on (http://127\.0\.0\.1:\d+)", p.stdout).group(1)
    with pytest.raises(OSError):  # stopped at the end of the run
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5)


def test_without_apache_beam_the_beam_row_says_so(tmp_path):
    """apache_beam made unimportable in the tool's process: no Beam row, the reason in not_measured, and
    asking for the runner is one error line."""
    hide = "import sys; sys.modules['apache_beam'] = None; from tools.benchmark_data import main; sys.exit(main())"
    p = _tool("--max-documents", "50", "--reader-batches", "1", "--batch-size", "4", "--seq-len", "32",
              "--vocab-size", "200", "--workers", "1", "--tokenizers", "wordpiece", python=("-c", hide))
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["settings"]["runner"] == "none" and "pretokenize_beam" not in r
    assert r["not_measured"] == {
        "pretokenize_beam_directrunner_mb_per_s": "apache_beam is not installed (pip install 'bert_jax[beam]')",
        "reader_bucket_tokens_per_s": "no --bucket given (--gcs-emulator runs a local one)"}
    p = _tool("--runner", "DirectRunner", python=("-c", hide), timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --runner DirectRunner: apache_beam is not installed (pip install 'bert_jax[beam]')"], p.stderr


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1"),
    (["--tokenizers", "wordpiece,bpe"], "error: --tokenizers 'wordpiece,bpe': choose from"),
    (["--seq-len", "4"], "error: --seq-len must be in [8, 65536]"),
    (["--source", "/nonexistent/dir/*.txt"], "error: --source: no input files match"),
    (["--window-shards", "x"], "error: argument --window-shards: invalid int value"),
    (["--bucket", "/local/data"], "error: --bucket '/local/data': give gs://BUCKET/PREFIX"),
    (["--gcs-emulator"], "error: --gcs-emulator needs --bucket gs://BUCKET/PREFIX"),
    (["--runner", "FlinkRunner"], "error: argument --runner: invalid choice: 'FlinkRunner'"),
])
def test_bad_arguments_fail_with_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "never"
    p = _tool(*args, "--out", str(out), timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), p.stderr
    assert p.stdout == "" and not out.exists()
