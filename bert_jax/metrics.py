"""Metric records and the run's log, written by process 0 only.

Every record goes to `workdir/metrics.jsonl` (one JSON object per line), to TensorBoard event files in
`workdir/tensorboard/` (one scalar per key, so `tensorboard --logdir W` shows the same numbers) and to stdout
as one line. `RunClock` turns a log interval into throughput, MFU and an ETA; `start_lines` and
`summary_lines` are what a run prints before its first and after its last step.
"""

import datetime
import json
import sys
import time

import jax
import numpy as np

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from bert_jax import flops
from bert_jax import workdir as workdir_lib
from data_pipeline import paths

# Peak dense matmul TFLOP/s per chip in bfloat16 (vendor figures), for `train.peak_tflops_per_device=-1`.
# Matched against `jax.devices()[0].device_kind` by substring, first match wins; CPUs are not listed
# (no meaningful peak), so MFU is shown there only when the peak is given explicitly.
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("A10G", 125.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v4", 275.0),
    ("TPU v3", 123.0),
)


def mean_of(records: list[dict]) -> dict:
    """Element-wise mean of a list of {name: scalar} (device arrays are fetched here, in one transfer)."""
    records = jax.device_get(records)
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def finish_sums(sums: dict) -> dict:
    """{name: (numerator, denominator)} -> {name: numerator / denominator}."""
    return {k: float(n) / max(float(d), 1.0) for k, (n, d) in sums.items()}


def peak_flops_per_device(peak_tflops: float, device_kind: str) -> float:
    """FLOP/s of one device for MFU: `peak_tflops` > 0 as given, -1 from PEAK_TFLOPS, 0 (or unknown) -> 0."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if peak_tflops < 0:
        for name, tflops in PEAK_TFLOPS:
            if name.lower() in device_kind.lower():
                return tflops * 1e12
    return 0.0


def step_flops(model_cfg, generator_cfg, batch: int, seq_len: int, predictions: int) -> float:
    """Matmul FLOPs of one training step (bert_jax.flops); `generator_cfg`: ELECTRA's generator, else None."""
    return float(flops.train_step_flops(model_cfg, batch, seq_len, predictions, generator=generator_cfg))


class TensorBoardWriter:
    """Scalars as TensorBoard event files, through tensorboard's own writer (no TF summary ops)."""

    def __init__(self, logdir: str):
        self._writer = EventFileWriter(logdir, flush_secs=10)

    def scalars(self, step: int, values: dict, wall_time: float):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items() if isinstance(v, (int, float))])
        self._writer.add_event(event_pb2.Event(wall_time=wall_time, step=int(step), summary=summary))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class ObjectLog:
    """An append-only text file on object storage, where an object cannot be appended to: the lines are kept
    in memory (after what the object already held: a resumed run continues it) and the whole object is
    uploaded at most every `flush_secs` and on `flush()`, instead of being rewritten for every line."""

    def __init__(self, path: str, flush_secs: float = 30.0):
        self.path, self.flush_secs = path, flush_secs
        self._text = paths.read_text(path) if paths.exists(path) else ""
        self._dirty, self._last = False, time.monotonic()

    def append(self, line: str) -> None:
        self._text += line
        self._dirty = True
        if time.monotonic() - self._last >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            paths.write_text(self.path, self._text)
            self._dirty, self._last = False, time.monotonic()


class MetricWriter:
    """Appends one JSON object per record to `workdir/metrics.jsonl`, mirrors it to TensorBoard and prints
    a compact line (the training line: step, loss, accuracy, learning rate, tokens/s, MFU, data wait, ETA).
    On object storage the file is an `ObjectLog` (flushed as a whole object every 30 s and at `close`)."""

    def __init__(self, workdir: str, enabled: bool = True, stream=None, tensorboard: bool = True):
        self.enabled = enabled
        self.path = workdir_lib.metrics(workdir)
        self.stream = stream
        self.remote = paths.is_remote(workdir)
        self._object_log = ObjectLog(self.path) if enabled and self.remote else None
        self.tb = TensorBoardWriter(workdir_lib.tensorboard(workdir)) if enabled and tensorboard else None

    def _out(self):
        return self.stream or sys.stdout  # looked up at each write, so a redirected stdout is honoured

    def write(self, step: int, values: dict, prefix: str = "", suffix: str = ""):
        if not self.enabled:
            return
        now = time.time()
        record = {"step": int(step), "time": round(now, 3), **values}
        if self._object_log is not None:
            self._object_log.append(json.dumps(record) + "\n")
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.scalars(step, values, now)
            if not self.remote:  # object storage: the writer's own timer (every 10 s) re-uploads the file
                self.tb.flush()  # a record every log interval: cheap, and dashboards stay current
        shown = format_line(values)
        print(f"{prefix}step {step}: {shown}{suffix}", file=self._out(), flush=True)

    def log(self, message: str):
        if self.enabled:
            print(message, file=self._out(), flush=True)

    def flush(self):
        """Metrics on object storage are uploaded now (before a pause that may end the process)."""
        if self._object_log is not None:
            self._object_log.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        if self._object_log is not None:
            self._object_log.flush()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def format_line(values: dict) -> str:
    """`loss 5.12 | mlm_accuracy 0.123 | lr 1.00e-03 | 12,345 tok/s | MFU 12.3% | data wait 1.0%`; keys
    without a short form are shown as `name=value`."""
    parts = []
    for k, v in sorted(values.items(), key=lambda kv: _rank(kv[0])):
        name = k.split("/", 1)[1] if k.startswith(("train/", "eval/")) else k
        if k == "learning_rate":
            parts.append(f"lr {v:.2e}")
        elif k == "tokens_per_sec":
            parts.append(f"{v:,.0f} tok/s")
        elif k == "mfu":
            parts.append(f"MFU {100 * v:.1f}%")
        elif k == "data_wait_fraction":
            parts.append(f"data wait {100 * v:.1f}%")
        else:
            parts.append(f"{name} {_fmt(v)}")
    return " | ".join(parts)


