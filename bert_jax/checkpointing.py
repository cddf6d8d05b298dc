"""orbax checkpoints of the whole training state plus a JSON record (data position, config, vocab hash).

Saves are asynchronous: training goes on while the previous checkpoint is written; a step folder counts
only once orbax has committed it, so a run killed mid-save restarts from the newest complete checkpoint.
Restoring takes the abstract state of the current run (with its shardings) as the target, so a checkpoint
restores onto any mesh.
"""

import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin owner of one ocp.CheckpointManager under `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Starts writing `state` and the JSON `meta` for `step`; returns at once when saving asynchronously."""
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """-> (state laid out as `abstract_state` says, meta dict)."""
        if step not in self.all_steps():
            raise ValueError(f"checkpoint step {step} not found in {self.directory}; "
                             f"available: {self.all_steps()}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_untyped(self, step: int) -> tuple[dict, dict]:
        """-> (the saved state as a plain nested dict of arrays on one local device, meta), with no target
        but the checkpoint's own metadata: for tools that need the parameters (conversion, init_from)
        without rebuilding the optimizer, in a process whose devices need not match the saving run's."""
        import jax  # pylint: disable=import-outside-toplevel

        if step not in self.all_steps():
            raise ValueError(f"checkpoint step {step} not found in {self.directory}; "
                             f"available: {self.all_steps()}")
        path = os.path.join(self.directory, str(step), "state")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with ocp.StandardCheckpointer() as reader:
            tree = reader.metadata(path).item_metadata
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
            state = reader.restore(path, target)
        return dict(state), self.restore_meta(step)

    def restore_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self):
        """Blocks until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def load_params(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """(params as a nested dict of numpy arrays, meta) of checkpoint `step` (default: the newest) in
    `workdir/checkpoints` (or `workdir` itself when it is the checkpoints folder)."""
    import jax  # pylint: disable=import-outside-toplevel

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        directory = workdir
    if not os.path.isdir(directory):
        raise ValueError(f"no checkpoints folder in {workdir}")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {directory}")
        state, meta = ckpt.restore_untyped(step)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state["params"]), meta
