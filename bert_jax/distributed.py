"""Multi-host start-up: `jax.distributed.initialize` from flags or from the cluster's environment.

It must run before ANY other JAX call (`jax.devices()` included), so `training.main` calls `initialize()`
first. Three ways to start:

* explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on every host;
* `--distributed=on`: no values given, JAX finds them (Cloud TPU VM metadata, SLURM, Open MPI, Kubernetes);
* `--distributed=auto` (the default): initialise only where a multi-process cluster is visible in the
  environment: `JAX_COORDINATOR_ADDRESS` set, a SLURM job step with SLURM_NTASKS > 1, or Cloud TPU worker
  lists (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES) naming more than one host. Otherwise it stays a
  single process. On a Cloud TPU pod slice whose VMs do not export the worker list, pass `--distributed=on`.

`--distributed=off` never initialises. See docs/MULTIHOST.md for pod-slice and SLURM commands.
"""

import os
import re

from absl import flags

_MODE = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                          "jax.distributed start-up: auto (when a SLURM job of several tasks, a multi-host "
                          "Cloud TPU worker list or JAX_COORDINATOR_ADDRESS is seen, or the flags below are "
                          "given), on (always; values not given are detected by JAX), off (single process).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0's coordinator service (same on every process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(ValueError):
    """Inconsistent multi-host flags; reported as one line before JAX starts."""


def detected_cluster(environ=None) -> str | None:
    """Name of the multi-process cluster visible in `environ` ("slurm", "tpu", "env"), else None."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if all(v in env for v in _SLURM_VARS) and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([w for w in workers.split(",") if w.strip()]) > 1:
        return "tpu"
    return None


def resolve(mode: str, coordinator_address: str | None, num_processes: int | None, process_id: int | None,
            environ=None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Pure (no JAX call), so it is checked before anything starts; raises DistributedError (one line)."""
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    given = {k: v for k, v in explicit.items() if v is not None}
    if mode == "off":
        if given:
            raise DistributedError(f"--distributed=off contradicts --{', --'.join(given)}")
        return None
    if coordinator_address is not None and not re.fullmatch(r"\S+:\d{1,5}", coordinator_address):
        raise DistributedError(f"--coordinator_address={coordinator_address!r} is not HOST:PORT")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num_processes={num_processes} must be >= 1")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise DistributedError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if mode == "on" or given or detected_cluster(environ):
        return given  # what is not given, jax.distributed.initialize detects from the cluster
    return None


def initialize() -> dict | None:
    """Calls `jax.distributed.initialize` when the flags or the environment ask for several processes.

    Call before any other JAX call. Returns the arguments used (None: single process)."""
    kwargs = resolve(_MODE.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if kwargs is None:
        return None
    import jax  # pylint: disable=import-outside-toplevel  (this module is imported by jax-free CLIs: tools.plan)
    jax.distributed.initialize(**kwargs)
    return kwargs
