"""Multi-host training through the real CLI: 2 processes x 2 CPU devices joined by jax.distributed on
127.0.0.1 (gloo collectives) against 1 process x 4 devices; the flag and cluster logic of bert_jax.distributed."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bert_jax import builder, checkpointing, distributed, input_pipeline, train_state
from data_pipeline import manifest as manifest_lib
from data_pipeline.manifest import Manifest, Shard, SpecialIds, Split
from configs import bert as bert_configs
from data_pipeline import dataset as data_lib, pretokenize, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, MESH = 5, 8, {"data": 2, "fsdp": 2, "tensor": 1}
OVERRIDES = {"data.seq_len": 64, "train.steps": STEPS, "train.batch_size": BATCH, "train.log_every": 1,
             "train.eval_every": STEPS, "train.eval_batches": 3, "optim.warmup_steps": 1,
             "optim.learning_rate": 1e-3, "checkpoint.every": 0, "mesh.data": MESH["data"],
             "mesh.fsdp": MESH["fsdp"], "mesh.tensor": MESH["tensor"]}


def test_resolve_flags_and_cluster_detection():
    single = {}
    assert distributed.resolve("auto", None, None, None, single) is None
    assert distributed.resolve("off", None, None, None, {"SLURM_NTASKS": "4"}) is None
    explicit = distributed.resolve("auto", "10.0.0.1:1234", 2, 1, single)
    assert explicit == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert distributed.detected_cluster(slurm) == "slurm"
    assert distributed.resolve("auto", None, None, None, slurm) == {}  # JAX reads SLURM's variables itself
    assert distributed.detected_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
    assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # single-host TPU VM
    assert distributed.resolve("on", None, None, None, single) == {}
    for args, message in ((("auto", "host", 2, 0), "not HOST:PORT"), (("auto", "h:1", 2, 2), r"\[0, --num"),
                          (("auto", "h:1", 0, 0), "num_processes=0"), (("off", "h:1", None, None), "contradicts")):
        with pytest.raises(distributed.DistributedError, match=message):
            distributed.resolve(*args, environ=single)


def test_eval_batch_count_is_the_same_on_every_host():
    shards = tuple(Shard(f"validation-{i}", rows) for i, rows in enumerate((50, 20, 35)))
    manifest = Manifest(seq_len=8, vocab_size=100, dtype="uint16", special_ids=SpecialIds(0, 1, 2, 3, 4),
                        splits={"validation": Split(rows=105, shards=shards)})
    # Host 0 reads shards 0 and 2 (85 rows), host 1 shard 1 (20 rows): 5 batches of 4 at most on every host.
    assert input_pipeline.eval_batch_count(manifest, "validation", 4, 2, 100) == 5
    assert input_pipeline.eval_batch_count(manifest, "validation", 4, 2, 3) == 3
    assert input_pipeline.eval_batch_count(manifest, "validation", 4, 1, 100) == 26
    assert input_pipeline.eval_batch_count(manifest, "validation", 30, 2, 100) == 0


@pytest.fixture(scope="module")
def two_shard_data(docstring_shards, tmp_path_factory):
    """Two shards per split (one per process), reusing the session corpus's WordPiece vocabulary."""
    manifest = manifest_lib.load(docstring_shards)
    corpus = tmp_path_factory.mktemp("mh_corpus") / "docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in sources.docstring_documents(include_site_packages=False, max_documents=800):
            f.write(json.dumps({"text": d}) + "\n")
    out = str(tmp_path_factory.mktemp("mh_data") / "shards")
    vocab = os.path.join(docstring_shards, manifest.tokenizer.dir)
    pretokenize.pretokenize(str(corpus), out, vocab=vocab, seq_len=64, validation_fraction=0.2, num_shards=2)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, data_dir, num_processes, timeout=600, log_dir=None, env_extra=None, overrides=None):
    """Starts the CLI once per process on 127.0.0.1; returns each process's (returncode, output). Every process
    is killed by its pid if any fails or the time runs out, so none is left waiting in a collective. (~30 s
    on a quiet 2-core machine; the generous limit is for a loaded one.) `log_dir` (default: the workdir),
    `env_extra` and `overrides` (of OVERRIDES) serve a workdir on object storage (tests/test_gcs.py)."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           **(env_extra or {})}
    args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **(overrides or {})}.items()]
    procs, logs = [], []
    try:
        for i in range(num_processes):
            # pylint: disable-next=consider-using-with
            log = open(os.path.join(log_dir or workdir, f"process{i}.log"), "w+", encoding="utf-8")
            logs.append(log)
            procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, "-m", "bert_jax.training", "--config", "configs/bert.py:tiny",
                 "--workdir", workdir, f"--config.data.dir={data_dir}", *args,
                 f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                 f"--process_id={i}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for p, log in zip(procs, logs):
        log.seek(0)
        out.append((p.returncode, log.read() + ("\n[killed: time limit]" if p.returncode == -9 else "")))
        log.close()
    return out


def _reference_run(data_dir):
    """The same 5 steps in this process on 4 of its devices, fed the rows the 2-process run sees.

    The 2-process run's global batch is process 0's host batch (rows 0..3, read from shards[0::2]) followed by
    process 1's (rows 4..7, from shards[1::2]): make_array_from_process_local_data lays each host's slice on its
    own devices, and the mesh lists process 0's devices first. So the reference builds both host readers
    (process_index 0 and 1 of 2) in one process and concatenates their batches: the same global batches."""
    config = bert_configs.get_config("tiny")
    with config.unlocked():
        config.data.dir = data_dir
        for key, value in OVERRIDES.items():
            section, name = key.split(".")
            config[section][name] = value
    manifest = manifest_lib.load(data_dir)
    run = builder.build_run(config, manifest, builder.check_config(config, manifest, 4, 1),
                             devices=jax.devices()[:4])
    state = train_state.create_state(run.model_fn, run.tx, run.mesh, run.layout, config.train.seed, run.rules)
    step_fn = run.call(run.step)
    readers = [data_lib.make_dataset(data_dir, "train", BATCH // 2, shuffle=True, repeat=True, seed=config.data.seed,
                                     shuffle_buffer=config.data.shuffle_buffer, process_index=i,
                                     process_count=2, window_shards=config.data.window_shards
                                     ).as_numpy_iterator() for i in range(2)]
    losses = []
    for _ in range(STEPS):
        host_batches = [next(r) for r in readers]
        batch = {k: np.concatenate([b[k] for b in host_batches]) for k in host_batches[0]}
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_match_one_process_and_their_checkpoint_restores_on_one_device(two_shard_data, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    results = _launch(workdir, two_shard_data, 2)
    for i, (code, output) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{output[-3000:]}"
    out0, out1 = results[0][1], results[1][1]
    assert re.search(r"mesh \{'data': 2, 'fsdp': 2, 'tensor': 1\} on 4 cpu device\(s\).*, 2 process\(es\)",
                     out0), out0[-2000:]
    assert re.search(r"^step \d+: ", out0, re.M) and not re.search(r"^(step \d+: |mesh )", out1, re.M)  # process 0 logs

    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # written once (process 0), not twice
    assert any("eval/loss" in r for r in records)  # evaluation ran on both hosts with equal batch counts

    losses, params = _reference_run(two_shard_data)
    got_losses = np.array([r["train/loss"] for r in train])
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5)

    # The checkpoint (written by both processes through orbax) restores in this single process on one device.
    restored, meta = checkpointing.load_params(workdir)
    assert meta.step == STEPS
    leaves, worst = jax.tree_util.tree_flatten_with_path(params)[0], 0.0
    assert len(leaves) == len(jax.tree.leaves(restored))
    for (path, ref), got in zip(leaves, jax.tree.leaves(restored)):
        name = jax.tree_util.keystr(path)
        assert got.shape == ref.shape, name
        if name.endswith("['attention']['key']['bias']"):  # no gradient in exact arithmetic: noise only
            assert np.abs(got).max() < 1e-5, name
            continue
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel <= 1e-5, (name, rel)
        worst = max(worst, rel)
    print(f"2 processes vs 1: loss rel diff {np.max(np.abs(got_losses / losses - 1)):.2e}, "
          f"params norm-wise rel diff {worst:.2e}")


@pytest.mark.slow
def test_cli_refuses_inconsistent_distributed_flags_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bert_jax.training", "--config", "configs/bert.py:tiny", "--workdir", str(tmp_path),
         "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: --process_id=2 must be in [0, --num_processes=2)"
    assert "Traceback" not in proc.stderr
