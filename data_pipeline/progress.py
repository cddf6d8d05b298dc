"""Progress bars for long tasks (tqdm), shown only when stderr is a terminal so that CI logs stay readable."""

import sys

from tqdm.auto import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", unit_scale: bool = False,
             enabled: bool | None = None):
    """A tqdm bar (use as an iterable wrapper, or call `.update(n)` on it); silent when not on a terminal.

    `enabled=None` decides from `sys.stderr.isatty()`; tqdm's own rate and ETA cover documents/s, MB/s
    (`unit="B", unit_scale=True`) and time left when `total` is known."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)
