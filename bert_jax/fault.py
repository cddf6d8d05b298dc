"""Fault tolerance around the training loop: preemption signals, the workdir lock, writability and free-space
probes, and the bookkeeping of the NaN guard.

Everything here is host-side and cheap; the loop in `training.py` calls it with a few lines. The NaN guard
itself (skip a non-finite update) lives inside the jitted step (`train_step.py`); this module only counts
the consecutive skips that the step reports and stops the run after too many.
"""

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time

from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from bert_jax import workdir as workdir_lib
from bert_jax.models.config import EncoderConfig
from bert_jax.workdir import CheckpointMeta
from data_pipeline import paths


class FaultError(RuntimeError):
    """A condition that stops the run with a one-line message (the CLI prints `error: ...`)."""


# ---------------------------------------------------------------------------------------------- workdir checks

def check_workdir(workdir: str, need_bytes: int = 0) -> None:
    """Raises FaultError (one line) unless `workdir` can be created, written and holds `need_bytes` free.

    A probe file is written, flushed to disk and removed: permission bits alone do not tell (root ignores them,
    read-only mounts do not show in them), and a full disk only shows when a write fails. On object storage a
    probe object is written and removed (there is no free space to ask about).
    """
    if paths.is_remote(workdir):
        try:
            probe = paths.join(workdir, f".write_probe.{socket.gethostname()}.{os.getpid()}")
            paths.write_text(probe, "probe")
            paths.remove(probe)
        except Exception as e:  # noqa: BLE001  each object store client raises its own types
            raise FaultError(f"workdir {workdir} is not writable: {_first_line(e)}") from None
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise FaultError(f"workdir {workdir} is not writable: {reason}") from None
    free = shutil.disk_usage(workdir).free
    if free < need_bytes:
        raise FaultError(f"workdir {workdir} has {free / 2**20:.1f} MiB free, less than the {need_bytes / 2**20:.1f} "
                         f"MiB that one checkpoint needs")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def WorkdirLock(workdir: str, process_index: int = 0, break_lock: bool = False):  # noqa: N802  (a class to callers)
    """The lock of `workdir` for this process: a `FileLock` on a local disk, an `ObjectLock` on object storage
    (where there is no flock). `break_lock` takes over an object lock left by a run that died."""
    if paths.is_remote(workdir):
        return ObjectLock(workdir, process_index, break_lock)
    return FileLock(workdir, process_index)


