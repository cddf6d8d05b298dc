"""`python -m bert_jax.training --config configs/bert.py:tiny --workdir W [--config.KEY=VALUE ...]`

The command line only: it parses the flags (a bad value or an unknown config key is one line, no traceback),
starts the multi-host runtime where there is one (`bert_jax.distributed`), keeps TensorFlow off the
accelerators and calls `bert_jax.trainer.train_and_evaluate`. Everything the config says is checked before
anything is compiled (`bert_jax.builder`); running the same command again resumes from the newest checkpoint
in `W/checkpoints/` and continues the step count.
"""

import os
import re
import sys

# Before TensorFlow is first imported. It only parses integer records here, so its oneDNN float kernels never
# run; turning them off also silences the note about them that it prints at start-up.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bert_jax import distributed  # noqa: E402  (defines the multi-host flags; imports no jax)
from bert_jax.errors import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/bert.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl and logs (or gs://bucket/run).")
_BREAK_LOCK = flags.DEFINE_bool("break_lock", False, "Take over the lock object that a dead run left in an "
                                "object-store workdir (the error naming it says how old its heartbeat is).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")


def quiet_logs() -> None:
    """Keeps the libraries' INFO chatter (absl, orbax, jax) out of the training log: warnings and errors still
    show, and `--verbosity=0` brings INFO back."""
    logging.set_verbosity(logging.WARNING)


def main(argv):
    del argv
    config = _CONFIG.value
    if _PRINT_CONFIG.value:
        print(config)
        return
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required")
    if not flags.FLAGS["verbosity"].present:
        quiet_logs()
    # Late imports: this module is imported by tools (tools.plan) that must set XLA's flags before jax loads.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from bert_jax import trainer  # pylint: disable=import-outside-toplevel
    from bert_jax.fault import FaultError  # pylint: disable=import-outside-toplevel
    from data_pipeline.errors import DataError  # pylint: disable=import-outside-toplevel

    # TensorFlow only reads data here: keep it off any accelerator so it does not take device memory.
    tf.config.set_visible_devices([], "GPU")
    try:
        distributed.initialize()  # before any other JAX call
        explicit = config_flags.get_override_values(flags.FLAGS["config"])  # keys set on the command line
        trainer.train_and_evaluate(config, _WORKDIR.value, explicit=set(explicit), break_lock=_BREAK_LOCK.value)
    except (ConfigError, DataError, FaultError, distributed.DistributedError) as e:
        sys.exit(f"error: {e}")


def parse_flags(argv):
    """absl's parsing, with one clear line (no traceback) for a bad value or an unknown config key."""
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # absl ends --help with status 1; asking for help is not a failure
        if e.code == 1 and {"--help", "-?", "--helpshort", "--helpfull"} & set(argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if len(lines) > 1:  # the config file raised (an unknown size or preset): its traceback, then the error
            flag = re.match(r"flag (--\S+):", lines[0])
            reason = re.sub(r"^\w+Error: ", "", lines[-1])
            lines = [f"{flag.group(1) if flag else lines[0]}: {reason}"]
        sys.exit(f"error: {lines[0]}")
    except (AttributeError, KeyError) as e:  # ml_collections: the override names a key the config lacks
        text = str(e.args[0] if e.args else e)
        key = re.search(r"'([\w.-]+)", text)
        hint = re.search(r'Did you mean "([^"]+)"', text)
        bad = " ".join(a for a in argv[1:] if a.startswith("--config.")) or "the config overrides"
        sys.exit(f"error: unknown config key {key.group(1) if key else '?'!r} in {bad}"
                 + (f' (did you mean "{hint.group(1)}"?)' if hint else ""))


def run():
    """Console-script entry point (`bert-jax-train`)."""
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