# Order of a line: what people scan for first, then the rest as recorded.
_FIRST = ("loss", "accuracy", "learning_rate", "tokens_per_sec", "mfu", "data_wait_fraction")


def _rank(key: str) -> int:
    name = key.split("/", 1)[-1]
    if name == "loss":
        return 0
    if name.endswith("accuracy"):
        return 1
    return _FIRST.index(name) if name in _FIRST else len(_FIRST)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class RunClock:
    """Throughput, MFU and ETA from log intervals. The ETA uses the wall time since the end of the first
    interval (which holds compilation), so evaluation and checkpoint pauses are part of the estimate."""

    def __init__(self, start_step: int, total_steps: int, tokens_per_step: int, flops_per_step: float,
                 peak_flops_total: float):
        self.start_step, self.total_steps = start_step, total_steps
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.peak = peak_flops_total
        self.t_start = time.perf_counter()
        self._anchor = None  # (time, step) at the end of the first interval
        self._last_rate = 0.0  # seconds per step of the latest interval

    def interval(self, step: int, steps: int, elapsed: float, data_wait: float) -> dict:
        """Metrics of an interval of `steps` steps that took `elapsed` s, `data_wait` s of it waiting for data."""
        out = {"tokens_per_sec": steps * self.tokens_per_step / elapsed, "data_wait_fraction": data_wait / elapsed}
        if self.peak > 0 and self.flops_per_step > 0:
            out["mfu"] = steps * self.flops_per_step / elapsed / self.peak
        self._last_rate = elapsed / steps
        if self._anchor is None:
            self._anchor = (time.perf_counter(), step)
        return out

    def eta_seconds(self, step: int) -> float:
        now = time.perf_counter()
        anchor_t, anchor_step = self._anchor or (now, step)
        per_step = (now - anchor_t) / (step - anchor_step) if step > anchor_step else self._last_rate
        return per_step * (self.total_steps - step)

    def eta_text(self, step: int) -> str:
        return f" | ETA {format_duration(self.eta_seconds(step))}" if step < self.total_steps else ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


def start_lines(config_text: str, mesh, n_params: int, bytes_per_device: int, flops_per_step: float,
                peak_flops_device: float) -> list[str]:
    """What a run prints before its first step: the resolved config, the mesh, sizes and the MFU basis."""
    devices = jax.devices()
    lines = ["resolved config:", *("  " + line for line in config_text.rstrip().splitlines()),
             f"mesh {dict(mesh.shape)} on {len(devices)} {devices[0].platform} device(s) "
             f"({devices[0].device_kind}), {jax.process_count()} process(es)",
             f"{n_params:,} parameters, {bytes_per_device / 2**20:.1f} MiB of parameters per device; "
             f"{flops_per_step / 1e9:,.1f} GFLOP per training step"]
    if peak_flops_device > 0:
        lines.append(f"MFU against {peak_flops_device / 1e12:g} TFLOP/s per device "
                     f"(train.peak_tflops_per_device)")
    else:
        lines.append("MFU not shown: set train.peak_tflops_per_device to the device's peak TFLOP/s")
    return lines


def summary_lines(workdir: str, objective: str, steps_run: int, final_step: int, tokens_per_step: int,
                  seconds: float, last: dict, checkpoint_dir: str) -> list[str]:
    """What a run prints after its last step: tokens, time, final eval, checkpoint and the export command."""
    evals = " | ".join(f"{k[5:]} {_fmt(v)}" for k, v in last.items() if k.startswith("eval/"))
    model = " --model discriminator" if objective == "electra" else ""
    return [f"done: step {final_step}, {steps_run * tokens_per_step:,} tokens in this run "
            f"({final_step * tokens_per_step:,} in all) in {format_duration(seconds)}",
            f"final eval: {evals}" if evals else "final eval: none in this run",
            f"checkpoint: {paths.join(checkpoint_dir, str(final_step))}",
            f"metrics: {workdir_lib.metrics(workdir)}; tensorboard --logdir {workdir}",
            f"to Hugging Face: python -m tools.convert_to_hf --workdir {workdir} --out {_hf_out(workdir)}{model}"]


def _hf_out(workdir: str) -> str:
    """Where the printed export command writes: beside a local workdir, in the current folder for an
    object-store one (the export's folder is local: transformers reads local folders)."""
    return f"{paths.basename(workdir)}_hf" if paths.is_remote(workdir) else f"{workdir}/hf"
