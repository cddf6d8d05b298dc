r"""Plan a run before paying for it: compile the real training step ahead of time for a mesh of fake devices.

    python -m tools.plan --config configs/bert.py:large --devices 64 --config.mesh.fsdp=16 \
        [--config.train.batch_size=1024] [--config.data.seq_len=512] \
        [--peak-tflops 989 --hbm-gib 80 --link-gbps 450] [--vocab-size 30522]

Nothing is allocated: the model, optimizer, shardings and train step are the ones `bert_jax.training` builds,
lowered on `jax.ShapeDtypeStruct`s that carry their shardings, and compiled by XLA for `--devices` fake CPU
devices. Printed per device:
  - parameter, optimizer-state and gradient bytes (from the shard shapes; gradients: as the parameters),
  - the compiler's temporary memory and its total (`compiled.memory_analysis()`): arguments + outputs not
    aliased to donated arguments + temporaries,
  - FLOPs per step from XLA (`compiled.cost_analysis()`, per device) next to bert_jax/flops.py's formula,
  - bytes moved by collectives, read from the compiled HLO; ops inside a while loop (the layer scan, the
    gradient-accumulation scan) count once per iteration (the loop's known trip count),
  - a predicted step time, tokens/s and MFU for the hardware figures given (the model is in `predict`).
The last stdout line is one JSON object of these figures. `--table` prints docs/SCALING.md's table instead.

There is no data manifest when planning: the vocabulary size comes from --vocab-size and the special ids
are BERT's usual ones ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103); RoBERTa's (<s>=0, <pad>=1,
</s>=2, <unk>=3, <mask>=4) for configs/roberta.py.
"""

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from bert_jax import training  # noqa: E402  (defines --config; imports neither jax nor tensorflow)
from bert_jax.errors import ConfigError  # noqa: E402
from tools.plan_hlo import collectives, dot_flops, parse_hlo  # noqa: E402

_DEVICES = flags.DEFINE_integer("devices", 8, "Number of (fake CPU) devices of the planned mesh.")
_VOCAB = flags.DEFINE_integer("vocab_size", 30522, "Vocabulary size (no manifest is read when planning).")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Peak dense matmul TFLOP/s of one device (H100 bf16: 989).")
_HBM = flags.DEFINE_float("hbm_gib", 80.0, "Memory of one device in GiB.")
_LINK = flags.DEFINE_float("link_gbps", 450.0, "Collective bandwidth of one device in GB/s (bytes, not bits; "
                                               "H100 NVLink: ~450 per direction).")
_TABLE = flags.DEFINE_string("table", None, "Write the scaling table (markdown) to this file instead of planning "
                                            "one run; --table_grid picks the rows.")
_TABLE_GRID = flags.DEFINE_enum("table_grid", "representative", ["representative", "full"],
                                "Rows of --table: 'full' is the whole grid (slow on a small CPU).")

_DEVICE_COUNT_RE = re.compile(r"--xla_force_host_platform_device_count=\d+")
GIB = 2 ** 30
# BERT's vocab.txt (uncased and cased): [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
BERT_SPECIAL_IDS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}


def use_fake_devices(n: int) -> None:
    """Ask XLA for `n` CPU devices. Must run before jax is imported (the flag is read once, at start-up)."""
    if "jax" in sys.modules:
        raise RuntimeError("tools.plan: jax was imported before the device count could be set")
    flags_now = _DEVICE_COUNT_RE.sub("", os.environ.get("XLA_FLAGS", ""))
    if "xla_backend_optimization_level" not in flags_now:
        # The plan never runs the program: skip LLVM's optimisations (HLO passes, buffer assignment and thus
        # the memory and cost figures are the same; compiling is ~2.5x faster).
        flags_now += " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def special_ids(vocab_size: int) -> dict:
    """BERT's special ids where the vocabulary is big enough for them, else a trained one's (0..4)."""
    if vocab_size > max(BERT_SPECIAL_IDS.values()):
        return dict(BERT_SPECIAL_IDS)
    return {name: i for i, name in enumerate(("pad", "unk", "cls", "sep", "mask"))}


