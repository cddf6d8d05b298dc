"""Object storage (gs://) end to end, on a GCS emulator on 127.0.0.1 (tools/gcs_emulator.py): the file layer's
publish-when-complete writes, the workdir lock object, and the real CLIs on gs:// paths (pretokenize into a
bucket, validate it, train from it into a bucket workdir, SIGTERM and resume with bitwise the losses of an
uninterrupted run, a second run refused by the lock, export from the bucket workdir; a checkpoint whose upload
the proxy refuses half way stops the run with one line and leaves the previous checkpoint to resume from). The
CLIs run under strace: every connection any of them opened went to 127.0.0.1, and the proxy dialled nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bert_jax import checkpointing, fault
from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from tests.gcs_emulator import HOSTS_SERVED, connect_targets, gcs, traced  # noqa: F401  (gcs: the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def _env(emulator, cache_dir):
    """The emulator's variables, one CPU device and a shared compilation cache (restarts skip the compile)."""
    return {**os.environ, **emulator.env(), "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
            "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _train_command(data_dir, workdir):
    flags = {"data.dir": data_dir, "data.seq_len": 64, "data.shuffle_buffer": 200, "model.num_layers": 1,
             "model.hidden_size": 32, "model.num_heads": 2, "model.intermediate_size": 64, "train.batch_size": 8,
             "train.log_every": 1, "train.eval_every": 0, "optim.warmup_steps": 2, "checkpoint.every": 0,
             "checkpoint.max_to_keep": 2, "train.steps": STEPS}
    return ([sys.executable, "-m", "bert_jax.training", "--config", "configs/bert.py:tiny", "--workdir", workdir]
            + [f"--config.{k}={v}" for k, v in flags.items()])


def _run(cmd, env, trace_log=None, timeout=300) -> subprocess.CompletedProcess:
    """A CLI to its end (under strace when `trace_log`), stdout and stderr together."""
    return subprocess.run(traced(cmd, trace_log) if trace_log else cmd, cwd=ROOT, env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)


def _losses(metrics_file) -> dict:
    records = [json.loads(line) for line in paths.read_text(metrics_file).splitlines() if line.strip()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _assert_loopback_only(emulator, trace_logs) -> None:
    """Every connect() of the traced CLIs went to 127.0.0.1; the proxy was only asked for the Google API
    hosts it serves itself (it never dials out) and refused nothing."""
    targets = set().union(*(connect_targets(log) for log in trace_logs))
    assert targets and targets <= {"127.0.0.1"}, targets
    log = emulator.proxy_log()
    assert log and all(line.startswith("FORWARD ") or line.split()[:1] == ["CONNECT"] for line in log), log[:20]
    assert {line.split()[1].rsplit(":", 1)[0] for line in log if line.startswith("CONNECT")} <= set(HOSTS_SERVED)


# ---------------------------------------------------------------------------------------------- the file layer

def test_gs_writes_appear_whole_or_not_at_all(gcs):
    root = f"{gcs.bucket}/layer"
    paths.write_text(f"{root}/a.json", '{"x": 1}')
    with pytest.raises(RuntimeError):
        with paths.atomic_write(f"{root}/half.tfrecord") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("the writer died half way")
    assert not paths.exists(f"{root}/half.tfrecord")  # nothing uploaded, not even a temporary
    paths.replace(f"{root}/a.json", f"{root}/b.json")
    assert paths.listdir(root) == ["b.json"] and paths.read_text(f"{root}/b.json") == '{"x": 1}'
    assert paths.getsize(f"{root}/b.json") == 8 and paths.isfile(f"{root}/b.json") and paths.isdir(root)
    local = paths.local_copy(root)
    assert os.listdir(local) == ["b.json"]
    assert sorted(o for o in gcs.objects("bert-jax-test") if o.startswith("layer/") and not o.endswith("/")) \
        == ["layer/b.json"]


def test_lock_object_refuses_a_second_run_and_a_stale_one_is_broken_only_on_request(gcs):
    workdir = f"{gcs.bucket}/locked"

    def lock_info():  # read from the emulator itself: the lock's client and tf.io.gfile cache differently
        raw = gcs.read("bert-jax-test", "locked/lock-0")
        return None if raw is None else json.loads(raw)

    with fault.WorkdirLock(workdir, 0) as held:
        assert isinstance(held, fault.ObjectLock)
        info = lock_info()
        assert info["pid"] == os.getpid() and time.time() - info["heartbeat"] < 60
        with pytest.raises(fault.FaultError, match=r"is in use by a running training process .*heartbeat \d+ s ago"):
            fault.WorkdirLock(workdir, 0).acquire()
        fault.WorkdirLock(workdir, 1).acquire().release()  # another process index: its own lock
    assert lock_info() is None  # released: deleted
    # A run that died without releasing: its heartbeat stops. Refused with the age and the override ...
    paths.write_text(f"{workdir}/lock-0", json.dumps({"host": "gone", "pid": 1, "heartbeat": time.time() - 900}))
    with pytest.raises(fault.FaultError, match=r"host gone, pid 1, heartbeat 9\d\d s ago.*probably gone.*--break_lock"):
        fault.WorkdirLock(workdir, 0).acquire()
    # ... which takes it over.
    lock = fault.WorkdirLock(workdir, 0, break_lock=True).acquire()
    assert lock_info()["pid"] == os.getpid()
    lock.release()
    assert lock_info() is None


def test_a_truncated_shard_object_is_named_before_any_batch(gcs, tmp_path):
    """An object cut short (an upload that did not come from our writer) is refused by the reader before it
    yields anything, and by validate, both naming the object."""
    from data_pipeline import dataset, validate  # pylint: disable=import-outside-toplevel
    from data_pipeline.errors import DataError  # pylint: disable=import-outside-toplevel
    from data_pipeline.manifest import Manifest, SpecialIds, Split  # pylint: disable=import-outside-toplevel
    from tests.helpers import write_shards  # pylint: disable=import-outside-toplevel
    rows = np.random.default_rng(0).integers(5, 100, size=(64, 16))
    shards = write_shards(rows, "train", str(tmp_path), 2, "uint16", 0)
    manifest_lib.write(str(tmp_path), Manifest(seq_len=16, vocab_size=100, dtype="uint16",
                                               special_ids=SpecialIds(0, 1, 2, 3, 4),
                                               splits={"train": Split(rows=64, shards=tuple(shards))}))
    data = f"{gcs.bucket}/truncated"
    paths.copy_tree(str(tmp_path), data)
    assert [b["input_ids"].shape for b in dataset.make_dataset(data, "train", 32, repeat=False).as_numpy_iterator()] \
        == [(32, 16), (32, 16)]
    bad = f"{data}/{shards[1].file}"
    with paths.atomic_write(bad) as f:
        f.write(paths.read_bytes(os.path.join(str(tmp_path), shards[1].file))[:-7])
    with pytest.raises(DataError, match=f"shard {bad} has .* bytes, expected 32 records"):
        dataset.make_dataset(data, "train", 32)
    assert any(p.startswith(f"{bad}: ") for p in validate.check(data))


# ---------------------------------------------------------------------------------------------- the CLIs

@pytest.fixture(name="bucket_data", scope="module")
def _bucket_data(gcs, tmp_path_factory):
    """pretokenize (the CLI, traced) from a JSONL file in the bucket into the bucket: 64-token rows, 300 per
    shard."""
    from data_pipeline import sources  # pylint: disable=import-outside-toplevel
    base = tmp_path_factory.mktemp("gcs_cli")
    corpus = f"{gcs.bucket}/corpus/docs.jsonl"
    paths.write_text(corpus, "".join(json.dumps({"text": d}) + "\n" for d in
                                     sources.docstring_documents(include_site_packages=False, max_documents=1500)))
    data = f"{gcs.bucket}/data"
    log = str(base / "pretokenize.strace")
    out = _run([sys.executable, "-m", "data_pipeline.pretokenize", "--source", corpus, "--out", data,
                "--vocab-size", "500", "--seq-len", "64", "--shard-rows", "300", "--validation-fraction", "0.05",
                "--workers", "1"], _env(gcs, base / "jax_cache"), log)
    assert out.returncode == 0, out.stdout[-3000:]
    return {"dir": data, "base": base, "traces": [log]}


@pytest.mark.slow
def test_pretokenize_into_a_bucket_publishes_the_manifest_last_and_validates(gcs, bucket_data):
    names = [o for o in gcs.objects("bert-jax-test") if o.startswith("data/") and not o.endswith("/")]
    manifest = manifest_lib.load(bucket_data["dir"])
    shards = sorted(f"data/{s.file}" for split in manifest.splits.values() for s in split.shards)
    assert len(manifest.split("train").shards) >= 3
    assert sorted(n for n in names if n.endswith(".tfrecord")) == shards
    assert not [n for n in names if n.endswith(".tmp") or "part" in n or n.endswith("progress.json")], names
    assert {"data/manifest.json", "data/tokenizer/vocab.txt"} <= set(names)
    # Published last: the manifest's generation (the emulator's creation time, in us) is the newest object's.
    generations = {o["name"]: int(o["generation"]) for o in gcs.object_records("bert-jax-test")}
    assert generations["data/manifest.json"] == max(generations[n] for n in names)
    log = str(bucket_data["base"] / "validate.strace")
    out = _run([sys.executable, "-m", "data_pipeline.validate", bucket_data["dir"]],
               _env(gcs, bucket_data["base"] / "jax_cache"), log)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "OK", out.stdout[-2000:]
    _assert_loopback_only(gcs, bucket_data["traces"] + [log])


@pytest.mark.slow
def test_reading_the_bucket_gives_the_local_batches(bucket_data):
    """The object-store reader (windows read ahead in parallel) yields exactly the batches of a local copy of
    the same dataset, from the start and resumed mid-stream."""
    from data_pipeline import dataset  # pylint: disable=import-outside-toplevel
    local = paths.local_copy(bucket_data["dir"])
    for window_shards, skip in ((1, 0), (2, 5)):
        streams = [dataset.make_dataset(d, "train", 32, seed=3, shuffle_buffer=100, window_shards=window_shards,
                                        skip_batches=skip).as_numpy_iterator() for d in (bucket_data["dir"], local)]
        for _ in range(80):  # 2,560 rows: more than the ~2,300 of an epoch (300-row shards): windows and epochs
            remote_batch, local_batch = (next(s) for s in streams)
            np.testing.assert_array_equal(remote_batch["input_ids"], local_batch["input_ids"])


@pytest.fixture(name="reference", scope="module")
def _reference(gcs, bucket_data):
    """One uninterrupted run from the bucket's data into a local workdir: -> (workdir, {step: loss})."""
    reference = str(bucket_data["base"] / "reference")
    out = _run(_train_command(bucket_data["dir"], reference), _env(gcs, bucket_data["base"] / "jax_cache"))
    assert out.returncode == 0, out.stdout[-3000:]
    expected = _losses(os.path.join(reference, "metrics.jsonl"))
    assert sorted(expected) == list(range(1, STEPS + 1))
    return reference, expected


@pytest.mark.slow
def test_train_in_a_bucket_sigterm_resume_lock_and_export(gcs, bucket_data, reference, tmp_path):
    base, data = bucket_data["base"], bucket_data["dir"]
    env = _env(gcs, base / "jax_cache")
    reference, expected = reference
    workdir = f"{gcs.bucket}/run"
    with open(tmp_path / "first.log", "w+", encoding="utf-8") as log:
        first = subprocess.Popen(_train_command(data, workdir), cwd=ROOT, env=env, stdout=log,  # noqa: S603
                                 stderr=subprocess.STDOUT)
        _wait_for_steps(first, tmp_path / "first.log", 2)
        first.send_signal(signal.SIGSTOP)  # holds the lock object while a second run starts
        second = _run(_train_command(data, workdir), env, str(tmp_path / "second.strace"))
        errors = [line for line in second.stdout.splitlines() if line.startswith("error: ")]
        assert second.returncode == 1 and len(errors) == 1, second.stdout[-2000:]
        assert "is in use by a running training process" in errors[0] and f"{workdir}/lock-0" in errors[0]
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        assert first.wait(300) == 0
        log.seek(0)
        text = log.read()
    stopped = [int(line.split()[1].rstrip(":")) for line in text.splitlines() if line.startswith("step ")][-1]
    assert f"SIGTERM: saved a checkpoint at step {stopped}; stopping" in text and stopped < STEPS, text[-2000:]
    assert gcs.read("bert-jax-test", "run/lock-0") is None  # released at the end of the run

    resumed = _run(_train_command(data, workdir), env, str(tmp_path / "resume.strace"))
    assert resumed.returncode == 0 and f"resumed from step {stopped}" in resumed.stdout, resumed.stdout[-3000:]
    assert _losses(f"{workdir}/metrics.jsonl") == expected  # every step once, bitwise the reference's loss
    params, meta = checkpointing.load_params(workdir)
    reference_params, _ = checkpointing.load_params(reference)
    assert meta.step == STEPS
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
        np.testing.assert_array_equal(a, b)
    assert paths.exists(f"{workdir}/config.json") and paths.exists(f"{workdir}/tokenizer/vocab.txt")
    assert manifest_lib.read(f"{workdir}/data_manifest.json") == manifest_lib.load(data)

    hf = str(tmp_path / "hf")
    export = _run([sys.executable, "-m", "tools.convert_to_hf", "--workdir", workdir, "--out", hf], env,
                  str(tmp_path / "export.strace"))
    assert export.returncode == 0, export.stdout[-3000:]
    assert json.loads(export.stdout.strip().splitlines()[-1])["step"] == STEPS
    assert {"model.safetensors", "config.json", "vocab.txt"} <= set(os.listdir(hf))
    _assert_loopback_only(gcs, [str(tmp_path / f"{n}.strace") for n in ("second", "resume", "export")])


@pytest.mark.slow
def test_a_checkpoint_upload_refused_mid_save_keeps_the_previous_one_and_the_run_resumes(gcs, bucket_data,
                                                                                        reference):
    """The proxy refuses every upload of the second checkpoint's array data (after its folder and metadata
    were written) with a 403, which no client retries (a 503 is retried: tensorstore's default is 32 tries,
    1 s to 32 s apart, ~15 min, and orbax gives no way to change it). The run stops with one error line naming
    the step's objects, releases its lock, the half-written step is never listed nor restored, and a rerun
    against the healthy endpoint resumes from the first checkpoint to the end with the reference's losses."""
    data, (_, expected) = bucket_data["dir"], reference
    env = {**_env(gcs, bucket_data["base"] / "jax_cache"), **gcs.env(all_through_proxy=True)}
    workdir = f"{gcs.bucket}/faulty"
    command = _train_command(data, workdir) + ["--config.checkpoint.every=3"]  # saves at steps 3, 6, 9, 10
    gcs.inject_fault(403, "faulty/checkpoints/6/state/ocdbt.process_0/d/")
    try:
        failed = _run(command, env, timeout=300)  # a retry loop or a hang fails here, not in CI's timeout
    finally:
        gcs.inject_fault(None)
    errors = [line for line in failed.stdout.splitlines() if line.startswith("error: ")]
    assert failed.returncode == 1 and len(errors) == 1, failed.stdout[-3000:]
    assert errors[0].startswith(f"error: saving checkpoint step 6 to {workdir}/checkpoints/6 failed ") \
        and f"{workdir}/checkpoints/6/state/ocdbt.process_0/" in errors[0], errors[0]
    assert "FAULT 403 POST /upload/storage/v1/b/bert-jax-test/o name=faulty/checkpoints/6/state/ocdbt.process_0/d/" \
        in "\n".join(gcs.proxy_log())
    names = set(gcs.objects("bert-jax-test"))
    assert "faulty/checkpoints/6/_CHECKPOINT_METADATA" in names  # half written: started, never committed
    assert not {n for n in names if n.startswith("faulty/checkpoints/6/") and n.endswith("commit_success.txt")}
    assert "faulty/checkpoints/3/commit_success.txt" in names and gcs.read("bert-jax-test", "faulty/lock-0") is None
    _, meta = checkpointing.load_params(workdir)  # the newest listed step is the first one, and it restores
    assert meta.step == 3

    resumed = _run(command, env)
    assert resumed.returncode == 0 and "resumed from step 3 " in resumed.stdout, resumed.stdout[-3000:]
    records = [json.loads(line) for line in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    assert {step for step, _ in losses} == set(range(1, STEPS + 1))  # steps 4.. logged twice: redone
    assert all(loss == expected[step] for step, loss in losses), losses  # bitwise, the first run's and the rerun's
    assert checkpointing.load_params(workdir)[1].step == STEPS


def _wait_for_steps(proc, log_path, n, timeout=300.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            if sum(line.startswith("step ") for line in f) >= n:
                return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {n}:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"no step {n} in {timeout} s")


@pytest.mark.slow
def test_two_processes_train_into_a_bucket_workdir(gcs, bucket_data, tmp_path):
    """tests/test_multihost.py's 2-process run (2 x 2 CPU devices, jax.distributed on 127.0.0.1) with its data
    and workdir in the bucket: the same losses as one process fed the same rows, metrics written once,
    orbax's multi-process checkpoint restorable on one device, both lock objects released."""
    from tests import test_multihost  # pylint: disable=import-outside-toplevel  (its launcher and reference)
    workdir = f"{gcs.bucket}/multihost"
    results = test_multihost._launch(workdir, bucket_data["dir"], 2, log_dir=str(tmp_path),  # noqa: SLF001
                                     env_extra=gcs.env(), overrides={"train.eval_every": 0})
    for i, (code, output) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{output[-3000:]}"
    records = [json.loads(line) for line in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    steps = test_multihost.STEPS
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, steps + 1))  # process 0 only
    losses, _ = test_multihost._reference_run(bucket_data["dir"])  # noqa: SLF001
    np.testing.assert_allclose([r["train/loss"] for r in records if "train/loss" in r], losses, rtol=1e-5)
    assert checkpointing.load_params(workdir)[1].step == steps
    assert gcs.read("bert-jax-test", "multihost/lock-0") is None and gcs.read("bert-jax-test", "multihost/lock-1") is None
