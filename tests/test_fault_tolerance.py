"""Fault tolerance through the real interfaces: the training CLI in subprocesses stopped by SIGTERM / SIGINT
(checkpoint at the step reached, exit 0, resume with no repeated or skipped batch) and killed by SIGKILL at
random moments, also during asynchronous saves (each restart resumes from the newest complete checkpoint and
the final parameters equal an uninterrupted run's); the workdir lock, the writability probes, the resume
check of model shapes and the NaN guard (in the jitted step and in the loop)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bert_jax import checkpointing, fault, optim, sharding, train_state, train_step, trainer
from bert_jax.errors import ConfigError
from bert_jax.models import EncoderConfig
from bert_jax.workdir import CheckpointMeta
from configs import bert as bert_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60  # of every CLI run below (the learning-rate schedule depends on it, so all runs share it)
KILLS = 20


# ---------------------------------------------------------------------------------------------- CLI runs

def _env(cache_dir):
    """One CPU device (faster than 8 fake ones) and a persistent compilation cache: restarts skip the compile."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return env


def _command(data_dir, workdir, steps=STEPS):
    flags = {"data.dir": data_dir, "data.seq_len": 64, "data.shuffle_buffer": 200, "model.num_layers": 1,
             "model.hidden_size": 32, "model.num_heads": 2, "model.intermediate_size": 64, "train.batch_size": 8,
             "train.log_every": 1, "train.eval_every": 0, "optim.warmup_steps": 2, "checkpoint.every": 1,
             "checkpoint.max_to_keep": 2, "train.steps": steps}
    return ([sys.executable, "-m", "bert_jax.training", "--config", "configs/bert.py:tiny", "--workdir", workdir]
            + [f"--config.{k}={v}" for k, v in flags.items()])


