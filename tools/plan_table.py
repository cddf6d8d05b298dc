"""The scaling table of docs/SCALING.md: `python -m tools.plan --table ROWS.jsonl [--table_grid full]`.

Each row is a real ahead-of-time compile (tools.plan.plan) of BERT-base or -large, MLM, float32, for one
(sequence length, global batch, device count, mesh). Compiled rows are appended to ROWS.jsonl as they
finish, so an interrupted run resumes where it stopped. The markdown table goes to stdout; the batch sizes
between two compiled ones are derived by linear interpolation in the global batch (per-device memory is
affine in the batch for a fixed mesh: state + per-row activations) and marked as derived.
"""

import json
import os
import sys

MODELS = ("base", "large")
SEQ_LENS = (128, 512)
BATCHES = (256, 1024, 2048, 4096, 8192)
HBM_GIB = (16, 32, 80)
TENSOR = 4  # the tensor axis of the fsdp+tensor meshes (divides the heads and MLP of base and large)


def _meshes(n: int) -> dict:
    return {"data": (n, 1, 1), "fsdp": (1, n, 1), "fsdp+tensor": (1, n // TENSOR, TENSOR)}


def grid(kind: str) -> list[dict]:
    """Rows to compile, most informative first. 'representative': every (model, sequence length, mesh) at
    8 devices x batch 256 and 256 devices x batch 8192 (32 rows per device both), then 8 x 8192 and
    64 x 2048; 'full': every batch on 8, 16, ..., 256 devices."""
    if kind == "representative":
        points = ((8, 256), (256, 8192), (8, 8192), (64, 2048))
    else:
        points = tuple((n, b) for n in (8, 16, 32, 64, 128, 256) for b in BATCHES)
    rows = []
    for n, batch in points:
        for model, seq in (("large", 512), ("base", 128), ("large", 128), ("base", 512)):
            for mesh_kind, mesh in _meshes(n).items():
                rows.append({"model": model, "seq_len": seq, "devices": n, "mesh_kind": mesh_kind,
                             "mesh": mesh, "batch_size": batch})
    return rows


def max_devices(kind: str) -> int:
    return max(r["devices"] for r in grid(kind))


def _key(r: dict) -> tuple:
    return r["model"], r["seq_len"], r["devices"], r["mesh_kind"], r["batch_size"]


def compile_rows(path: str, kind: str, vocab_size: int, plan_fn) -> list[dict]:
    """Compiles the rows of the grid that `path` lacks (appending each as it finishes) with `plan_fn`
    (tools.plan.plan); returns all rows."""
    import jax

    from configs import bert

    done = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            done = {_key(r): r for r in map(json.loads, f) if r}
    todo = [r for r in grid(kind) if _key(r) not in done]
    for i, row in enumerate(todo):
        config = bert.get_config(row["model"])
        config.unlock()
        config.data.seq_len, config.train.batch_size = row["seq_len"], row["batch_size"]
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = row["mesh"]
        f = plan_fn(config, row["devices"], vocab_size, devices=jax.devices()[:row["devices"]])
        out = {**row, **{k: f[k] for k in ("param_bytes", "opt_state_bytes", "temp_bytes", "total_bytes",
                                           "xla_over_formula", "collective_link_bytes", "compile_s")}}
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(out) + "\n")
        done[_key(row)] = out
        print(f"[{i + 1}/{len(todo)}] {_key(row)}: {f['total_gib']:.2f} GiB, compile {f['compile_s']:.0f} s",
              file=sys.stderr, flush=True)
    return list(done.values())


def derive(rows: list[dict]) -> list[dict]:
    """Every batch of BATCHES for each (model, seq, devices, mesh): compiled where compiled, else linear
    interpolation of total bytes between the nearest compiled batches of the same mesh."""
    groups = {}
    for r in rows:
        groups.setdefault(_key(r)[:4], {})[r["batch_size"]] = r
    out = []
    for key, by_batch in sorted(groups.items()):
        compiled = sorted(by_batch)
        for b in BATCHES:
            if b in by_batch:
                out.append({**by_batch[b], "derived": False})
                continue
            lo = max((c for c in compiled if c < b), default=None)
            hi = min((c for c in compiled if c > b), default=None)
            if lo is None or hi is None:
                continue
            t = (b - lo) / (hi - lo)
            total = by_batch[lo]["total_bytes"] + t * (by_batch[hi]["total_bytes"] - by_batch[lo]["total_bytes"])
            out.append({**by_batch[lo], "batch_size": b, "total_bytes": total, "derived": True})
    return out


def markdown(rows: list[dict]) -> str:
    """One table per (model, sequence length): rows are (devices, batch), columns the three meshes."""
    lines = []
    index = {(_key(r)): r for r in rows}
    kinds = ("data", "fsdp", "fsdp+tensor")
    for model in MODELS:
        for seq in SEQ_LENS:
            lines += [f"#### BERT-{model}, sequence length {seq}", "",
                      "| devices | global batch | rows/device | " + " | ".join(
                          f"{k} GiB ({'/'.join(map(str, HBM_GIB))})" for k in kinds) + " |",
                      "|---:|---:|---:|" + "---:|" * len(kinds)]
            for n in sorted({r["devices"] for r in rows}):
                for b in BATCHES:
                    cells = []
                    for k in kinds:
                        r = index.get((model, seq, n, k, b))
                        if r is None:
                            cells.append("-")
                            continue
                        gib = r["total_bytes"] / 2 ** 30
                        fits = "".join("y" if gib <= h else "n" for h in HBM_GIB)
                        cells.append(f"{gib:,.1f}{'*' if r['derived'] else ''} {fits}")
                    if any(c != "-" for c in cells):
                        lines.append(f"| {n} | {b} | {b / n:g} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def write_table(path: str, kind: str, vocab_size: int, plan_fn) -> None:
    rows = compile_rows(path, kind, vocab_size, plan_fn)
    table = derive(rows)
    print(markdown(table))
    print(json.dumps({"rows_file": path, "compiled": sum(not r["derived"] for r in table),
                      "derived": sum(r["derived"] for r in table),
                      "compile_s": round(sum(r["compile_s"] for r in rows), 1)}))