def synthetic_manifest(config, vocab_size: int):
    """What the run's checks read from a manifest, made up from the config (nothing is on disk): one
    validation batch, so an evaluation is possible."""
    from data_pipeline import manifest  # pylint: disable=import-outside-toplevel

    ids = special_ids(vocab_size)
    if config.model.get("position_offset", 0):  # RoBERTa (configs/roberta.py): its byte-level BPE's ids, pad 1
        ids = {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": 4}
    return manifest.synthetic(config.data.seq_len, vocab_size, manifest.SpecialIds(**ids),
                              validation_rows=config.train.batch_size)


def check(config, num_devices: int, vocab_size: int) -> dict:
    """The training run's own checks, plus the divisibility the planner insists on (where the trainer would
    silently replicate a dimension). Raises ConfigError with one line; returns derived values."""
    from bert_jax import builder  # pylint: disable=import-outside-toplevel  (imports jax: after use_fake_devices)

    if num_devices < 1:
        raise ConfigError(f"--devices={num_devices} must be >= 1")
    if vocab_size < 1:
        raise ConfigError(f"--vocab_size={vocab_size} must be >= 1")
    derived = builder.check_config(config, synthetic_manifest(config, vocab_size), num_devices)
    _, fsdp, tensor = derived.mesh_shape
    m = config.model
    widths = [("model.num_heads", m.num_heads, tensor, "mesh.tensor"),
              ("model.intermediate_size", m.intermediate_size, tensor, "mesh.tensor"),
              ("model.hidden_size", m.hidden_size, fsdp, "mesh.fsdp")]
    if config.objective.name in ("electra", "deberta_rtd"):  # two towers
        from bert_jax.models import EncoderConfig, generator_config
        try:
            gen = generator_config(EncoderConfig(vocab_size, m.hidden_size, num_heads=m.num_heads,
                                                 intermediate_size=m.intermediate_size,
                                                 embedding_size=None if m.embedding_size == -1
                                                 else m.embedding_size),
                                   config.objective.generator_fraction, config.objective.generator_layers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        widths += [("the generator's num_heads", gen.num_heads, tensor, "mesh.tensor"),
                   ("the generator's intermediate_size", gen.intermediate_size, tensor, "mesh.tensor"),
                   ("the generator's hidden_size", gen.hidden_size, fsdp, "mesh.fsdp"),
                   ("the embedding width", gen.embed_dim, fsdp, "mesh.fsdp")]
    for name, value, axis_size, axis in widths:
        if value % axis_size:
            raise ConfigError(f"{name}={value} is not divisible by {axis}={axis_size}")
    return derived


@dataclasses.dataclass
class Setup:
    """A training run's real pieces as the trainer builds them (`builder.Run`), abstract: nothing allocated;
    plus what planning adds."""

    config: object
    run: object  # builder.Run
    generator_cfg: object
    abstract_batch: dict


def build(config, num_devices: int, vocab_size: int = 30522, devices=None) -> Setup:
    """The run's model, optimizer, shardings and jitted train step on the first `num_devices` devices."""
    import jax
    import jax.numpy as jnp

    from bert_jax import builder

    derived = check(config, num_devices, vocab_size)
    if config.model.attention == "cudnn":  # fake CPU devices cannot call cuDNN: XLA's form of the same math
        config = copy.deepcopy(config)
        config.model.attention = "dot_product"
        print("note: planned with model.attention=dot_product in place of cudnn (a CPU compile cannot call "
              "cuDNN): the same FLOPs; the S x S scores it keeps over-state memory", file=sys.stderr)
    devices = jax.devices()[:num_devices] if devices is None else devices
    if len(devices) < num_devices:
        raise ConfigError(f"--devices={num_devices}, but only {len(devices)} devices exist")
    run = builder.build_run(config, synthetic_manifest(config, vocab_size), derived, devices=devices)
    shape = (config.train.batch_size, config.data.seq_len)
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding)
                      for k in ("input_ids", "attention_mask", "token_type_ids")}
    return Setup(config, run, run.generator_cfg, abstract_batch)