class Run:
    """One training process whose stdout+stderr go to a log file (read while it runs)."""

    def __init__(self, data_dir, workdir, cache_dir, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(_command(data_dir, workdir), cwd=ROOT, env=_env(cache_dir),  # noqa: S603
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def steps_logged(self) -> list[int]:
        return [int(line.split()[1].rstrip(":")) for line in self.text().splitlines() if line.startswith("step ")]

    def wait_for(self, predicate, timeout=300.0, poll=0.005) -> bool:
        """Polls until predicate() or the process ends; True when predicate() held."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return predicate()
            time.sleep(poll)
        raise TimeoutError(f"no progress in {timeout} s; log:\n{self.text()[-3000:]}")

    def finish(self, timeout=300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._log.close()
        return rc


def _records(workdir):
    out = []
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                pass
    return [r for r in out if "train/loss" in r]


def _steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(directory) else []


def _assert_params_equal(workdir_a, workdir_b):
    params_a, meta_a = checkpointing.load_params(workdir_a)
    params_b, meta_b = checkpointing.load_params(workdir_b)
    assert meta_a.step == meta_b.step == STEPS
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(name="cli", scope="module")
def _cli(docstring_shards, tmp_path_factory):
    """The data, a shared compilation cache, and an uninterrupted reference run of STEPS steps."""
    base = tmp_path_factory.mktemp("fault")
    cache = base / "jax_cache"
    reference = str(base / "reference")
    run = Run(docstring_shards, reference, cache, str(base / "reference.log"))
    assert run.finish() == 0, run.text()[-3000:]
    losses = {r["step"]: r["train/loss"] for r in _records(reference)}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {"data": docstring_shards, "cache": cache, "reference": reference, "losses": losses, "base": base}


# ---------------------------------------------------------------------------------------------- preemption

@pytest.mark.slow
def test_sigterm_sigint_save_and_resume_exactly(cli, tmp_path):
    workdir = str(tmp_path / "w")
    reached = []
    for i, sig in enumerate((signal.SIGTERM, signal.SIGINT)):
        run = Run(cli["data"], workdir, cli["cache"], str(tmp_path / f"run{i}.log"))
        start = reached[-1] if reached else 0
        run.wait_for(lambda: len(run.steps_logged()) >= 2)  # noqa: B023  (training, not starting up)
        if i == 0:  # a second process on the same workdir refuses to run while the first (paused) holds the lock
            run.proc.send_signal(signal.SIGSTOP)
            second = Run(cli["data"], workdir, cli["cache"], str(tmp_path / "second.log"))
            assert second.finish() == 1
            lines = [line for line in second.text().splitlines() if line.startswith("error: ")]
            assert len(lines) == 1 and "is in use by a running training process" in lines[0], second.text()[-2000:]
            run.proc.send_signal(signal.SIGCONT)
        run.proc.send_signal(sig)
        assert run.finish() == 0, run.text()[-3000:]
        logged = run.steps_logged()
        step = logged[-1]
        assert f"{sig.name}: saved a checkpoint at step {step}; stopping" in run.text()
        assert logged == list(range(start + 1, step + 1)) and step < STEPS
        assert _steps(workdir)[-1] == step
        reached.append(step)
    run = Run(cli["data"], workdir, cli["cache"], str(tmp_path / "last.log"))
    assert run.finish() == 0, run.text()[-3000:]
    assert f"resumed from step {reached[-1]}" in run.text()

    # Every step ran exactly once (no repeated, no skipped batch), with the uninterrupted run's loss.
    records = _records(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["train/loss"] for r in records] == [cli["losses"][s] for s in range(1, STEPS + 1)]
    _assert_params_equal(workdir, cli["reference"])
    meta = checkpointing.load_params(workdir)[1]
    assert meta.data["batches_consumed"] == STEPS and meta.config["train"]["steps"] == STEPS
    assert meta.vocab_hash and len(meta.manifest_sha256) == 64 and meta.fingerprint


# ---------------------------------------------------------------------------------------------- crashes

def _tmp_saves(checkpoints):
    try:
        return [n for n in os.listdir(checkpoints) if "orbax-checkpoint-tmp" in n]
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_from_newest_complete_checkpoint(cli, tmp_path):
    workdir = str(tmp_path / "w")
    checkpoints = os.path.join(workdir, "checkpoints")
    rng = random.Random(0)
    kills, killed_in_save, resumed, t0, startup = 0, 0, 0, time.monotonic(), 2.0
    while kills < KILLS:
        complete = _steps(workdir)
        run = Run(cli["data"], workdir, cli["cache"], str(tmp_path / f"run{kills}.log"))
        launched = time.monotonic()
        mode = kills % 3
        if mode == 2:  # anywhere from start-up (imports, restore, compile) to the first step
            delay = rng.uniform(0.0, startup)
            run.wait_for(lambda: time.monotonic() - launched > delay or bool(run.steps_logged()))  # noqa: B023
        else:
            run.wait_for(lambda: bool(run.steps_logged()))  # noqa: B023
            startup = time.monotonic() - launched
        if mode == 0:  # during an asynchronous save: as soon as its temporary folder shows up (once training,
            run.wait_for(lambda: bool(_tmp_saves(checkpoints)), poll=0.001)  # noqa: B023  so not an old one)
        elif mode == 1:  # anywhere in the training loop, once this run has committed a checkpoint of its own
            newest = complete[-1] if complete else 0
            run.wait_for(lambda: (_steps(workdir) or [0])[-1] > newest, poll=0.01)  # noqa: B023
            n = len(run.steps_logged()) + rng.randint(0, 2)
            run.wait_for(lambda: len(run.steps_logged()) >= n)  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.05))
        if run.proc.poll() is not None:
            assert run.finish() == 0, run.text()[-3000:]
            break  # finished before the kill (the loop is meant to kill long before the end)
        run.proc.kill()
        run.finish()
        kills += 1
        text = run.text()
        if run.steps_logged():  # it got past the restore: it restored the newest complete checkpoint
            killed_in_save += bool(_tmp_saves(checkpoints))
            if complete:
                assert f"resumed from step {complete[-1]} " in text, text[-3000:]
                resumed += 1
            assert "is corrupt" not in text, text[-3000:]
    run = Run(cli["data"], workdir, cli["cache"], str(tmp_path / "last.log"))
    assert run.finish() == 0, run.text()[-3000:]
    assert "is corrupt" not in run.text()
    elapsed = time.monotonic() - t0
    print(f"{kills} kills ({killed_in_save} during a save, {resumed} restarts resumed), final run: {elapsed:.0f} s")

    assert kills >= KILLS and killed_in_save >= 1 and resumed >= KILLS // 3
    assert not _tmp_saves(checkpoints)  # leftovers of interrupted saves are cleaned up on restart
    # Steps redone after a kill reproduce the reference losses exactly; the final parameters are equal.
    records = _records(workdir)
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    for r in records:
        assert r["train/loss"] == cli["losses"][r["step"]], r
    _assert_params_equal(workdir, cli["reference"])


# ---------------------------------------------------------------------------------------------- bad states

def _config(data_dir, **overrides):
    c = bert_configs.get_config("tiny")
    with c.unlocked():
        c.data.dir = data_dir
        c.data.seq_len = 64
        c.data.shuffle_buffer = 200
        c.model.num_layers = 1
        c.model.hidden_size = 32
        c.model.num_heads = 2
        c.model.intermediate_size = 64
        c.train.batch_size = 8
        c.train.log_every = 1
        c.train.eval_every = 0
        c.optim.warmup_steps = 0
        c.checkpoint.every = 1
        c.checkpoint.max_to_keep = 10
        c.checkpoint.async_save = False
        for key, value in overrides.items():
            section, name = key.split("__")
            c[section][name] = value
    return c


@pytest.mark.slow
def test_nan_guard_stops_run_and_keeps_good_checkpoints(docstring_shards, tmp_path):
    # A learning rate of 1e30 makes step 1's update blow the parameters up; from step 2 on the loss is not
    # finite: every such step is skipped (parameters untouched), counted, and the 3rd in a row stops the run.
    workdir = str(tmp_path / "w")
    config = _config(docstring_shards, optim__learning_rate=1e30, train__max_nan_skips=3, train__steps=10)
    with pytest.raises(fault.FaultError, match=r"non-finite loss or gradients at 3 consecutive steps \(up to step 4\)"):
        trainer.train_and_evaluate(config, workdir)
    records = _records(workdir)
    assert [r["train/skipped"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    assert [r["train/skipped_total"] for r in records] == [0, 1, 2, 3]
    assert _steps(workdir) == [1, 2, 3]  # no checkpoint of the stopping step
    params = [checkpointing.load_params(workdir, step)[0] for step in (1, 3)]
    for a, b in zip(*map(jax.tree.leaves, params)):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()

    # The same workdir, resumed with a config of another model shape: one line naming the key; nothing is
    # written or removed. A held lock on the workdir refuses the run.
    before = {s: os.path.getmtime(os.path.join(workdir, "checkpoints", str(s))) for s in _steps(workdir)}
    with pytest.raises(ConfigError, match=r"has model\.hidden_size=32, the config gives 64") as e:
        trainer.train_and_evaluate(_config(docstring_shards, model__hidden_size=64, train__steps=10), workdir)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"was trained with model\.hidden_act='gelu', the config gives "
                                                   r"'gelu_tanh'; resume with --config\.model\.hidden_act=gelu"):
        trainer.train_and_evaluate(_config(docstring_shards, model__hidden_act="gelu_tanh", train__steps=10),
                                    workdir)
    after = {s: os.path.getmtime(os.path.join(workdir, "checkpoints", str(s))) for s in _steps(workdir)}
    assert after == before
    with fault.WorkdirLock(workdir):
        with pytest.raises(fault.FaultError, match="is in use by a running training process"):
            trainer.train_and_evaluate(config, workdir)


def test_resume_refuses_another_function_of_the_same_weights():
    """Shapes match, but the activation or the LayerNorm epsilon differ: the resume is refused in one line.
    Checkpoints that predate hidden_act computed the exact GELU."""
    model = {"vocab_size": 100, "hidden_size": 32, "num_heads": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}

    def reason(saved, **changes):
        meta = CheckpointMeta.from_json({"step": 5, "vocab_hash": "v", "objective": "mlm",
                                         "model": {"vocab_size": 100, "num_heads": 2, **saved}})
        return fault.resume_mismatch(5, meta, "ckpts", model=EncoderConfig(**{**model, **changes}), objective="mlm",
                                     vocab_hash="v")

    assert reason(dict(model)) is None
    assert reason({"hidden_size": 32, "layer_norm_eps": 1e-12}) is None  # an old checkpoint, exact GELU
    msg = reason({"hidden_size": 32, "layer_norm_eps": 1e-12}, hidden_act="gelu_tanh")
    assert msg == ("the checkpoint at step 5 in ckpts was trained with model.hidden_act='gelu', the config gives "
                   "'gelu_tanh'; resume with --config.model.hidden_act=gelu, or start a new workdir from it with "
                   "init_from (nothing was overwritten)")
    assert "model.layer_norm_eps=1e-12, the config gives 1e-05" in reason(dict(model), layer_norm_eps=1e-5)
    assert reason(dict(model), hidden_dropout=0.0, dtype="bfloat16") is None  # may change on resume


def test_unwritable_or_full_workdir_is_reported_before_training(docstring_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for workdir in (str(blocker / "w"), "/proc/bert_jax_workdir"):
        with pytest.raises(fault.FaultError, match=f"workdir {workdir} is not writable"):
            trainer.train_and_evaluate(_config(docstring_shards), workdir)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(fault.FaultError, match=r"MiB free, less than the .* MiB that one checkpoint needs"):
        fault.check_workdir(str(tmp_path / "w"), need_bytes=free + 2**40)
    fault.check_workdir(str(tmp_path / "w"), need_bytes=2**20)
    assert os.listdir(tmp_path / "w") == []  # the probe is gone


def test_lock_is_exclusive_and_released(tmp_path):
    with fault.WorkdirLock(str(tmp_path)):
        with pytest.raises(fault.FaultError, match="in use"):
            fault.WorkdirLock(str(tmp_path)).acquire()
    fault.WorkdirLock(str(tmp_path)).acquire().release()
    # A process killed with SIGKILL while holding the lock leaves it free.
    code = ("import sys, time; from bert_jax import fault; fault.WorkdirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT}, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(fault.FaultError, match="in use"):
        fault.WorkdirLock(str(tmp_path)).acquire()
    proc.kill()
    proc.wait()
    fault.WorkdirLock(str(tmp_path)).acquire().release()


@pytest.mark.slow
def test_nan_guard_in_the_jitted_step():
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from bert_jax import objectives  # pylint: disable=import-outside-toplevel
    from bert_jax.masking import MaskingSpec  # pylint: disable=import-outside-toplevel
    from bert_jax.models import BertForMaskedLM, EncoderConfig  # pylint: disable=import-outside-toplevel

    cfg = EncoderConfig(vocab_size=96, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        max_position_embeddings=16)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, total_steps=10, warmup_steps=0))
    model_fn = lambda: BertForMaskedLM(cfg, nnx.Rngs(0))  # noqa: E731
    layout = train_state.state_layout(model_fn, tx, mesh)
    objective = objectives.MlmObjective(MaskingSpec(vocab_size=96, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4),
                                                    max_predictions=4))
    step_fn = train_step.make_train_step(layout, sharding.batch_sharding(mesh), tx=tx, objective=objective)
    rows = np.random.default_rng(0).integers(5, 96, size=(8, 16)).astype(np.int32)
    batch = {"input_ids": rows, "attention_mask": np.ones_like(rows), "token_type_ids": np.zeros_like(rows)}

    def run(state):
        before = jax.device_get(state)  # the input state is donated
        after, metrics = step_fn(state, batch)
        return before, jax.device_get(after), jax.device_get(metrics)

    state = train_state.create_state(model_fn, tx, mesh, layout, seed=0)
    before, after, metrics = run(state)
    assert metrics["skipped"] == 0.0 and np.isfinite(metrics["loss"])
    assert not np.array_equal(before.params["mlm_head"]["bias"], after.params["mlm_head"]["bias"])

    # One huge embedding row: the forward pass overflows, loss and gradients are not finite.
    params = jax.tree.map(np.array, after.params)  # writable copies
    params["encoder"]["embeddings"]["word"][rows[0, 0]] = 3e38
    poisoned = jax.device_put(after.replace(params=params), layout.shardings)
    before, after, metrics = run(poisoned)
    assert metrics["skipped"] == 1.0 and not np.isfinite(metrics["loss"])
    assert int(after.step) == int(before.step) + 1
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after.params,
                                                                                          after.opt_state))):
        np.testing.assert_array_equal(a, b)


_SYNC_CODE = """
import sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
from bert_jax import fault
with fault.PreemptionWatch() as watch:
    print("ready", flush=True)
    for step in range(1, 100000):
        time.sleep(0.01)  # processes run at their own pace: the sync point must still agree
        if watch.should_stop(step):
            print("stop", step, watch.signal_name, flush=True)
            break
jax.distributed.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, target", [(signal.SIGTERM, 1), (signal.SIGINT, 0)])
def test_preemption_agrees_on_the_step_across_processes(sig, target):
    # Two real jax.distributed processes on 127.0.0.1: a signal to one of them stops both at the same step.
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-c", _SYNC_CODE, str(i), address], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        procs[target].send_signal(sig)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    stops = [out.split() for out, _ in outs]
    assert stops[0][0] == "stop" and stops[0][1] == stops[1][1], stops
