"""Observability and discoverability: the training log, TensorBoard event files (read back with TensorBoard's
own reader), the profiler trace, plots of runs, --help of every CLI, --print_config, console scripts and
config comments. One short training run serves the log, TensorBoard, profile and plot checks."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bert_jax import metrics, profiling, trainer, workdir as workdir_lib
from bert_jax.errors import ConfigError
from bert_jax.models import EncoderConfig
from configs import bert as bert_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = ("bert_jax.training", "data_pipeline.pretokenize", "data_pipeline.validate", "tools.convert_to_hf",
        "tools.import_from_hf", "tools.demo", "tools.plot_metrics")


def _config(data_dir, **train):
    c = bert_configs.get_config("tiny")
    with c.unlocked():
        c.data.dir = data_dir
        c.data.seq_len = 64
        c.data.shuffle_buffer = 100
        c.model.num_layers = 1
        c.model.hidden_size = 32
        c.model.num_heads = 2
        c.model.intermediate_size = 64
        c.train.batch_size = 16
        c.train.steps = 6
        c.train.log_every = 2
        c.train.eval_every = 3
        c.train.eval_batches = 1
        c.optim.warmup_steps = 2
        c.checkpoint.every = 0
        for key, value in train.items():
            c.train[key] = value
    return c


@pytest.fixture(scope="module", name="run")
def _run(docstring_shards, tmp_path_factory):
    """One 6-step run with MFU (against a made-up peak), evaluation and a profile of steps 3..4; -> (workdir,
    its stdout)."""
    import contextlib
    import io
    workdir = str(tmp_path_factory.mktemp("obs") / "run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.train_and_evaluate(_config(docstring_shards, peak_tflops_per_device=0.001, profile_steps="3,4"),
                                    workdir)
    return workdir, out.getvalue()


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_log_lines_start_intervals_and_summary(run):
    workdir, text = run
    assert "resolved config:" in text and "peak_tflops_per_device: 0.001" in text
    assert re.search(r"mesh \{'data': 8, 'fsdp': 1, 'tensor': 1\} on 8 cpu device", text)
    assert re.search(r"[\d,]+ parameters, [\d.]+ MiB of parameters per device; [\d.,]+ GFLOP per training step", text)
    train_lines = [line for line in text.splitlines() if re.match(r"step \d+: loss ", line)]
    assert [int(line.split()[1][:-1]) for line in train_lines] == [2, 4, 6]
    for line in train_lines:
        for part in (r"loss [\d.]+", r"mlm_accuracy [\d.]+", r"lr [\d.]+e[-+]\d+", r"[\d,]+ tok/s",
                     r"MFU [\d.]+%", r"data wait [\d.]+%"):
            assert re.search(part, line), (part, line)
    assert all(re.search(r"ETA \d+:\d\d:\d\d$", line) for line in train_lines[:-1])
    assert "ETA" not in train_lines[-1]  # nothing left at the last step
    assert re.search(r"eval step 6: loss [\d.]+ \| mlm_accuracy [\d.]+ \| mlm_loss", text)
    last_eval = [r for r in _records(workdir) if "eval/loss" in r][-1]
    assert f"done: step 6, {6 * 16 * 64:,} tokens in this run" in text
    assert f"final eval: loss {metrics._fmt(last_eval['eval/loss'])}" in text
    assert f"checkpoint: {os.path.join(workdir, 'checkpoints', '6')}" in text
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
    assert f"python -m tools.convert_to_hf --workdir {workdir} --out {workdir}/hf" in text
    # MFU in the records is the FLOP formula over the made-up peak of 8 devices x 1 GFLOP/s.
    rec = [r for r in _records(workdir) if "mfu" in r][-1]
    assert 0 < rec["mfu"] and rec["mfu"] == pytest.approx(
        rec["tokens_per_sec"] / (16 * 64) * _step_flops(workdir) / 8e9, rel=1e-6)


def _step_flops(workdir):
    from bert_jax import flops
    with open(os.path.join(workdir, "data_manifest.json"), encoding="utf-8") as f:
        vocab_size = json.load(f)["vocab_size"]
    return flops.train_step_flops(EncoderConfig.from_section(_config("").model, vocab_size), 16, 64, 20)


@pytest.mark.slow
def test_tensorboard_events_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    workdir, _ = run
    acc = EventAccumulator(workdir_lib.tensorboard(workdir), size_guidance={"scalars": 0})
    acc.Reload()
    records = _records(workdir)
    expected = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "time"):
                expected.setdefault(k, {})[r["step"]] = v
    assert set(acc.Tags()["scalars"]) == set(expected)
    assert {"train/loss", "eval/loss", "learning_rate", "tokens_per_sec", "mfu", "data_wait_fraction"} <= set(expected)
    for tag, by_step in expected.items():
        events = acc.Scalars(tag)
        assert {e.step: e.value for e in events} == pytest.approx(by_step, rel=1e-6, abs=1e-9), tag


@pytest.mark.slow
def test_profile_trace_written(run):
    workdir, _ = run
    traces = glob.glob(os.path.join(workdir_lib.profile(workdir), "plugins", "profile", "*", "*.xplane.pb"))
    assert traces and all(os.path.getsize(t) > 1000 for t in traces)
    assert glob.glob(os.path.join(workdir_lib.profile(workdir), "plugins", "profile", "*", "*.trace.json.gz"))


@pytest.mark.slow
def test_plot_metrics_overlays_runs(run, tmp_path, capsys):
    import matplotlib.image

    from tools import plot_metrics
    workdir, _ = run
    # A second run: the same records with a shifted loss, so two distinct lines overlay.
    other = tmp_path / "other"
    other.mkdir()
    with open(other / "metrics.jsonl", "w", encoding="utf-8") as f:
        for r in _records(workdir):
            f.write(json.dumps({k: v + 1.0 if k.endswith("loss") else v for k, v in r.items()}) + "\n")
    out = tmp_path / "plots" / "runs.png"
    assert plot_metrics.main([workdir, str(other), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["runs"] == 2 and summary["lines"] >= 2 * 6  # loss x2, accuracy x2, lr, tokens/s per run
    assert out.stat().st_size > 20_000
    pixels = matplotlib.image.imread(str(out))
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 1600
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    # Lines in more than white/black/grey: the two runs' colours are there.
    rgb = pixels[..., :3].reshape(-1, 3)
    assert (np.ptp(rgb, axis=1) > 0.3).mean() > 0.001


def test_plot_metrics_missing_run_is_one_line(tmp_path):
    from tools import plot_metrics
    with pytest.raises(SystemExit) as e:
        plot_metrics.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")])
    assert str(e.value.code).startswith("error: ") and "metrics.jsonl" in str(e.value.code)
    assert not (tmp_path / "x.png").exists()


def test_profile_steps_parsing():
    assert profiling.parse_steps("") is None
    assert profiling.parse_steps("3,5") == (3, 5)
    assert profiling.parse_steps("7") == (7, 7)
    assert profiling.parse_steps((2, 4)) == (2, 4)
    for bad in ("5,2", "0,1", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="train.profile_steps"):
            profiling.parse_steps(bad)


def test_bad_profile_steps_is_a_config_error(docstring_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"train.profile_steps='9,3'"):
        trainer.train_and_evaluate(_config(docstring_shards, profile_steps="9,3"), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def test_peak_flops_and_clock():
    assert metrics.peak_flops_per_device(2.5, "cpu") == 2.5e12
    assert metrics.peak_flops_per_device(0, "NVIDIA H100 80GB HBM3") == 0
    assert metrics.peak_flops_per_device(-1, "NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_per_device(-1, "TPU v4") == 275e12
    assert metrics.peak_flops_per_device(-1, "cpu") == 0
    clock = metrics.RunClock(0, 100, tokens_per_step=1000, flops_per_step=2e9, peak_flops_total=1e10)
    out = clock.interval(10, 10, elapsed=4.0, data_wait=1.0)
    assert out == pytest.approx({"tokens_per_sec": 2500.0, "data_wait_fraction": 0.25, "mfu": 0.5})
    assert clock.eta_seconds(10) == pytest.approx(0.4 * 90)  # the interval's rate until a second interval
    assert "mfu" not in metrics.RunClock(0, 10, 1, 1.0, 0.0).interval(1, 1, 1.0, 0.0)


def test_every_cli_has_help():
    """One interpreter runs each module's `--help` as `python -m` would; each must print usage and exit 0."""
    script = ("import contextlib, io, json, runpy, sys\nres = {}\n"
              f"for mod in {CLIS!r}:\n"
              "    sys.argv = [mod, '--help']\n    buf = io.StringIO()\n"
              "    with contextlib.redirect_stdout(buf):\n"
              "        try:\n            runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
              "            code = 'returned'\n"
              "        except SystemExit as e:\n            code = e.code\n"
              "    res[mod] = [code, buf.getvalue()]\n"
              "print(json.dumps(res))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for mod in CLIS:
        code, text = results[mod]
        assert code in (0, None), (mod, code)
        # argparse prints "usage: ..."; absl (bert_jax.training) prints the module docstring and its flags.
        assert ("usage" in text.lower() or f"python -m {mod}" in text) and "--" in text, (mod, text[:300])


def test_print_config_prints_the_resolved_config():
    proc = subprocess.run([sys.executable, "-m", "bert_jax.training", "--config", "configs/bert.py:tiny",
                           "--config.train.steps=7", "--config.train.profile_steps=2,3", "--print_config"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+steps: 7$", proc.stdout, re.M)
    assert re.search(r"^\s+profile_steps: '?2,3'?$", proc.stdout, re.M)
    assert re.search(r"^\s+hidden_size: 128$", proc.stdout, re.M)  # the recipe's value, resolved


def test_console_scripts_point_at_callables():
    import importlib
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        text = f.read()
    entries = dict(re.findall(r'"(bert-jax-[\w-]+)=([\w.:]+)"', text))
    assert {"bert-jax-train", "bert-jax-pretokenize", "bert-jax-convert"} <= set(entries)
    for name, target in entries.items():
        module, func = target.split(":")
        assert module.split(".")[0] in re.search(r"find_packages\(include=\[([^\]]*)\]", text).group(1), name
        assert callable(getattr(importlib.import_module(module), func)), name


def test_every_config_key_has_a_comment():
    """Each assignment of a key in configs/common.py carries a comment on its line or the line above."""
    with open(os.path.join(ROOT, "configs", "common.py"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"\s+[cm]\.(?:\w+\.)?(\w+) = (?!ml_collections\.ConfigDict\(\))", line)
        if m and "#" not in line and not lines[i - 1].strip().startswith("#"):
            missing.append(m.group(1))
    assert not missing, f"keys without a comment in configs/common.py: {missing}"


def test_summary_names_the_export_command_per_objective():
    lines = metrics.summary_lines("runs/e", "electra", 10, 30, 100, 75.0, {"eval/loss": 1.5}, "runs/e/checkpoints")
    text = "\n".join(lines)
    assert "done: step 30, 1,000 tokens in this run (3,000 in all) in 0:01:15" in text
    assert "final eval: loss 1.5" in text and "checkpoint: runs/e/checkpoints/30" in text
    assert lines[-1].endswith("python -m tools.convert_to_hf --workdir runs/e --out runs/e/hf --model discriminator")
    mlm = metrics.summary_lines("w", "mlm", 0, 5, 1, 1.0, {}, "w/checkpoints")
    assert "final eval: none in this run" in mlm and mlm[-1].endswith("--workdir w --out w/hf")
