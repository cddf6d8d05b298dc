"""orbax checkpoints of the whole training state plus a JSON record (data position, config, vocab hash).

Saves are asynchronous: training goes on while the previous checkpoint is written; a step folder counts
only once orbax has committed it (it writes into a temporary folder and renames it), so a run killed mid-save
restarts from the newest complete checkpoint. Restoring takes the abstract state of the current run (with its
shardings) as the target, so a checkpoint restores onto any mesh.

Bytes can still rot after the commit (a truncated file, a flipped bit that the storage format does not
notice): every save records a fingerprint of the state in its meta (two wrapping uint32 sums of each leaf's
bits, one of them position-weighted; exact, so independent of the mesh), checked after each restore.
`restore_newest_good` walks back from the newest checkpoint to the first one that restores and matches,
moving the bad ones aside (never deleting them).

The folder may be an object-store URL (gs://bucket/run/checkpoints): orbax writes it through tensorstore and
etils.epath and commits a step on object storage by writing its commit marker last; our few own file
operations go through `data_pipeline.paths`. A save that fails (an upload refused once the clients' retries
gave up, a full disk) stops the run with one line naming the step's folder (`fault.FaultError`, at the next
save, wait or close, where orbax reports it); that step has no commit marker, so it is never listed, and a
rerun resumes from the checkpoint before it.
"""

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bert_jax import fault
from bert_jax import workdir as workdir_lib
from bert_jax.workdir import CheckpointMeta
from data_pipeline import paths


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back, or whose contents differ from the fingerprint saved with it."""


class Checkpointer:
    """A thin owner of one ocp.CheckpointManager under `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True, keep_every: int = 0,
                 read_only: bool = False):
        """Keeps the newest `max_to_keep` checkpoints plus every step that is a multiple of `keep_every` (> 0).
        Temporary folders of saves that a crash interrupted are removed on start, unless `read_only` (readers
        such as tools must not touch the folder of a run that may be live)."""
        self.directory = paths.abspath(directory)  # a gs:// URL goes to orbax unchanged
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               keep_period=keep_every or None, read_only=read_only,
                                               cleanup_tmp_directories=not read_only, create=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step of the save that may still be in flight

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: CheckpointMeta) -> bool:
        """Starts writing `state` and `meta` (plus the state's fingerprint) for `step`; returns at once when
        saving asynchronously (after one small reduction over the state). The one writer of checkpoints:
        training and tools.import_from_hf both save through it."""
        meta = dataclasses.replace(meta, fingerprint=fingerprint(state))
        self.wait()  # the previous save's failure shows here, named by its own step
        self._saving = step
        with self._save_errors():
            return self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta.to_json())), force=True)

    @contextlib.contextmanager
    def _save_errors(self):
        """A failed save (an upload refused, a full disk) as one line naming the step's folder, raised where
        orbax reports it: at the next save, wait or close. The step never got its commit marker, so it is not
        listed: the previous checkpoints stay the newest, and a rerun resumes from them."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  orbax/tensorstore/gfile raise many types
            step = self._saving
            raise fault.FaultError(f"saving checkpoint step {step} to {paths.join(self.directory, str(step))} "
                                   f"failed ({_first_line(e)}); a rerun resumes from the newest complete "
                                   f"checkpoint") from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, CheckpointMeta]:
        """-> (state laid out as `abstract_state` says, its meta)."""
        if step not in self.all_steps():
            raise ValueError(f"checkpoint step {step} not found in {self.directory}; "
                             f"available: {self.all_steps()}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types for unreadable files  # noqa: BLE001
            raise CorruptCheckpointError(f"unreadable ({_first_line(e)})") from None
        state, meta = restored["state"], CheckpointMeta.from_json(dict(restored["meta"]))
        verify_fingerprint(state, meta)
        return state, meta

    def restore_newest_good(self, abstract_state: Any,
                            check_meta: Callable[[int, CheckpointMeta], None] | None = None,
                            log: Callable[[str], None] = print) -> tuple[Any, CheckpointMeta, int] | None:
        """-> (state, meta, step) of the newest checkpoint that restores and matches its fingerprint, or None
        when there is none. Each bad one is reported in one line and moved to `<directory>-bad/`.
        `check_meta(step, meta)` runs on the newest checkpoint's meta before anything is restored (it raises
        to refuse an incompatible checkpoint, e.g. other model shapes)."""
        steps = sorted(self.all_steps(), reverse=True)
        checked = False
        for i, step in enumerate(steps):
            try:
                if not checked and check_meta is not None:
                    try:
                        meta = self.restore_meta(step)
                    except Exception as e:  # noqa: BLE001
                        raise CorruptCheckpointError(f"unreadable meta ({_first_line(e)})") from None
                    check_meta(step, meta)
                    checked = True
                state, meta = self.restore(step, abstract_state)
                return state, meta, step
            except CorruptCheckpointError as e:
                where = self.quarantine(step)
                after = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint: starting anew"
                log(f"checkpoint step {step} in {self.directory} is corrupt: {e}; moved to {where}; {after}")
        return None

    def quarantine(self, step: int) -> str:
        """Moves checkpoint `step` out of the manager's folder (to `<directory>-bad/<step>-<time>`): kept for
        a post-mortem, and no longer in the way of a new save of the same step."""
        target = paths.join(self.directory + "-bad", f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            source = paths.join(self.directory, str(step))
            if paths.is_remote(source):  # object storage has no folder rename: copy, then delete
                paths.copy_tree(source, target)
                paths.rmtree(source)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.move(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine {step}")
        self._manager.reload()
        return target

    def restore_untyped(self, step: int) -> tuple[dict, CheckpointMeta]:
        """-> (the saved state as a plain nested dict of arrays on one local device, meta), with no target
        but the checkpoint's own metadata: for tools that need the parameters (conversion, init_from)
        without rebuilding the optimizer, in a process whose devices need not match the saving run's."""
        if step not in self.all_steps():
            raise ValueError(f"checkpoint step {step} not found in {self.directory}; "
                             f"available: {self.all_steps()}")
        path = paths.join(self.directory, str(step), "state")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with ocp.StandardCheckpointer() as reader:
            tree = reader.metadata(path).item_metadata
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
            try:
                state = reader.restore(path, target)
            except Exception as e:  # noqa: BLE001
                raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                                             f"({_first_line(e)})") from None
        meta = self.restore_meta(step)
        try:
            verify_fingerprint(state, meta, prefix="params/")  # the optimizer state's tree form may differ here
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: {e}") from None
        return dict(state), meta

    def step_bytes(self) -> dict[int, int]:
        """{step: bytes on disk} of every checkpoint."""
        sizes = {}
        for step in self.all_steps():
            root = paths.join(self.directory, str(step))
            sizes[step] = sum(paths.getsize(f) for f in paths.walk_files(root))
        return sizes

    def state_metadata(self, step: int) -> Any:
        """The saved tree of array metadata (shape, dtype) of checkpoint `step`, read without any array."""
        with ocp.StandardCheckpointer() as reader:
            return reader.metadata(paths.join(self.directory, str(step), "state")).item_metadata

    def restore_meta(self, step: int) -> CheckpointMeta:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return CheckpointMeta.from_json(dict(restored["meta"]))

    def wait(self):
        """Blocks until the pending asynchronous save is on disk."""
        with self._save_errors():
            self._manager.wait_until_finished()

    def close(self):
        with self._save_errors():
            self._manager.wait_until_finished()
        self._manager.close()


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file (the data manifest, recorded in every checkpoint's meta)."""
    with paths.open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _first_line(e: Exception) -> str:
    """The error's type and first line, without the payloads tensorstore appends (`[tensorstore_spec=...]`)."""
    text = str(e).strip().splitlines()
    first = re.split(r" \[\w+=", text[0])[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


def _leaf_sums(x):
    """Two uint32 sums (wrapping) of the bits of one array: plain and weighted by 1 + the flat index."""
    size = np.dtype(x.dtype).itemsize
    if size not in (1, 2, 4):  # 64-bit leaves: fold the two halves
        x = jax.lax.bitcast_convert_type(x, jnp.uint32).sum(axis=-1, dtype=jnp.uint32)
        size = 4
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):  # the flat index without reshaping (no resharding of a sharded array)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
        stride *= x.shape[d]
    return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * (index + 1)).sum(dtype=jnp.uint32)])


@jax.jit  # traced once per tree structure
def _tree_sums(tree):
    return jax.tree.map(_leaf_sums, tree)


def fingerprint(state: Any) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of the state's bits; the same on any mesh (integer sums are exact)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(_tree_sums(state)))[0]
    return {_path_name(p): [int(v) for v in np.asarray(x)] for p, x in leaves}


def _path_name(path) -> str:
    """"params/encoder/..." for a tree path, whether the tree is a TrainState or the plain dict that an untyped
    restore gives back."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def verify_fingerprint(state: Any, meta: CheckpointMeta, prefix: str = "") -> None:
    """Raises CorruptCheckpointError naming the first leaf whose fingerprint differs (no-op for checkpoints
    saved without one). `prefix` limits the check to the leaves under it (e.g. "params/")."""
    saved = {k: v for k, v in (meta.fingerprint or {}).items() if k.startswith(prefix)}
    if not saved:
        return
    now = {k: v for k, v in fingerprint(state).items() if k.startswith(prefix)}
    for name in sorted(set(saved) | set(now)):
        if saved.get(name) != now.get(name):
            raise CorruptCheckpointError(f"{name or 'the state'} differs from the fingerprint saved with it")


def _read_only(workdir: str) -> Checkpointer:
    """A read-only Checkpointer on `workdir/checkpoints` (or `workdir` itself when it is the checkpoints
    folder); ValueError when there is none, or no checkpoint in it."""
    directory = workdir_lib.checkpoints(workdir)
    if not paths.isdir(directory):
        directory = workdir
    if not paths.isdir(directory):
        raise ValueError(f"no checkpoints folder in {workdir}")
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    if ckpt.latest_step() is None:
        ckpt.close()
        raise ValueError(f"no checkpoint in {directory}")
    return ckpt


def load_params(workdir: str, step: int | None = None) -> tuple[dict, CheckpointMeta]:
    """(params as a nested dict of numpy arrays, meta) of checkpoint `step` (default: the newest) in
    `workdir/checkpoints` (or `workdir` itself when it is the checkpoints folder)."""
    ckpt = _read_only(workdir)
    try:
        state, meta = ckpt.restore_untyped(ckpt.latest_step() if step is None else step)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state["params"]), meta


def load_meta(workdir: str) -> CheckpointMeta:
    """The meta of the newest checkpoint of `workdir` (no array is read)."""
    ckpt = _read_only(workdir)
    try:
        return ckpt.restore_meta(ckpt.latest_step())
    finally:
        ckpt.close()
