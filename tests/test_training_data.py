"""The trainer and its data: a truncated shard stops a run with an error naming the file (before any
compile), or with data.skip_corrupt_shards is skipped and counted in the metrics; whole-word masking and
document attention run end to end; init_from refuses a checkpoint trained with another vocabulary."""

import dataclasses
import os
import shutil

import numpy as np
import pytest

from bert_jax import trainer
from bert_jax.errors import ConfigError
from data_pipeline import manifest as manifest_lib
from data_pipeline.dataset import as_numpy, make_dataset
from data_pipeline.errors import DataError
from tests.helpers import write_shards
from tests.test_training import _config, _records


@pytest.fixture(name="three_shards", scope="module")
def _three_shards(docstring_shards, tmp_path_factory):
    """The session corpus with its train split re-written as 3 shards, the middle one truncated."""
    out = str(tmp_path_factory.mktemp("three") / "data")
    shutil.copytree(docstring_shards, out)
    manifest = manifest_lib.load(out)
    rows = np.concatenate([b["input_ids"] for b in as_numpy(
        make_dataset(out, "train", 64, shuffle=False, repeat=False, drop_remainder=False))])
    for shard in manifest.splits["train"].shards:
        os.remove(os.path.join(out, shard.file))
    shards = tuple(write_shards(rows, "train", out, 3, manifest.dtype, manifest.special_ids.pad))
    train = dataclasses.replace(manifest.splits["train"], shards=shards)
    manifest_lib.write(out, dataclasses.replace(manifest, splits={**manifest.splits, "train": train}))
    path = os.path.join(out, shards[1].file)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    return out, shards[1].file


@pytest.mark.slow
def test_truncated_shard_stops_or_is_skipped_and_counted(three_shards, tmp_path):
    data_dir, bad = three_shards
    with pytest.raises(DataError, match=f"shard \\S*{bad} has"):
        trainer.train_and_evaluate(_config(data_dir, train__steps=3, optim__warmup_steps=1, train__eval_every=0),
                                    str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "checkpoints")  # refused before any work
    # Skipped and counted; the run also exercises whole-word masking with document attention.
    last = trainer.train_and_evaluate(
        _config(data_dir, train__steps=3, optim__warmup_steps=1, train__eval_every=0, data__skip_corrupt_shards=True,
                objective__whole_word_masking=True, data__window_shards=2), str(tmp_path / "b"))
    assert last["data/skipped_shards"] == 1 and np.isfinite(last["train/loss"])
    assert all(r["data/skipped_shards"] == 1 for r in _records(str(tmp_path / "b")) if "train/loss" in r)

    # init_from: a checkpoint trained with another vocabulary than the data's is refused.
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    manifest_lib.write(str(other), dataclasses.replace(manifest_lib.load(str(other)), vocab_hash="0" * 64))
    cfg = _config(str(other), train__steps=3, optim__warmup_steps=1, data__skip_corrupt_shards=True)
    with cfg.unlocked():
        cfg.init_from = str(tmp_path / "b")
    with pytest.raises(ConfigError, match="init_from=.*its vocabulary differs"):
        trainer.train_and_evaluate(cfg, str(tmp_path / "c"))
