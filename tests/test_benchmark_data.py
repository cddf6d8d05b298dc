"""tools.benchmark_data end to end on a tiny corpus: the JSON's structure and internal consistency (never its
speed), and bad arguments refused with one error line before any work."""

import json
import os
import subprocess
import sys

import pytest

from data_pipeline import manifest as manifest_lib
from data_pipeline.tokenization import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("wordpiece", "sentencepiece-unigram")


def _tool(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "tools.benchmark_data", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_benchmark_data_reports_consistent_figures(tmp_path):
    out = tmp_path / "scratch"
    p = _tool("--max-documents", "300", "--reader-batches", "3", "--batch-size", "8", "--seq-len", "64",
              "--vocab-size", "500", "--workers", "2", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["settings"] == {"source": "docstrings:stdlib", "max_documents": 300, "vocab_size": 500, "seq_len": 64,
                             "batch_size": 8, "reader_batches": 3, "workers": 2, "tokenizers": list(KINDS),
                             "window_shards": 1}
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
    reader = r["reader"]
    assert reader["tokenizer"] == "wordpiece" and reader["tokens"] == 3 * 8 * 64
    assert reader["tokens_per_s"] == pytest.approx(reader["tokens"] / reader["seconds"])
    assert reader["batches_per_s"] == pytest.approx(3 / reader["seconds"])
    assert reader["rows_per_s"] == pytest.approx(3 * 8 / reader["seconds"])
    assert reader["rows_per_epoch"] <= r["pretokenize"]["wordpiece"]["rows"]
    targets = r["targets"]
    assert {k: t["target"] for k, t in targets.items()} == {
        "wordpiece_mb_per_s": 3.0, "sentencepiece-unigram_mb_per_s": 8.0, "reader_tokens_per_s": 10e6}
    assert targets["wordpiece_mb_per_s"]["value"] == r["pretokenize"]["wordpiece"]["mb_per_s"]
    assert targets["reader_tokens_per_s"]["value"] == reader["tokens_per_s"]
    assert all(t["met"] == (t["value"] >= t["target"]) for t in targets.values())
    assert set(r["not_measured"]) == {"pretokenize_beam_directrunner_mb_per_s", "reader_gcs_emulator_tokens_per_s"}
    assert all(isinstance(v, str) and v for v in r["not_measured"].values())
    assert "MB/s" in p.stdout and "M tokens/s" in p.stdout
    assert (out / "corpus.jsonl").exists()  # --out is kept; the default temporary folder is removed


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1"),
    (["--tokenizers", "wordpiece,bpe"], "error: --tokenizers 'wordpiece,bpe': choose from"),
    (["--seq-len", "4"], "error: --seq-len must be in [8, 65536]"),
    (["--source", "/nonexistent/dir/*.txt"], "error: --source: no input files match"),
    (["--window-shards", "x"], "error: argument --window-shards: invalid int value"),
])
def test_bad_arguments_fail_with_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "never"
    p = _tool(*args, "--out", str(out), timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), p.stderr
    assert p.stdout == "" and not out.exists()
