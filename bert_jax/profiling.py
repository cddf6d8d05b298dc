"""`train.profile_steps="a,b"`: a jax.profiler trace of training steps a..b (inclusive) in `workdir/profile`.

The trace (`profile/plugins/profile/<run>/*.xplane.pb`, plus a Perfetto `*.trace.json.gz`) opens in
TensorBoard's Profile tab (`tensorboard --logdir W`, needs the tensorboard-plugin-profile package) or at
https://ui.perfetto.dev. Keep the range short: a trace of a few steps is already tens of MB on accelerators.
"""

import jax


def parse_steps(spec) -> tuple[int, int] | None:
    """"a,b" / "a" / (a, b) -> (a, b) with 1 <= a <= b; "" or None -> None. Raises ValueError naming the key."""
    if spec in (None, "", ()):
        return None
    parts = spec.strip("()[] ").split(",") if isinstance(spec, str) else list(spec)
    try:
        steps = [int(p) for p in parts]
    except (TypeError, ValueError):
        steps = []
    if len(steps) == 1:
        steps *= 2
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"train.profile_steps={spec!r}: expected 'FIRST,LAST' with 1 <= FIRST <= LAST, e.g. '10,12'")
    return steps[0], steps[1]


class StepProfiler:
    """Starts the trace before step `first` and stops it after step `last` (waiting for that step's results,
    so the trace holds the device work); a no-op when no steps are given."""

    def __init__(self, logdir: str, spec):
        self.steps = parse_steps(spec)
        self.logdir = logdir
        self.active = False

    def before(self, step: int):
        if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
            jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs):
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
