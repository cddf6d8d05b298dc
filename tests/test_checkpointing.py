"""orbax checkpoints: typed restore onto another mesh, and parameter loading in a process whose devices
differ from the saving run's (what conversion and init_from do)."""

import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from bert_jax import checkpointing, optim, sharding, train_state
from bert_jax.models import BertForMaskedLM, EncoderConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = EncoderConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_position_embeddings=32)


def _state(mesh):
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, total_steps=10))
    model_fn = lambda: BertForMaskedLM(CFG, nnx.Rngs(3))  # noqa: E731
    layout = train_state.state_layout(model_fn, tx, mesh)
    return layout, train_state.create_state(model_fn, tx, mesh, layout, seed=3)


def test_save_sharded_restore_elsewhere(tmp_path):
    layout8, state = _state(sharding.make_mesh(data=2, fsdp=2, tensor=2))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=True)
    ckpt.save(7, state, {"step": 7, "note": "x"})
    ckpt.close()
    expected = jax.tree.map(np.asarray, jax.device_get(state.params))

    # Typed restore onto one device: bitwise equal, laid out as the new target says.
    layout1, _ = _state(sharding.make_mesh(devices=jax.devices()[:1]))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    restored, meta = ckpt.restore(7, layout1.abstract)
    ckpt.close()
    assert meta["note"] == "x" and int(restored.step) == 0
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(a, b)
        assert len(b.sharding.device_set) == 1

    # Untyped parameter loading in a fresh process with ONE device (the checkpoint was written by 8).
    np.save(tmp_path / "word.npy", expected["encoder"]["embeddings"]["word"])
    code = ("import numpy as np; from bert_jax import checkpointing; "
            f"p, m = checkpointing.load_params({str(tmp_path)!r}); "
            f"assert np.array_equal(p['encoder']['embeddings']['word'], np.load({str(tmp_path / 'word.npy')!r})); "
            "print('ok', m['step'])")
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok 7" in out.stdout, out.stderr[-2000:]
