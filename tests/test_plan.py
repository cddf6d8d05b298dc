"""tools.plan: ahead-of-time plans on fake meshes, checked against really created sharded state."""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tools import plan, plan_hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(recipe: str, batch_size: int = 16, seq_len: int = 32, mesh=(-1, 1, 1), **model):
    """configs/<file>:<arg> with a small batch and sequence (and model overrides) for CPU tests."""
    file, arg = recipe.split(":")
    config = importlib.import_module(f"configs.{file[:-3]}").get_config(arg)
    config.unlock()
    config.train.batch_size, config.data.seq_len = batch_size, seq_len
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    for key, value in model.items():
        setattr(config.model, key, value)
    if config.objective.name == "electra":
        config.objective.max_predictions = 5
    return config


def _measured_bytes_per_device(tree) -> dict:
    """device -> bytes of the addressable shards of every array in `tree` that live on it."""
    out = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@pytest.mark.parametrize("recipe,mesh", [("bert.py:tiny", (8, 1, 1)), ("bert.py:tiny", (2, 4, 1)),
                                         ("bert.py:mini", (1, 4, 2)), ("electra.py:tiny", (1, 8, 1))])
def test_predicted_bytes_equal_real_shards(recipe, mesh):
    from bert_jax import train_state
    config = load_config(recipe, mesh=mesh)
    setup = plan.build(config, 8, vocab_size=1000)
    state = train_state.create_state(setup.run.model_fn, setup.run.tx, setup.run.mesh, setup.run.layout, seed=0)
    for tree, predicted in ((state.params, plan._tree_bytes(setup.run.layout.abstract.params)),
                            (state.opt_state, plan._tree_bytes(setup.run.layout.abstract.opt_state))):
        measured = _measured_bytes_per_device(tree)
        assert len(measured) == 8
        assert set(measured.values()) == {predicted}, (measured, predicted)
    full = sum(x.nbytes for x in jax.tree.leaves(state.params))
    if mesh[1] * mesh[2] > 1:  # sharded: each device holds less than a full copy
        assert plan._tree_bytes(setup.run.layout.abstract.params) < full


@pytest.mark.slow
@pytest.mark.parametrize("recipe,mesh,layers", [("bert.py:tiny", (1, 8, 1), 4),
                                                ("bert.py:mini", (2, 2, 2), 4),
                                                ("bert.py:tiny,gpu", (1, 8, 1), 4)])
def test_plan_flops_and_collectives(recipe, mesh, layers):
    """XLA's matmul FLOPs (while bodies times their trip count) equal the formula within 5%; collectives
    inside the layer scan count once per layer. The GPU preset (cuDNN attention, which fake CPU devices
    cannot run, and a partly unrolled scan: 2 layers per iteration of 3) plans too."""
    config = load_config(recipe, mesh=mesh, num_layers=layers)
    f = plan.plan(config, 8, vocab_size=1000)
    assert f["xla_over_formula"] == pytest.approx(1.0, abs=0.05)
    assert f["unknown_trip_counts"] == 0
    assert f["total_bytes"] >= f["param_bytes"] + f["opt_state_bytes"]
    assert f["temp_bytes"] > 0
    # Forward and backward of every layer communicate (gathering weights or reducing partial sums): only
    # counting the scan's body once per trip makes that at least 2 x layers collectives.
    counts = sum(v["count"] for v in f["collectives"].values())
    assert counts >= 2 * layers
    assert f["collectives"]["all-reduce"]["count"] > 0  # the data-parallel gradient reduction
    assert 0 < f["mfu"] < 1 and f["step_s"] == pytest.approx(f["compute_s"] + f["communication_s"])


def test_collectives_count_loop_bodies_times_trip_count():
    hlo = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[2,16]{1,0} get-tuple-element(%p), index=1
  %ag = f32[8,16]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%ag, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %d)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %ar = f32[8,16]{1,0} all-reduce(%a), channel_id=2, replica_groups={{0,1},{2,3}}, to_apply=%add
  %w = (s32[], f32[8,16]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[8,16]{1,0} get-tuple-element(%w), index=1
}
"""
    parsed = plan_hlo.parse_hlo(hlo)
    c = plan_hlo.collectives(parsed, 4)
    assert c["all-gather"] == {"count": 3, "payload_bytes": 3 * 512, "link_bytes": 3 * 512 * 3 / 4}
    assert c["all-reduce"] == {"count": 1, "payload_bytes": 512, "link_bytes": 2 * 512 / 2}
    assert plan_hlo.dot_flops(parsed) == 3 * 2 * 8 * 16 * 16
    assert parsed["unknown_trip_counts"] == 0


def _cli(*args, devices=8):
    return subprocess.run([sys.executable, "-m", "tools.plan", f"--devices={devices}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args,devices,message", [
    (["--config.train.batch_size=12", "--config.mesh.fsdp=8"], 8,
     "train.batch_size=12 must be divisible by optim.grad_accum_steps=1 x data*fsdp devices=8"),
    (["--config.train.batch_size=16", "--config.optim.grad_accum_steps=4", "--config.mesh.data=8"], 8,
     "train.batch_size=16 must be divisible by optim.grad_accum_steps=4 x data*fsdp devices=8"),
    (["--config.mesh.tensor=4"], 8, "model.num_heads=2 is not divisible by mesh.tensor=4"),
    (["--config.mesh.tensor=2", "--config.model.intermediate_size=513"], 8,
     "model.intermediate_size=513 is not divisible by mesh.tensor=2"),
    (["--config.mesh.fsdp=16"], 8, "mesh: 8 devices are not divisible by the fixed axes"),
    (["--config.mesh.data=4", "--config.mesh.fsdp=4"], 8, "uses 16 devices, but 8 exist"),
])
def test_cli_refuses_in_one_line(args, devices, message):
    r = _cli("--config=configs/bert.py:tiny", *args, devices=devices)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.slow
def test_cli_plans_tiny_on_four_devices():
    r = _cli("--config=configs/bert.py:tiny", "--config.mesh.fsdp=2", "--config.train.batch_size=8",
             "--config.data.seq_len=64", "--vocab_size=1000", "--peak-tflops=100", "--hbm-gib=16",
             devices=4)
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout.strip().splitlines()[-1])
    assert f["devices"] == 4 and f["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert f["peak_tflops"] == 100 and f["fits"] is True and f["hbm_gib"] == 16
    assert f["xla_over_formula"] == pytest.approx(1.0, abs=0.05)
    for key in ("param_bytes", "opt_state_bytes", "grad_bytes", "temp_bytes", "collective_link_bytes",
                "step_s", "tokens_per_s", "mfu"):
        assert f[key] > 0, key
    assert np.isclose(f["tokens_per_s"], 8 * 64 / f["step_s"])


@pytest.mark.parametrize("text,size", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add", 4),
    ("replica_groups=[4,2]<=[2,2,2]T(0,2,1), dimensions={0}", 2),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, use_global_device_ids=true", 4),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0','axis_2'}", 4),
    ("replica_groups={}, to_apply=%add", 8),
])
def test_replica_group_sizes(text, size):
    assert plan_hlo._group_size(text, 8) == size
