"""Batches placed on the devices ahead of the step that needs them.

`to_device(it, put, size)` keeps `size` batches already transferred (`put`: host batch -> global jax arrays):
the next batch is read and copied while the device still runs the step just dispatched, so the loop finds
it waiting instead of paying the read and the transfer between two steps.
"""

import collections
import itertools
from typing import Callable, Iterable, Iterator


def to_device(batches: Iterable, put: Callable, size: int = 2) -> Iterator:
    """Yields put(batch) for every batch of `batches`, in order, with `size` of them transferred ahead."""
    if size < 1:
        raise ValueError(f"prefetch size {size} must be >= 1")
    it = iter(batches)
    queue = collections.deque(put(b) for b in itertools.islice(it, size))
    while queue:
        yield queue.popleft()
        queue.extend(put(b) for b in itertools.islice(it, 1))
