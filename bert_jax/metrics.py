"""Metric records: averaging over log intervals, stdout lines and metrics.jsonl, written by process 0 only."""

import json
import os
import sys
import time

import jax
import numpy as np


def mean_of(records: list[dict]) -> dict:
    """Element-wise mean of a list of {name: scalar} (device arrays are fetched here, in one transfer)."""
    records = jax.device_get(records)
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def finish_sums(sums: dict) -> dict:
    """{name: (numerator, denominator)} -> {name: numerator / denominator}."""
    return {k: float(n) / max(float(d), 1.0) for k, (n, d) in sums.items()}


class MetricWriter:
    """Appends one JSON object per record to `workdir/metrics.jsonl` and prints a compact line."""

    def __init__(self, workdir: str, enabled: bool = True, stream=sys.stdout):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.stream = stream

    def write(self, step: int, values: dict, prefix: str = ""):
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        print(f"{prefix}step {step}: {shown}", file=self.stream, flush=True)

    def log(self, message: str):
        if self.enabled:
            print(message, file=self.stream, flush=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)
