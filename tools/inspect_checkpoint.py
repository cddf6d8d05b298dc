"""List the checkpoints of a training workdir and the tree of one checkpoint's parameters.

    python -m tools.inspect_checkpoint W [--step N]

W is a training workdir (with `checkpoints/`) or the checkpoints folder itself. Prints each step with its
size on disk, then, for `--step` (default: the newest), the recorded data position and the parameter tree:
one line per array with its shape and dtype, and the totals. Only metadata is read: no array is loaded, so
this works on any machine whatever mesh wrote the checkpoint. The last printed line is one JSON object
(`steps`: [{step, bytes}], `step`, `params`: {path: [shape, dtype]}, `num_params`, `meta`: the JSON record
without its fingerprint).
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

from bert_jax import checkpointing
from bert_jax import workdir as workdir_lib
from data_pipeline import paths


def _directory(workdir: str) -> str:
    directory = workdir_lib.checkpoints(workdir)
    if paths.isdir(directory):
        return directory
    if paths.isdir(workdir):
        return workdir
    raise ValueError(f"{workdir} is not a folder")


def _param_tree(metadata) -> dict:
    """{"encoder/layers/...": (shape, dtype)} of the saved parameters, from orbax's array metadata."""
    params = metadata["params"] if "params" in metadata else metadata
    out = {}
    for path, m in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[name] = (tuple(int(d) for d in m.shape), str(np.dtype(m.dtype)))
    return out


def inspect(workdir: str, step: int | None = None) -> dict:
    """The report main prints (see the module docstring); ValueError when there is no such checkpoint."""
    directory = _directory(workdir)
    ckpt = checkpointing.Checkpointer(directory, async_save=False, read_only=True)
    try:
        sizes = ckpt.step_bytes()
        if not sizes:
            raise ValueError(f"no checkpoint in {directory}")
        step = max(sizes) if step is None else step
        if step not in sizes:
            raise ValueError(f"checkpoint step {step} not found in {directory}; available: {sorted(sizes)}")
        params = _param_tree(ckpt.state_metadata(step))
        meta = ckpt.restore_meta(step)
    finally:
        ckpt.close()
    meta_json = meta.to_json()
    meta_json.pop("fingerprint", None)
    return {"directory": directory, "steps": [{"step": s, "bytes": b} for s, b in sorted(sizes.items())],
            "step": step, "params": {k: [list(s), d] for k, (s, d) in params.items()},
            "num_params": int(sum(np.prod(s) for s, _ in params.values())), "meta": meta_json}


def _print_report(report: dict):
    print(f"checkpoints in {report['directory']}:")
    for row in report["steps"]:
        print(f"  step {row['step']:>10}  {row['bytes'] / 2**20:10.2f} MiB")
    meta = report["meta"]
    print(f"step {report['step']}: objective {meta.get('objective', '?')}, data position {meta.get('data')}")
    width = max(len(k) for k in report["params"])
    for name, (shape, dtype) in report["params"].items():
        print(f"  {name:<{width}}  {str(tuple(shape)):<18} {dtype}")
    print(f"{len(report['params'])} arrays, {report['num_params']:,} parameters")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.inspect_checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="training workdir (or its checkpoints folder)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to describe (default: newest)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ:  # metadata only: never take an accelerator
        jax.config.update("jax_platforms", "cpu")
    try:
        report = inspect(args.workdir, args.step)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    _print_report(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