def compile_step(setup: Setup):
    """Lower the jitted step on the abstract state and batch, and compile it (no execution). Traced under the
    mesh and rules, as training.py runs it: activation constraints at layer boundaries."""
    return setup.run.call(setup.run.step.lower)(setup.run.layout.abstract, setup.abstract_batch).compile()


# ---------------------------------------------------------------------------------------------------------
# Figures and the step-time model

def _tree_bytes(tree) -> int:
    from bert_jax import sharding
    return sharding.bytes_per_device(tree)


def formula_flops(setup: Setup) -> int:
    from bert_jax import flops
    c = setup.config
    predictions = min(c.objective.max_predictions, c.data.seq_len)
    return flops.train_step_flops(setup.run.model_cfg, c.train.batch_size, c.data.seq_len, predictions,
                                  generator=setup.generator_cfg)


def predict(flops_per_device: float, link_bytes: float, tokens_per_step: int, model_flops: float,
            num_devices: int, peak_tflops: float, link_gbps: float) -> dict:
    """The step-time model: every FLOP XLA counts runs at the peak, and no collective overlaps compute:
        step = FLOPs per device / peak + collective link bytes per device / link bandwidth.
    Real steps are slower (elementwise work is memory-bound, kernels miss the peak), and faster where
    collectives overlap compute; `overlapped_step_s` is that lower bound, max(compute, communication).
    MFU = model FLOPs (bert_jax/flops.py) / (step time x devices x peak)."""
    compute = flops_per_device / (peak_tflops * 1e12)
    comm = link_bytes / (link_gbps * 1e9)
    step = compute + comm
    return {"compute_s": compute, "communication_s": comm, "step_s": step,
            "overlapped_step_s": max(compute, comm),
            "tokens_per_s": tokens_per_step / step if step else 0.0,
            "mfu": model_flops / (step * num_devices * peak_tflops * 1e12) if step else 0.0}


def analyse(setup: Setup, compiled, peak_tflops: float, hbm_gib: float, link_gbps: float) -> dict:
    """The figures of one compiled step, per device."""
    c = setup.config
    n = setup.run.mesh.size
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = _tree_bytes(setup.run.layout.abstract.params)
    opt = _tree_bytes(setup.run.layout.abstract.opt_state)
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    xla_flops = float(cost.get("flops", 0.0))
    model_flops = formula_flops(setup)
    parsed = parse_hlo(compiled.as_text())
    coll = collectives(parsed, n)
    link = sum(v["link_bytes"] for v in coll.values())
    hlo_flops = dot_flops(parsed)
    tokens = c.train.batch_size * c.data.seq_len
    figures = {
        "config": c.model.size, "objective": c.objective.name, "devices": n,
        "mesh": dict(setup.run.mesh.shape), "batch_size": c.train.batch_size, "seq_len": c.data.seq_len,
        "grad_accum_steps": c.optim.grad_accum_steps, "dtype": c.model.dtype, "remat": c.model.remat,
        "vocab_size": setup.run.model_cfg.vocab_size,
        "num_params": sum(math.prod(x.shape) for x in _leaves(setup.run.layout.abstract.params)),
        "param_bytes": params, "opt_state_bytes": opt, "grad_bytes": params,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "total_bytes": total, "total_gib": total / GIB, "hbm_gib": hbm_gib, "fits": total <= hbm_gib * GIB,
        "xla_flops_per_device": hlo_flops, "formula_flops_per_device": model_flops / n,
        "xla_over_formula": hlo_flops * n / model_flops if model_flops else 0.0,
        "cost_analysis_flops_per_device": xla_flops,
        "collectives": coll, "collective_link_bytes": link, "unknown_trip_counts": parsed["unknown_trip_counts"],
        "peak_tflops": peak_tflops, "link_gbps": link_gbps,
    }
    figures.update(predict(hlo_flops, link, tokens, model_flops, n, peak_tflops, link_gbps))
    return figures


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def plan(config, num_devices: int, vocab_size: int = 30522, peak_tflops: float = 989.0, hbm_gib: float = 80.0,
         link_gbps: float = 450.0, devices=None) -> dict:
    """check -> build -> compile -> figures. Raises ConfigError before compiling on bad input."""
    setup = build(config, num_devices, vocab_size, devices=devices)
    t0 = time.perf_counter()
    compiled = compile_step(setup)
    figures = analyse(setup, compiled, peak_tflops, hbm_gib, link_gbps)
    figures["compile_s"] = time.perf_counter() - t0
    return figures


