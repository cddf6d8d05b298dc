"""End to end through the real interfaces: text -> pretokenize -> train (loss falls, eval, checkpoints) ->
run again (resumes, continues the step count, same losses as an uninterrupted run); config errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bert_jax import checkpointing, trainer
from bert_jax.errors import ConfigError
from configs import bert as bert_configs
from data_pipeline.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(name="data_dir")
def _data_dir(docstring_shards):
    return docstring_shards


def _config(data_dir, **overrides):
    c = bert_configs.get_config("tiny")
    with c.unlocked():
        c.data.dir = data_dir
        c.data.seq_len = 64
        c.data.shuffle_buffer = 1000
        c.model.num_layers = 1
        c.model.hidden_size = 64
        c.model.intermediate_size = 128
        c.train.batch_size = 16
        c.train.log_every = 1
        c.train.eval_every = 10
        c.train.eval_batches = 2
        c.optim.warmup_steps = 5
        c.checkpoint.every = 10
        for key, value in overrides.items():
            section, name = key.split("__")
            c[section][name] = value
    return c


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in _records(workdir) if "train/loss" in r}


@pytest.mark.slow
def test_train_loss_falls_then_resume_equals_uninterrupted(data_dir, tmp_path):
    # Uninterrupted: 30 steps.
    full = str(tmp_path / "full")
    trainer.train_and_evaluate(_config(data_dir, train__steps=30), full)
    records = _records(full)
    losses = _train_losses(full)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    for key in ("train/mlm_accuracy", "learning_rate", "tokens_per_sec"):
        assert all(key in r for r in records if "train/loss" in r)
    assert sorted(int(s) for s in os.listdir(os.path.join(full, "checkpoints")) if s.isdigit()) == [10, 20, 30]

    # Interrupted after step 10: a copy of the run keeps only its first checkpoint; the same command
    # resumes there, continues the step count, and reproduces steps 11..30 (masks and dropout come from
    # fold_in(rng, step), the data from the saved position).
    part = str(tmp_path / "part")
    shutil.copytree(full, part)
    for step in ("20", "30"):
        shutil.rmtree(os.path.join(part, "checkpoints", step))
    os.remove(os.path.join(part, "metrics.jsonl"))
    trainer.train_and_evaluate(_config(data_dir, train__steps=30), part)
    resumed = _train_losses(part)
    assert sorted(resumed) == list(range(11, 31))
    np.testing.assert_array_equal([resumed[s] for s in range(11, 31)], [losses[s] for s in range(11, 31)])
    p_full, meta = checkpointing.load_params(full)
    p_part, _ = checkpointing.load_params(part)
    assert meta.step == 30 and meta.data["batches_consumed"] == 30
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_part)):
        np.testing.assert_array_equal(a, b)
    # Running it again at the end is a no-op.
    trainer.train_and_evaluate(_config(data_dir, train__steps=30), part)
    assert len(_train_losses(part)) == 20


@pytest.mark.parametrize("overrides, message", [
    ({"model__max_position_embeddings": 32}, "data.seq_len=64 exceeds model.max_position_embeddings=32"),
    ({"model__vocab_size": 999}, "model.vocab_size=999 differs from vocab_size=1000"),
    ({"data__seq_len": 128}, "data.seq_len=128 differs from seq_len=64"),
    ({"train__batch_size": 12}, "train.batch_size=12 must be divisible"),
    ({"optim__schedule": "triangle"}, "optim.schedule='triangle'"),
    ({"model__num_heads": 3}, "model.hidden_size=64 is not divisible by model.num_heads=3"),
])
def test_config_errors_before_any_work(data_dir, tmp_path, overrides, message):
    workdir = str(tmp_path / "w")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        trainer.train_and_evaluate(_config(data_dir, **overrides), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("make_dir", ["missing", "empty"])
def test_missing_or_empty_data_dir(tmp_path, make_dir):
    path = tmp_path / "data"
    if make_dir == "empty":
        path.mkdir()
    with pytest.raises(DataError, match=str(path)):
        trainer.train_and_evaluate(_config(str(path)), str(tmp_path / "w"))


def _cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "bert_jax.training", "--config", "configs/bert.py:tiny", *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=5"], "unknown config key 'stepz' in --config.train.stepz=5 (did you mean \"steps\"?)"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.data.dir=/nonexistent/shards"], "/nonexistent/shards"),
    (["--config", "configs/bert.py:base,tpu"], "--config=configs/bert.py:base,tpu: unknown preset 'tpu'"),
    (["--config", "configs/electra.py:huge"], "--config=configs/electra.py:huge: unknown ELECTRA size 'huge'"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    out = _cli("--workdir", str(tmp_path / "w"), *args)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


@pytest.mark.slow
def test_cli_print_config():
    out = _cli("--print_config", "--config.train.steps=7")
    assert out.returncode == 0, out.stderr
    assert "steps: 7" in out.stdout and "mask_rate: 0.15" in out.stdout


@pytest.mark.slow
def test_the_training_log_is_quiet_unless_asked(docstring_shards, tmp_path):
    """No INFO lines of absl, orbax, jax or TensorFlow in the training command's output (its own lines, warnings
    and errors only); `--verbosity=0` brings absl's INFO back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}  # as a user runs it
    env["XLA_FLAGS"] = ""
    args = [sys.executable, "-m", "bert_jax.training", "--config", "configs/bert.py:tiny",
            f"--config.data.dir={docstring_shards}", "--config.data.seq_len=64", "--config.train.steps=2",
            "--config.train.batch_size=8", "--config.train.eval_every=0", "--config.optim.warmup_steps=1"]
    info = re.compile(r"^I\d{4} ", re.M)
    quiet = subprocess.run(args + [f"--workdir={tmp_path / 'a'}"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    text = quiet.stdout + quiet.stderr
    assert "done: step 2" in text and not info.search(text) and "oneDNN" not in text, text[-3000:]
    loud = subprocess.run(args + [f"--workdir={tmp_path / 'b'}", "--verbosity=0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert loud.returncode == 0 and info.search(loud.stdout + loud.stderr), loud.stderr[-2000:]
