"""Which split a text belongs to, from a stable hash of the text alone: the same in every process, run and
machine, so the pretraining splits and the downstream task's splits never depend on reading order."""

from __future__ import annotations

import hashlib

from data_pipeline.errors import DataError


def split_of(text: str, validation_fraction: float) -> str:
    """"train" or "validation" for `text`, from a stable hash (the same in every process and run).

    The first 8 bytes of sha1(text) read as an integer give a uniform number in [0, 1); texts below
    `validation_fraction` go to validation. Identical texts always land in the same split.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise DataError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if u < validation_fraction else "train"