def report(f: dict) -> str:
    """Human-readable lines for one plan."""
    mib = lambda b: f"{b / 2 ** 20:,.1f} MiB"  # noqa: E731
    lines = [
        f"{f['config']} ({f['objective']}, {f['num_params']:,} parameters), mesh {f['mesh']} on {f['devices']} "
        f"devices, batch {f['batch_size']} x {f['seq_len']}, accumulation {f['grad_accum_steps']}, "
        f"{f['dtype']}, remat {f['remat']}",
        "per device:",
        f"  parameters        {mib(f['param_bytes'])}",
        f"  optimizer state   {mib(f['opt_state_bytes'])}",
        f"  gradients         {mib(f['grad_bytes'])} (as the parameters)",
        f"  XLA temporaries   {mib(f['temp_bytes'])}",
        f"  total             {f['total_gib']:.2f} GiB of {f['hbm_gib']:g} GiB: "
        + ("fits" if f["fits"] else "DOES NOT FIT"),
        f"  FLOPs per step    XLA {f['xla_flops_per_device']:.4g}, formula {f['formula_flops_per_device']:.4g} "
        f"(ratio {f['xla_over_formula']:.3f}); cost_analysis {f['cost_analysis_flops_per_device']:.4g} "
        "(all FLOPs, loop bodies once)",
        "  collectives       " + ", ".join(f"{k} {v['count']}x {mib(v['link_bytes'])}"
                                           for k, v in f["collectives"].items() if v["count"]) or "none",
        f"predicted at {f['peak_tflops']:g} TFLOP/s and {f['link_gbps']:g} GB/s per device: step "
        f"{f['step_s'] * 1e3:.1f} ms (compute {f['compute_s'] * 1e3:.1f} ms + collectives "
        f"{f['communication_s'] * 1e3:.1f} ms), {f['tokens_per_s']:,.0f} tokens/s, MFU {f['mfu']:.1%}",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    config = training._CONFIG.value  # pylint: disable=protected-access
    n = _DEVICES.value
    if _TABLE.value:
        from tools import plan_table
        use_fake_devices(plan_table.max_devices(_TABLE_GRID.value))
        plan_table.write_table(_TABLE.value, _TABLE_GRID.value, _VOCAB.value, plan)
        return
    if config is None:
        sys.exit("error: --config is required (e.g. --config configs/bert.py:large)")
    if n < 1:
        sys.exit(f"error: --devices={n} must be >= 1")
    use_fake_devices(n)  # before anything imports jax; plan() refuses bad configs before compiling
    try:
        figures = plan(config, n, _VOCAB.value, _PEAK.value, _HBM.value, _LINK.value)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(report(figures))
    print(json.dumps(figures))


def _parse_flags(argv):
    """The trainer's parsing (one-line errors), with `--peak-tflops` accepted for `--peak_tflops` etc."""
    own = {f"--{name.replace('_', '-')}": f"--{name}" for name in
           ("peak_tflops", "hbm_gib", "link_gbps", "vocab_size", "table_grid")}

    def normalise(arg):
        head, sep, value = arg.partition("=")
        return own.get(head, head) + sep + value

    return training.parse_flags([argv[0]] + [normalise(a) for a in argv[1:]])


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
