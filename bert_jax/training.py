"""`python -m bert_jax.training --config configs/bert.py:tiny --workdir W [--config.KEY=VALUE ...]`

The thin main parses flags, hides accelerators from TensorFlow and calls `train_and_evaluate`. Everything
the config says is checked before anything is compiled; running the same command again resumes from the
newest checkpoint in `W/checkpoints/` and continues the step count.
"""

import dataclasses
import json
import os
import re
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

from bert_jax import distributed  # noqa: E402  (defines the multi-host flags)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/bert.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl and logs.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")


class ConfigError(ValueError):
    """A config value that cannot work; raised before any compilation."""


def _model_config(config: ConfigDict, vocab_size: int):
    from bert_jax.models import EncoderConfig
    return EncoderConfig.from_section(config.model, vocab_size)


def _optim_config(config: ConfigDict):
    from bert_jax.optim import OptimConfig
    o = config.optim
    return OptimConfig(name=o.name, learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                       total_steps=config.train.steps, schedule=o.schedule, end_lr_ratio=o.end_lr_ratio,
                       weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)


def _masking_spec(config: ConfigDict, manifest: dict, vocab_size: int):
    from bert_jax.masking import MaskingSpec, special_ids_tuple
    o = config.objective
    ids = manifest["special_ids"]
    from data_pipeline.dataset import word_start_table
    return MaskingSpec(vocab_size=vocab_size, mask_id=ids["mask"], pad_id=ids["pad"],
                       special_ids=special_ids_tuple(manifest["special_token_ids"]), mask_rate=o.mask_rate,
                       max_predictions=o.max_predictions, mask_token_rate=o.mask_token_rate,
                       random_token_rate=o.random_token_rate,
                       word_starts=word_start_table(config.data.dir, manifest) if o.whole_word_masking else None)


def _mlm_setup(config: ConfigDict, model_cfg, spec):
    """BERT: -> (objective, model builder from nnx.Rngs, extra checkpoint meta)."""
    del config
    from bert_jax import objectives
    from bert_jax.models import BertForMaskedLM
    from bert_jax.models.heads import check_bert_config
    check_bert_config(model_cfg)
    return objectives.MlmObjective(spec), lambda rngs: BertForMaskedLM(model_cfg, rngs), {}


def _electra_setup(config: ConfigDict, model_cfg, spec):
    """ELECTRA: `model` is the discriminator; the generator is derived from it (recorded in the meta, so
    that each tower can be rebuilt and exported on its own)."""
    from bert_jax import objectives
    from bert_jax.models import ElectraForPretraining, generator_config
    o = config.objective
    gen_cfg = generator_config(model_cfg, o.generator_fraction, o.generator_layers)
    objective = objectives.ElectraObjective(spec, disc_weight=o.disc_weight, temperature=o.sampling_temperature)
    return (objective, lambda rngs: ElectraForPretraining(model_cfg, gen_cfg, rngs),
            {"generator": dataclasses.asdict(gen_cfg)})


# objective.name -> its set-up: the one place where the objective's name chooses code.
OBJECTIVES = {"mlm": _mlm_setup, "electra": _electra_setup}


