"""Plot training runs from their metrics.jsonl: loss, accuracy, learning rate and throughput, each against
the step (top row) and against wall time (bottom row), one line per run (and per train/eval series).

    python -m tools.plot_metrics W [W2 ...] --out runs.png [--labels a,b]

Each W is a training workdir (or a metrics.jsonl file). The last line of stdout is one JSON object.
"""

import argparse
import json
import os
import sys

from bert_jax import workdir as workdir_lib
from data_pipeline import paths

# name of a panel -> the metric keys it draws (the first accuracy key a run has is used).
PANELS = (
    ("loss", ("train/loss", "eval/loss")),
    ("accuracy", ("train/mlm_accuracy", "eval/mlm_accuracy", "train/disc_accuracy", "eval/disc_accuracy")),
    ("learning rate", ("learning_rate",)),
    ("tokens/s", ("tokens_per_sec",)),
)


class PlotError(ValueError):
    """A run that cannot be plotted; main prints the one line as `error: <message>`."""


def read_run(path: str) -> list[dict]:
    """The records of a workdir's metrics.jsonl (or of the file itself)."""
    file = path if path.endswith(".jsonl") else workdir_lib.metrics(path)
    if not paths.isfile(file):
        raise PlotError(f"{file} does not exist: pass a training workdir (it writes {workdir_lib.METRICS})")
    records = []
    with paths.open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise PlotError(f"{file}:{n} is not a JSON object") from None
    if not records:
        raise PlotError(f"{file} holds no records yet")
    return records


def series(records: list[dict], key: str) -> tuple[list, list, list]:
    """(steps, hours since the run's first record, values) of one key."""
    t0 = min(r.get("time", 0.0) for r in records)
    rows = [r for r in records if isinstance(r.get(key), (int, float))]
    return ([r["step"] for r in rows], [(r.get("time", t0) - t0) / 3600 for r in rows], [r[key] for r in rows])


def plot(runs: dict[str, list[dict]], out: str) -> int:
    """Draws the 2 x 4 grid to `out`; -> the number of lines drawn."""
    # Imported here: the file-only backend must be chosen before pyplot is imported, and importing this module
    # (its --help, its readers) should not choose one for the whole process.
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(2, len(PANELS), figsize=(5 * len(PANELS), 8), squeeze=False)
    lines = 0
    for col, (title, keys) in enumerate(PANELS):
        for label, records in runs.items():
            for key in keys:
                steps, hours, values = series(records, key)
                if not values:
                    continue
                name = f"{label} {key}" if len(keys) > 1 else label
                style = "--" if key.startswith("eval/") else "-"
                axes[0][col].plot(steps, values, style, label=name, marker="o" if len(values) < 3 else None)
                axes[1][col].plot(hours, values, style, label=name, marker="o" if len(values) < 3 else None)
                lines += 1
        for row, xlabel in enumerate(("step", "wall time (hours)")):
            ax = axes[row][col]
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return lines


def _label(workdir: str) -> str:
    """A run's default label: its workdir's name (of a metrics file: its folder's)."""
    if paths.is_remote(workdir):
        return paths.basename(workdir if not workdir.endswith(".jsonl") else paths.dirname(workdir)) or workdir
    return os.path.basename(os.path.normpath(workdir if not workdir.endswith(".jsonl")
                                             else os.path.dirname(workdir)) or workdir)


def _plot_runs(workdirs: list[str], labels_arg: str, out: str) -> dict:
    """Reads each run, draws them into `out`; -> the summary main prints."""
    labels = labels_arg.split(",") if labels_arg else [
        _label(w) for w in workdirs]
    if len(labels) != len(workdirs):
        raise PlotError(f"--labels has {len(labels)} names for {len(workdirs)} workdirs")
    if len(set(labels)) != len(labels):  # same folder names in different places: keep the lines apart
        labels = [f"{label} ({i})" for i, label in enumerate(labels, 1)]
    runs = {label: read_run(w) for label, w in zip(labels, workdirs)}
    lines = plot(runs, out)
    return {"out": os.path.abspath(out), "runs": len(runs), "lines": lines,
            "records": sum(len(r) for r in runs.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="training workdirs (or metrics.jsonl files) to overlay")
    parser.add_argument("--out", default="runs.png", help="the PNG to write (default runs.png)")
    parser.add_argument("--labels", default="", help="comma-separated run names (default: the folder names)")
    args = parser.parse_args(argv)
    try:
        summary = _plot_runs(args.workdirs, args.labels, args.out)
    except PlotError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