class FileLock:
    """An exclusive fcntl lock on `workdir/lock-{process_index}` held for the life of the run.

    A second run on the same workdir fails at once instead of writing into the same checkpoint folder. The
    kernel drops a flock when its process dies, even by SIGKILL, so a crashed run never leaves a stale lock.
    """

    def __init__(self, workdir: str, process_index: int = 0):
        self.path = workdir_lib.lock(workdir, process_index)
        self._fd = None

    def acquire(self) -> "FileLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FaultError(f"workdir {os.path.dirname(self.path)} is in use by a running training process "
                             f"(pid {holder}, lock {self.path}); two runs must not share a workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class ObjectLock:
    """The workdir lock on object storage (gs://): the object `workdir/lock-{process_index}`, created only if
    absent (a does-not-exist precondition: of two runs starting together exactly one succeeds), holding the
    owner (host, pid) and a heartbeat rewritten every HEARTBEAT_SECONDS while the run lives, and deleted
    when it ends. Nothing removes the object of a run killed by SIGKILL or a lost VM, so a second run is told
    whose lock it is and how old its heartbeat is; with `break_lock` it deletes that lock (precondition: the
    generation it read) and takes it. A heartbeat that finds its lock taken over warns on stderr."""

    HEARTBEAT_SECONDS = 30.0
    STALE_SECONDS = 120.0  # four missed heartbeats: the holder is gone, not slow

    def __init__(self, workdir: str, process_index: int = 0, break_lock: bool = False):
        self.workdir, self.path = workdir, workdir_lib.lock(workdir, process_index)
        self.break_lock = break_lock
        self._blob, self._generation = None, None
        self._stop = threading.Event()
        self._thread = None

    def _body(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()})

    def acquire(self) -> "ObjectLock":
        from google.api_core import exceptions  # pylint: disable=import-outside-toplevel  (gs:// runs only)
        scheme, _, rest = self.path.partition("://")
        if scheme != "gs":
            raise FaultError(f"workdir {self.workdir}: locks on object storage are implemented for gs:// only")
        bucket, _, name = rest.partition("/")
        from google.cloud import storage  # pylint: disable=import-outside-toplevel
        self._blob = storage.Client().bucket(bucket).blob(name)
        try:
            self._blob.upload_from_string(self._body(), if_generation_match=0)
        except exceptions.PreconditionFailed:
            self._take_over_or_refuse(exceptions)
        self._generation = self._blob.generation
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock-heartbeat")
        self._thread.start()
        return self

    def _take_over_or_refuse(self, exceptions) -> None:
        holder = self._blob.bucket.get_blob(self._blob.name)
        info = {}
        try:
            info = json.loads(holder.download_as_bytes()) if holder is not None else {}
        except (ValueError, exceptions.NotFound):
            pass
        age = time.time() - float(info.get("heartbeat", 0))
        who = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, heartbeat {age:.0f} s ago"
        if not self.break_lock:
            hint = (f"its heartbeat is older than {self.STALE_SECONDS:.0f} s, so that run is probably gone: "
                    if age > self.STALE_SECONDS else "if you are sure no run uses it, ")
            raise FaultError(f"workdir {self.workdir} is in use by a running training process ({who}; lock "
                             f"{self.path}); two runs must not share a workdir ({hint}run again with "
                             f"--break_lock to take the lock over)")
        print(f"warning: breaking the lock {self.path} ({who})", file=sys.stderr, flush=True)
        try:
            if holder is not None:
                holder.delete(if_generation_match=holder.generation)
            self._blob.upload_from_string(self._body(), if_generation_match=0)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            raise FaultError(f"workdir {self.workdir}: another run took the lock {self.path} while it was "
                             f"being broken") from None

    def _heartbeat(self) -> None:
        from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            try:
                self._blob.upload_from_string(self._body(), if_generation_match=self._generation)
                self._generation = self._blob.generation
            except exceptions.PreconditionFailed:
                print(f"warning: the workdir lock {self.path} was taken over by another run", file=sys.stderr,
                      flush=True)
                return
            except Exception as e:  # noqa: BLE001  a transient error: the next beat tries again
                print(f"warning: workdir lock heartbeat failed ({_first_line(e)})", file=sys.stderr, flush=True)

    def release(self):
        if self._blob is None:
            return
        from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
        self._stop.set()
        self._thread.join()
        try:
            self._blob.delete(if_generation_match=self._generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            pass  # taken over meanwhile: the lock is someone else's now
        self._blob = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------- preemption

class PreemptionWatch:
    """Turns SIGTERM / SIGINT into "finish this step, save, exit 0".

    One process: a handler sets a flag, read after each step. Several processes (jax.distributed initialised):
    JAX's preemption service already catches SIGTERM and agrees on a step with all hosts, so `should_stop`
    asks `multihost_utils.reached_preemption_sync_point(step)` every step (a local check, no collective);
    SIGINT is forwarded as SIGTERM to this process so that it takes the same path.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name = None
        self._previous = {}
        self._distributed = False

    def __enter__(self):
        self._distributed = jax_distributed.global_state.preemption_sync_manager is not None
        handlers = {signal.SIGINT: self._forward} if self._distributed else {s: self._flag for s in self.SIGNALS}
        for sig, handler in handlers.items():
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _flag(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name

    def _forward(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """True at the step where this run (all its processes) should save and stop."""
        if self._distributed:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None


# ---------------------------------------------------------------------------------------------- NaN guard

class NanGuard:
    """Counts the updates that the jitted step skipped (metric `skipped`: 1.0 when the loss or a gradient was
    not finite) and raises FaultError after `max_consecutive` skips in a row (0: never).

    It reads the per-step metrics only when the loop fetches them anyway (once per log interval), so it adds
    no host sync; the run therefore stops at the first log step after the limit is reached. Skipped steps
    leave the parameters as they were, so any checkpoint written meanwhile still holds good parameters.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.last_step = 0

    def update(self, first_step: int, skipped: list[float]) -> None:
        """`skipped[i]` is the flag of step `first_step + i` (host floats)."""
        for flag in skipped:
            self.consecutive = self.consecutive + 1 if flag > 0 else 0
            self.total += int(flag > 0)
        self.last_step = first_step + len(skipped) - 1

    def check(self, before_raise=None) -> None:
        """Raises FaultError once the limit is reached (after calling `before_raise`, e.g. to finish a save)."""
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            if before_raise is not None:
                before_raise()
            raise FaultError(f"non-finite loss or gradients at {self.consecutive} consecutive steps (up to step "
                             f"{self.last_step}); stopping (train.max_nan_skips={self.max_consecutive}). Those steps "
                             f"left the parameters untouched; the last checkpoint is kept")


# ---------------------------------------------------------------------------------------------- resume checks

# Model fields that fix the parameters' shapes (dropout rates, dtype or remat may change on resume).
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "embedding_size", "intermediate_size",
              "max_position_embeddings", "type_vocab_size",
              # DeBERTa: which embeddings exist and the relative embeddings' size
              "relative_attention", "position_biased_input", "position_buckets", "max_relative_positions",
              "norm_rel_ebd")
# Model fields that change the function the weights compute: a resume with another value would go on training
# other math from those weights without a word (e.g. a CPU run resumed with the `SIZE,gpu` preset, whose GELU
# is the tanh form). Checkpoints that predate a field read as its EncoderConfig default (bert_jax.workdir).
FUNCTION_KEYS = ("hidden_act", "layer_norm_eps", "position_offset", "pos_att_type", "share_att_key")


def resume_mismatch(step: int, meta: CheckpointMeta, directory: str, *, model: EncoderConfig, objective: str,
                    vocab_hash: str | None, generator: EncoderConfig | None = None) -> str | None:
    """The one-line reason why checkpoint `step` (its `meta`) cannot be resumed by this config, or None."""
    where = f"the checkpoint at step {step} in {directory}"
    if meta.vocab_hash != vocab_hash:
        return f"{where} was trained with another vocabulary (vocab_hash differs from the data manifest's)"
    if meta.objective != objective:
        return (f"{where} has objective.name={meta.objective!r}, the config says {objective!r}; "
                f"use a new workdir (or init_from) to change it")
    towers = [("model", meta.model, model)]
    if generator is not None and meta.generator is not None:
        towers.append(("generator", meta.generator, generator))
    for name, saved, wanted in towers:
        for key in SHAPE_KEYS:
            if getattr(saved, key) != getattr(wanted, key):
                return (f"{where} has {name}.{key}={getattr(saved, key)}, the config gives {getattr(wanted, key)}; "
                        f"resume with the checkpoint's model shape or use a new workdir (nothing was overwritten)")
    for key in FUNCTION_KEYS:
        value, wanted = getattr(meta.model, key), getattr(model, key)
        if value != wanted:
            return (f"{where} was trained with model.{key}={value!r}, the config gives {wanted!r}; resume "
                    f"with --config.model.{key}={value}, or start a new workdir from it with init_from (nothing "
                    f"was overwritten)")
    return None