def check_config(config: ConfigDict, manifest: dict, num_devices: int, process_count: int = 1) -> dict:
    """Everything that can be known wrong before compiling. Returns derived values; raises ConfigError."""
    from bert_jax import sharding
    d, t, m = config.data, config.train, config.model
    if config.objective.name not in OBJECTIVES:
        raise ConfigError(f"objective.name={config.objective.name!r}: choose one of {sorted(OBJECTIVES)}")
    if d.seq_len != manifest["seq_len"]:
        raise ConfigError(f"data.seq_len={d.seq_len} differs from seq_len={manifest['seq_len']} in "
                          f"{os.path.join(d.dir, 'manifest.json')}")
    if d.seq_len > m.max_position_embeddings:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}")
    vocab_size = manifest["vocab_size"] if m.vocab_size == -1 else m.vocab_size
    if vocab_size != manifest["vocab_size"]:
        raise ConfigError(f"model.vocab_size={m.vocab_size} differs from vocab_size={manifest['vocab_size']} "
                          f"in {os.path.join(d.dir, 'manifest.json')} (use -1 to take the manifest's)")
    try:
        mesh_shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        derived_rules = sharding.rules_from_config(config.mesh.get("rules"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_shards = mesh_shape[0] * mesh_shape[1]
    accum = config.optim.grad_accum_steps
    for key, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size),
                       ("train.log_every", t.log_every), ("optim.grad_accum_steps", accum)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if t.batch_size % (accum * batch_shards) or t.batch_size % process_count:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by optim.grad_accum_steps={accum} "
                          f"x data*fsdp devices={batch_shards} and by the {process_count} processes")
    if t.eval_every > 0:
        rows = manifest["splits"].get("validation", {}).get("rows", 0)
        if rows < t.batch_size:
            raise ConfigError(f"the validation split of {d.dir} has {rows} rows, fewer than one batch of "
                              f"train.batch_size={t.batch_size}; set train.eval_every=0 or add data")
        if not distributed.eval_batch_count(manifest, "validation", t.batch_size // process_count, process_count, 1):
            raise ConfigError(f"the validation split of {d.dir} gives some of the {process_count} processes fewer "
                              f"rows than one host batch of {t.batch_size // process_count}; set train.eval_every=0")
    return {"vocab_size": vocab_size, "mesh_shape": mesh_shape, "rules": derived_rules}


def _load_manifest(data_dir: str) -> dict:
    from data_pipeline.dataset import load_manifest
    if not data_dir:
        raise ConfigError("data.dir is empty: point it at a folder written by `python -m data_pipeline.pretokenize`")
    return load_manifest(data_dir)


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict:
    """Trains to config.train.steps (resuming from workdir if it holds checkpoints); returns the last metrics.
    The workdir must be writable and is locked for the run; SIGTERM/SIGINT save a checkpoint and return."""
    import jax

    from bert_jax import fault
    fault.check_workdir(workdir)
    with fault.WorkdirLock(workdir, jax.process_index()), fault.PreemptionWatch() as preempt:
        return _train_and_evaluate(config, workdir, preempt)


def _build_objective(config: ConfigDict, manifest: dict, vocab_size: int):
    """-> (model config, objective, build_model, extra meta) for `build_run`: the objective of
    `objective.name`, attending within each packed document (segments and positions from each piece's [CLS])
    where `data.document_attention`. ValueError on a bad field."""
    model_cfg = _model_config(config, vocab_size)
    spec = _masking_spec(config, manifest, vocab_size)
    objective, build_model, extra = OBJECTIVES[config.objective.name](config, model_cfg, spec)
    if config.data.document_attention:
        objective = dataclasses.replace(objective, document_cls_id=manifest["special_ids"]["cls"])
    return model_cfg, objective, build_model, extra


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's parts as the trainer builds them (see `build_run`). `step` and `eval_step` are jitted and
    return traced callables; call them through `in_mesh` (training does, `call`) so activation constraints see
    the mesh and rules."""

    model_cfg: object
    extra_meta: dict  # objective-specific checkpoint metadata (ELECTRA: the generator's config)
    objective: object
    optim_cfg: object
    mesh: object
    rules: tuple
    tx: object
    model_fn: object  # () -> the model, initialised from train.seed
    layout: object  # train_state.StateLayout: abstract state and shardings
    batch_sharding: object
    step: object
    eval_step: object

    def call(self, fn):
        """`fn` (e.g. `run.step` or `run.step.lower`) to be called under this run's mesh and rules."""
        from bert_jax import sharding
        return sharding.in_mesh(fn, self.mesh, self.rules)


def build_run(config: ConfigDict, manifest: dict, derived: dict, devices=None) -> Run:
    """The model, objective, optimizer, mesh, state layout and jitted steps of `config` on `devices` (default
    all), from `check_config`'s `derived`. Nothing is allocated or compiled. Shared by training, tools/plan.py
    and the multi-host reference run, so they build exactly what training runs. ConfigError on a bad field."""
    from flax import nnx

    from bert_jax import optim, sharding, train_state, train_step

    try:  # the typed configs validate their own fields
        model_cfg, objective, build_model, extra_meta = _build_objective(config, manifest, derived["vocab_size"])
        optim_cfg = _optim_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mesh = sharding.make_mesh(*derived["mesh_shape"], devices=devices)
    tx = optim.make_optimizer(optim_cfg)
    seed = config.train.seed
    model_fn = lambda: build_model(nnx.Rngs(seed))  # noqa: E731
    layout = train_state.state_layout(model_fn, tx, mesh, derived["rules"])
    batch_sharding = sharding.batch_sharding(mesh)
    step = train_step.make_train_step(layout, batch_sharding, tx=tx, objective=objective,
                                      accum_steps=config.optim.grad_accum_steps)
    eval_step = train_step.make_eval_step(layout, batch_sharding, objective=objective)
    return Run(model_cfg, extra_meta, objective, optim_cfg, mesh, derived["rules"], tx, model_fn, layout,
               batch_sharding, step, eval_step)


def _train_and_evaluate(config: ConfigDict, workdir: str, preempt) -> dict:
    import jax
    import numpy as np

    from bert_jax import checkpointing, fault, metrics as metrics_lib, optim, prefetch, sharding, train_state
    from bert_jax import profiling
    from data_pipeline import dataset as data_lib
    from data_pipeline.progress import progress

    manifest = _load_manifest(config.data.dir)
    derived = check_config(config, manifest, jax.device_count(), jax.process_count())
    if not config.data.skip_corrupt_shards:  # a truncated shard is an error before any compile
        data_lib.check_shards(config.data.dir, manifest, "train", jax.process_index(), jax.process_count())
    run = build_run(config, manifest, derived)
    try:
        profiler = profiling.StepProfiler(workdir, config.train.profile_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model_cfg, extra_meta, mesh, layout = run.model_cfg, run.extra_meta, run.mesh, run.layout
    seed = config.train.seed

    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    lr_schedule = optim.learning_rate_schedule(run.optim_cfg)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layout.abstract.params))
    flops_per_step = metrics_lib.step_flops(model_cfg, extra_meta, config.train.batch_size, config.data.seq_len,
                                            config.objective.max_predictions)
    peak = metrics_lib.peak_flops_per_device(config.train.peak_tflops_per_device, jax.devices()[0].device_kind)
    for line in metrics_lib.start_lines(config, mesh, n_params, sharding.bytes_per_device(layout.abstract.params),
                                        flops_per_step, peak):
        writer.log(line)
    fault.check_workdir(workdir, need_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layout.abstract)))

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=config.checkpoint.max_to_keep,
                                      async_save=config.checkpoint.async_save,
                                      keep_every=config.checkpoint.keep_every)

    def check_resume(step, meta):  # before anything is restored or written: a mismatch stops the run
        reason = fault.resume_mismatch(step, meta, ckpt.directory, model=dataclasses.asdict(model_cfg),
                                       objective=config.objective.name, vocab_hash=manifest["vocab_hash"],
                                       generator=extra_meta.get("generator"))
        if reason:
            raise ConfigError(reason)

    restored = ckpt.restore_newest_good(layout.abstract, check_meta=check_resume, log=writer.log)
    if restored is not None:
        state, meta, latest = restored
        writer.log(f"resumed from step {latest} ({ckpt.directory})")
    else:
        init_params = None
        if config.init_from:
            try:
                init_params, init_meta = checkpointing.load_params(config.init_from)
                train_state.check_shapes(init_params, layout.abstract.params)
                if init_meta.get("vocab_hash", manifest["vocab_hash"]) != manifest["vocab_hash"]:
                    raise ValueError(f"its vocabulary differs from the one of {config.data.dir}")
            except ValueError as e:
                raise ConfigError(f"init_from={config.init_from}: {e}") from None
            writer.log(f"initialised from {config.init_from} (step {init_meta.get('step')})")
            trained_act = init_meta.get("model", {}).get("hidden_act", "gelu")
            if trained_act != config.model.hidden_act:
                writer.log(f"note: {config.init_from} was trained with model.hidden_act={trained_act}; this run "
                           f"computes {config.model.hidden_act}")
        state = train_state.create_state(run.model_fn, run.tx, mesh, layout, seed, run.rules, params=init_params)
        if is_main:  # the workdir is self-contained: config, data manifest and tokenizer files
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json_best_effort(indent=2))
            shutil.copyfile(os.path.join(config.data.dir, "manifest.json"),
                            os.path.join(workdir, "data_manifest.json"))
            shutil.copytree(os.path.join(config.data.dir, manifest["tokenizer"]["dir"]),
                            os.path.join(workdir, "tokenizer"), dirs_exist_ok=True)
    start_step = int(jax.device_get(state.step))

    batch_sharding = run.batch_sharding
    step_fn, eval_fn = run.call(run.step), run.call(run.eval_step)
    host_batch = config.train.batch_size // jax.process_count()

    def to_global(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}

    # One global batch per step; a resume continues from the data position saved with the checkpoint.
    train_ds = data_lib.make_dataset(
        config.data.dir, "train", host_batch, shuffle=True, repeat=True, seed=config.data.seed,
        shuffle_buffer=config.data.shuffle_buffer, process_index=jax.process_index(),
        process_count=jax.process_count(), window_shards=config.data.window_shards,
        skip_corrupt_shards=config.data.skip_corrupt_shards,
        skip_batches=data_lib.resume_batches(meta if restored is not None else None, start_step))
    train_iter = prefetch.to_device(data_lib.as_numpy(train_ds), to_global, size=2)  # transferred ahead
    eval_batches = []
    if config.train.eval_every > 0:
        n_eval = distributed.eval_batch_count(manifest, "validation", host_batch, jax.process_count(),
                                              config.train.eval_batches)  # the same on every host
        eval_ds = data_lib.make_dataset(config.data.dir, "validation", host_batch, shuffle=False, repeat=False,
                                        process_index=jax.process_index(), process_count=jax.process_count())
        eval_batches = [to_global(b) for _, b in zip(range(n_eval), data_lib.as_numpy(eval_ds))]
    eval_rng = jax.random.PRNGKey(seed + 2)  # fixed masks: eval numbers are comparable across steps and runs

    def evaluate():
        sums = None
        for i, batch in enumerate(progress(eval_batches, desc="eval", unit="batch")):
            out = eval_fn(state.params, batch, jax.random.fold_in(eval_rng, i))
            sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        values = metrics_lib.finish_sums(jax.device_get(sums))
        return {"eval/loss": run.objective.total_loss(values), **{f"eval/{k}": v for k, v in values.items()}}

    manifest_sha256 = checkpointing.file_sha256(os.path.join(config.data.dir, "manifest.json"))
    nan_guard = fault.NanGuard(config.train.max_nan_skips)

    def save(step):
        meta = {"step": step, "data": train_ds.plan.position(step),
                "vocab_hash": manifest["vocab_hash"], "model": dataclasses.asdict(model_cfg),
                "objective": config.objective.name, **extra_meta, "manifest_sha256": manifest_sha256,
                "config": json.loads(config.to_json_best_effort())}
        ckpt.save(step, state, meta)

    tokens_per_step = config.train.batch_size * config.data.seq_len
    last = {}
    clock = metrics_lib.RunClock(start_step, config.train.steps, tokens_per_step, flops_per_step,
                                 peak * jax.device_count())
    pending, t_log, t_data = [], time.perf_counter(), 0.0
    writer.log(f"training steps {start_step} -> {config.train.steps}, batch {config.train.batch_size} x "
               f"{config.data.seq_len}")
    final_step = start_step
    for step in range(start_step + 1, config.train.steps + 1):
        final_step = step
        t0 = time.perf_counter()
        batch = next(train_iter)
        t_data += time.perf_counter() - t0
        profiler.before(step)
        state, step_metrics = step_fn(state, batch)
        profiler.after(step, step_metrics)
        pending.append(step_metrics)
        stop = preempt.should_stop(step)  # SIGTERM/SIGINT: this step is saved, then the run returns
        if step % config.train.log_every == 0 or step == config.train.steps or stop:
            pending = jax.device_get(pending)  # the only host sync: once per log interval
            values = metrics_lib.mean_of(pending)
            nan_guard.update(step - len(pending) + 1, [m["skipped"] for m in pending])
            values["skipped_total"] = nan_guard.total
            elapsed = time.perf_counter() - t_log
            last = {**{f"train/{k}": v for k, v in values.items()},
                    "learning_rate": float(lr_schedule(step - 1)),
                    **clock.interval(step, len(pending), elapsed, t_data),
                    "data/skipped_shards": len(train_ds.stream_stats.skipped_shards)}
            writer.write(step, last, suffix=clock.eta_text(step))
            nan_guard.check(before_raise=ckpt.close)
            pending, t_log, t_data = [], time.perf_counter(), 0.0
        if eval_batches and (step % config.train.eval_every == 0 or step == config.train.steps):
            last = {**last, **evaluate()}
            writer.write(step, {k: v for k, v in last.items() if k.startswith("eval/")}, prefix="eval ")
            t_log = time.perf_counter()
        if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == config.train.steps or stop:
            save(step)
        if stop:
            writer.log(f"{preempt.signal_name}: saved a checkpoint at step {step}; stopping (run again to resume)")
            break
    if start_step >= config.train.steps:
        writer.log(f"nothing to do: the checkpoint is at step {start_step} >= train.steps={config.train.steps}")
    profiler.stop()
    ckpt.close()
    for line in metrics_lib.summary_lines(workdir, config.objective.name, final_step - start_step,
                                          final_step, tokens_per_step, clock.elapsed(),
                                          last, ckpt.directory):
        writer.log(line)
    writer.close()
    return last


def main(argv):
    del argv
    config = _CONFIG.value
    if _PRINT_CONFIG.value:
        print(config)
        return
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required")
    # TensorFlow only reads data here: keep it off any accelerator so it does not take device memory.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    from bert_jax.fault import FaultError
    from data_pipeline.errors import DataError
    try:
        distributed.initialize()  # before any other JAX call
        train_and_evaluate(config, _WORKDIR.value)
    except (ConfigError, DataError, FaultError, distributed.DistributedError) as e:
        sys.exit(f"error: {e}")


def _parse_flags(argv):
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
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
