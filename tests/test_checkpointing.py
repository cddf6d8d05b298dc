"""orbax checkpoints: typed restore onto another mesh, and parameter loading in a process whose devices
differ from the saving run's (what conversion and init_from do); keep the last K plus every M-th; corrupt
checkpoints detected and passed over for the previous good one; `tools.inspect_checkpoint`."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from bert_jax import checkpointing, optim, sharding, train_state
from bert_jax.models import BertForMaskedLM, EncoderConfig
from bert_jax.workdir import CheckpointMeta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = EncoderConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_position_embeddings=32)


def _meta(step: int, **fields) -> CheckpointMeta:
    return CheckpointMeta(step=step, objective="mlm", model=CFG, **fields)


def _state(mesh):
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, total_steps=10))
    model_fn = lambda: BertForMaskedLM(CFG, nnx.Rngs(3))  # noqa: E731
    layout = train_state.state_layout(model_fn, tx, mesh)
    return layout, train_state.create_state(model_fn, tx, mesh, layout, seed=3)


def test_save_sharded_restore_elsewhere(tmp_path):
    _, state = _state(sharding.make_mesh(data=1, fsdp=8, tensor=1))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=True)
    ckpt.save(7, state, _meta(7, vocab_hash="x"))
    ckpt.close()
    expected = jax.tree.map(np.asarray, jax.device_get(state.params))

    # Typed restore onto another mesh (data x tensor instead of fsdp): bitwise equal, laid out anew.
    layout_dt, _ = _state(sharding.make_mesh(data=2, fsdp=1, tensor=4))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    restored, _ = ckpt.restore(7, layout_dt.abstract)
    ckpt.close()
    for a, b, want in zip(jax.tree.leaves(expected), jax.tree.leaves(restored.params),
                          jax.tree.leaves(layout_dt.shardings.params)):
        np.testing.assert_array_equal(a, b)
        assert b.sharding == want

    # Typed restore onto one device: bitwise equal, laid out as the new target says.
    layout1, _ = _state(sharding.make_mesh(devices=jax.devices()[:1]))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    restored, meta = ckpt.restore(7, layout1.abstract)
    ckpt.close()
    assert meta.vocab_hash == "x" and meta.model == CFG and int(restored.step) == 0
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)
        assert len(b.sharding.device_set) == 1

    # Untyped parameter loading in a fresh process with ONE device (the checkpoint was written by 8).
    np.save(tmp_path / "word.npy", expected["encoder"]["embeddings"]["word"])
    code = ("import numpy as np; from bert_jax import checkpointing; "
            f"p, m = checkpointing.load_params({str(tmp_path)!r}); "
            f"assert np.array_equal(p['encoder']['embeddings']['word'], np.load({str(tmp_path / 'word.npy')!r})); "
            "print('ok', m.step)")
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok 7" in out.stdout, out.stderr[-2000:]


def test_keep_last_k_plus_every_mth(tmp_path):
    _, state = _state(sharding.make_mesh(devices=jax.devices()[:1]))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "c"), max_to_keep=2, keep_every=4, async_save=True)
    for step in range(1, 11):
        ckpt.save(step, state, _meta(step))
    ckpt.close()
    assert sorted(int(s) for s in os.listdir(tmp_path / "c") if s.isdigit()) == [4, 8, 9, 10]


def _data_files(step_dir):
    """The array files of one checkpoint, largest first."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return sorted((f for f in files if "/d/" in f), key=os.path.getsize, reverse=True)


@pytest.mark.slow
def test_corrupt_checkpoints_are_reported_and_passed_over(tmp_path):
    layout, state = _state(sharding.make_mesh(data=2, fsdp=2, tensor=2))
    directory = str(tmp_path / "checkpoints")
    ckpt = checkpointing.Checkpointer(directory, max_to_keep=5)
    saved = {}
    for step in (1, 2, 3, 4, 5):  # five different states
        state = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x * 1.5, state.params))
        saved[step] = jax.device_get(state.params)
        ckpt.save(step, state, _meta(step))
    ckpt.close()

    # 5: the arrays of another save under its record (orbax reads them without complaint; the fingerprint
    # tells); 4: bytes flipped inside array files; 3: the array files cut short (a full disk); 2: its JSON
    # record cut short.
    shutil.rmtree(os.path.join(directory, "5", "state"))
    shutil.copytree(os.path.join(directory, "1", "state"), os.path.join(directory, "5", "state"))
    for path in _data_files(os.path.join(directory, "4")):
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            for i in range(len(data) // 4, 3 * len(data) // 4, 97):
                data[i] ^= 0x5A
            f.seek(0)
            f.write(data)
    for path in _data_files(os.path.join(directory, "3")):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with open(os.path.join(directory, "2", "meta", "metadata"), "r+b") as f:
        f.truncate(5)

    lines = []
    ckpt = checkpointing.Checkpointer(directory)
    restored, meta, step = ckpt.restore_newest_good(layout.abstract, check_meta=lambda s, m: None, log=lines.append)
    assert step == 1 and meta.step == 1 and ckpt.all_steps() == [1]
    ckpt.close()
    for a, b in zip(jax.tree.leaves(saved[1]), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    for line, bad, nxt in zip(lines, (5, 4, 3, 2), (4, 3, 2, 1)):
        assert line.startswith(f"checkpoint step {bad} in {directory} is corrupt: ") and f"trying step {nxt}" in line
    assert "differs from the fingerprint saved with it" in lines[0]
    assert sorted(n.split("-")[0] for n in os.listdir(directory + "-bad")) == ["2", "3", "4", "5"]  # kept aside


def test_inspect_checkpoint_cli(tmp_path, capsys):
    from tools import inspect_checkpoint  # pylint: disable=import-outside-toplevel

    _, state = _state(sharding.make_mesh(data=2, fsdp=4, tensor=1))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=5)
    for step in (3, 6):
        ckpt.save(step, state, _meta(step, data={"batches_consumed": step}))
    ckpt.close()
    assert inspect_checkpoint.main([str(tmp_path), "--step", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert [s["step"] for s in report["steps"]] == [3, 6] and all(s["bytes"] > 10_000 for s in report["steps"])
    assert report["step"] == 3 and report["meta"]["data"] == {"batches_consumed": 3}
    want = {name: [list(x.shape), str(x.dtype)] for name, x in
            ((checkpointing._path_name(p), x)  # pylint: disable=protected-access
             for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0])}
    assert report["params"] == want
    assert report["num_params"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    assert any("encoder/embeddings/word" in line and "(96, 32)" in line and "float32" in line for line in out)
    with pytest.raises(SystemExit, match=r"error: checkpoint step 5 not found in .*available: \[3, 6\]"):
        inspect_checkpoint.main([str(tmp_path), "--step", "5"])
