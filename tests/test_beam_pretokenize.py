"""Pretokenization on Apache Beam (DirectRunner): byte-identical shards, manifest and tokenizer to the local path."""

import json
import os

import pytest

from data_pipeline import paths
from data_pipeline import pretokenize as pretokenize_cli
from data_pipeline.pretokenize import pretokenize
from data_pipeline.sources import docstring_documents
from tests.gcs_emulator import gcs  # noqa: F401  (the fixture)

ARGS = {"vocab_size": 600, "seq_len": 64, "validation_fraction": 0.1, "shard_rows": 40}


def folder_bytes(out):
    """Every file under `out` (relative name -> bytes)."""
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, out)] = open(path, "rb").read()
    return files


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A small JSONL corpus (several encode batches per split) and the local path's output for it."""
    tmp = tmp_path_factory.mktemp("beam")
    docs = docstring_documents(include_site_packages=False, max_documents=700,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp / "local"
    manifest = pretokenize(str(src), str(out), workers=1, **ARGS)
    assert len(manifest.splits["train"].shards) > 3  # several parts: the order of batches matters
    return str(src), str(out)


def test_direct_runner_writes_the_local_paths_bytes(local_run, tmp_path):
    """Tokenizer trained before the pipeline, batches encoded by 2 Beam workers in any order, packed in
    document order: every file (shards, manifest, tokenizer) equals the local path's, and no scratch is left."""
    src, local_out = local_run
    out = tmp_path / "beam"
    pretokenize(src, str(out), runner="DirectRunner",
                beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_threading"], **ARGS)
    assert folder_bytes(str(out)) == folder_bytes(local_out)


def test_cli_runner_with_a_given_vocab(local_run, tmp_path, capsys):
    """The CLI: --runner plus Beam's own options; a given vocabulary; same shards as the local path."""
    src, local_out = local_run
    out = tmp_path / "cli"
    rc = pretokenize_cli.main(["--source", src, "--out", str(out), "--vocab", os.path.join(local_out, "tokenizer"),
                               "--seq-len", "64", "--validation-fraction", "0.1", "--shard-rows", "40",
                               "--runner", "DirectRunner", "--direct_num_workers=1"])
    assert rc == 0
    assert "train:" in capsys.readouterr().out
    beam_files = folder_bytes(str(out))
    local_files = folder_bytes(local_out)
    shards = sorted(n for n in local_files if n.endswith(".tfrecord"))
    assert shards == sorted(n for n in beam_files if n.endswith(".tfrecord"))
    assert all(beam_files[n] == local_files[n] for n in shards)
    beam_manifest = json.loads(beam_files["manifest.json"])
    local_manifest = json.loads(local_files["manifest.json"])
    assert beam_manifest["splits"] == local_manifest["splits"]


def test_beam_options_without_runner_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretokenize_cli.main(["--source", "x.jsonl", "--out", str(tmp_path / "o"), "--direct_num_workers=2"])
    assert "unrecognized arguments: --direct_num_workers=2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_runner_is_refused_before_any_work(local_run, tmp_path, capsys):
    src, _ = local_run
    rc = pretokenize_cli.main(["--source", src, "--out", str(tmp_path / "o"), "--runner", "LocalRunner"])
    assert rc == 1
    assert "error: runner must be one of DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, got 'LocalRunner'" \
        in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dataflow_into_a_local_folder_is_refused_before_any_work(local_run, tmp_path, capsys):
    src, _ = local_run
    out = tmp_path / "o"
    rc = pretokenize_cli.main(["--source", src, "--out", str(out), "--runner", "DataflowRunner", "--project=p"])
    assert rc == 1
    assert capsys.readouterr().err.strip() == (f"error: --out {out}: DataflowRunner's workers cannot write a local "
                                               "folder; give a gs:// URL")
    assert not out.exists()


@pytest.mark.slow
def test_direct_runner_from_and_into_a_bucket(gcs, local_run):  # noqa: F811
    """Corpus and output on the GCS emulator (127.0.0.1): the workers read the tokenizer from the bucket and
    publish parts there; every object equals the local path's file of the same name (the manifest but for the
    source it names), no scratch is left."""
    src, local_out = local_run
    corpus, out = f"{gcs.bucket}/beam/docs.jsonl", f"{gcs.bucket}/beam/out"
    paths.write_text(corpus, open(src, encoding="utf-8").read())
    pretokenize(corpus, out, runner="DirectRunner", beam_args=["--direct_num_workers=2",
                                                               "--direct_running_mode=multi_threading"], **ARGS)
    objects = {o[len("beam/out/"):] for o in gcs.objects("bert-jax-test")
               if o.startswith("beam/out/") and not o.endswith("/")}
    local_files = folder_bytes(local_out)
    assert objects == set(local_files)
    differ = [n for n, data in local_files.items() if paths.read_bytes(f"{out}/{n}") != data]
    assert differ == ["manifest.json"]  # which names the source: a gs:// URL here
    beam_manifest = json.loads(paths.read_text(f"{out}/manifest.json"))
    local_manifest = json.loads(local_files["manifest.json"])
    for m in (beam_manifest, local_manifest):
        del m["source"], m["args"]["source"]
    assert beam_manifest == local_manifest
