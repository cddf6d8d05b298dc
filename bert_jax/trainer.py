"""The training loop: restore or initialise, step, log, evaluate, checkpoint, stop cleanly on preemption.

`train_and_evaluate(config, workdir)` locks the workdir, builds the run (`bert_jax.builder`, the only reader
of the config) and trains to `train.steps`. Running it again on the same workdir resumes from the newest
good checkpoint (its data position included), so an interrupted run continues exactly where it stopped;
SIGTERM/SIGINT finish the current step, save it and return.

The loop itself holds no policy: the step is `run.step` (pure, jitted once), batches come from
`bert_jax.input_pipeline`, the workdir's layout and checkpoint metadata from `bert_jax.workdir`.
"""

from __future__ import annotations

import time
from typing import Collection

import jax
import numpy as np
from ml_collections import ConfigDict

from bert_jax import builder, checkpointing, fault, hf_extras, input_pipeline, optim, profiling, sharding
from bert_jax import train_state
from bert_jax import metrics as metrics_lib
from bert_jax import workdir as workdir_lib
from bert_jax.builder import Run
from bert_jax.errors import ConfigError
from bert_jax.models.electra import discriminator_as_mlm
from bert_jax.workdir import CheckpointMeta
from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from data_pipeline.progress import progress


def train_and_evaluate(config: ConfigDict, workdir: str, explicit: Collection[str] = (),
                       break_lock: bool = False) -> dict:
    """Trains to config.train.steps (resuming from workdir if it holds checkpoints); returns the last metrics.
    `explicit`: the config keys set on the command line (they must agree with an init_from checkpoint).
    The config, the data and init_from are checked before anything is written to the workdir; the workdir
    must be writable and is locked for the run; SIGTERM/SIGINT save a checkpoint and return. `break_lock`:
    take over the lock object a dead run left in an object-store workdir (bert_jax.fault.ObjectLock)."""
    run = builder.from_config(config, jax.device_count(), jax.process_count(), explicit=explicit)
    input_pipeline.check_train_shards(run.data, run.manifest)
    fault.check_workdir(workdir)
    with fault.WorkdirLock(workdir, jax.process_index(), break_lock), fault.PreemptionWatch() as preempt:
        return Trainer(run, workdir, preempt).train()


class Trainer:
    """One run of the loop on `workdir`; `train()` runs it and returns the last metrics."""

    def __init__(self, run: Run, workdir: str, preempt: fault.PreemptionWatch):
        self.run, self.workdir, self.preempt = run, workdir, preempt
        self._discriminator = None  # (ELECTRA params, config) when an MLM run starts from a discriminator
        self.profiler = profiling.StepProfiler(workdir_lib.profile(workdir), run.train.profile_steps)
        paths.makedirs(workdir)
        self.writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
        t = run.train
        self.flops_per_step = metrics_lib.step_flops(run.model_cfg, run.generator_cfg, t.batch_size,
                                                     run.data.seq_len, run.max_predictions)
        self.peak = metrics_lib.peak_flops_per_device(t.peak_tflops_per_device, jax.devices()[0].device_kind)
        self._log_start()
        c = run.checkpoint
        self.ckpt = checkpointing.Checkpointer(workdir_lib.checkpoints(workdir), max_to_keep=c.max_to_keep,
                                               async_save=c.async_save, keep_every=c.keep_every)
        self.manifest_sha256 = checkpointing.file_sha256(manifest_lib.path(run.data.dir))
        self.state = None

    def _log_start(self) -> None:
        for note in self.run.notes:
            self.writer.log(note)
        layout = self.run.layout
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layout.abstract.params))
        for line in metrics_lib.start_lines(self.run.config_text, self.run.mesh, n_params,
                                            sharding.bytes_per_device(layout.abstract.params),
                                            self.flops_per_step, self.peak):
            self.writer.log(line)
        fault.check_workdir(self.workdir,
                            need_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layout.abstract)))

    # ------------------------------------------------------------------------------------ restore or initialise

    def _check_resume(self, step: int, meta: CheckpointMeta) -> None:
        """Before anything is restored or written: a checkpoint this config cannot continue stops the run."""
        run = self.run
        reason = fault.resume_mismatch(step, meta, self.ckpt.directory, model=run.model_cfg,
                                       objective=run.objective_name, vocab_hash=run.manifest.vocab_hash,
                                       generator=run.generator_cfg)
        if reason:
            raise ConfigError(reason)

    def restore_or_init(self) -> CheckpointMeta | None:
        """Sets `self.state` from the newest good checkpoint (-> its meta) or freshly (-> None)."""
        run = self.run
        restored = self.ckpt.restore_newest_good(run.layout.abstract, check_meta=self._check_resume,
                                                 log=self.writer.log)
        if restored is not None:
            self.state, meta, latest = restored
            self.writer.log(f"resumed from step {latest} ({self.ckpt.directory})")
            return meta
        init_params = self._init_from() if run.init_from else None
        self.state = train_state.create_state(run.model_fn, run.tx, run.mesh, run.layout, run.train.seed,
                                              run.rules, params=init_params)
        if jax.process_index() == 0:
            self._snapshot_inputs()
        return None

    def _init_from(self) -> dict:
        """The parameters of `init_from` (another run's workdir, or an import), checked against this model."""
        run = self.run
        try:
            params, meta = checkpointing.load_params(run.init_from)
            if meta.objective == "electra" and run.objective_name == "mlm":
                fresh = sharding.init_params(run.model_fn, run.mesh, run.layout.shardings.params, run.rules)
                self._discriminator = (params, meta.model)  # its head is kept for the export (hf_extras)
                params = discriminator_as_mlm(params, jax.device_get(fresh["mlm_head"]))
            train_state.check_shapes(params, run.layout.abstract.params)
        except ValueError as e:
            raise ConfigError(f"init_from={run.init_from}: {e}") from None
        self.writer.log(f"initialised from {run.init_from} (step {meta.step})")
        return params

    def _snapshot_inputs(self) -> None:
        """The workdir is self-contained: the config, the data manifest and the tokenizer files."""
        run, w = self.run, self.workdir
        if paths.is_remote(w):  # one whole object each, written only when complete
            paths.write_text(workdir_lib.config_file(w), run.config_json)
        else:
            with open(workdir_lib.config_file(w), "w", encoding="utf-8") as f:
                f.write(run.config_json)
        paths.copy(manifest_lib.path(run.data.dir), workdir_lib.data_manifest(w))
        paths.copy_tree(paths.join(run.data.dir, run.manifest.tokenizer.dir), workdir_lib.tokenizer(w))
        if run.init_from:  # what an imported HF folder held beyond our params, for the export (bert_jax.hf_extras)
            workdir_lib.copy_hf_extras(run.init_from, w)
        if self._discriminator is not None:
            hf_extras.keep_discriminator_head(w, *self._discriminator)

    # ------------------------------------------------------------------------------------------ steps

    def _evaluate(self, eval_fn, batches: list) -> dict:
        eval_rng = jax.random.PRNGKey(self.run.train.seed + 2)  # fixed masks: comparable across steps and runs
        sums = None
        for i, batch in enumerate(progress(batches, desc="eval", unit="batch")):
            out = eval_fn(self.state.params, batch, jax.random.fold_in(eval_rng, i))
            sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        values = metrics_lib.finish_sums(jax.device_get(sums))
        return {"eval/loss": self.run.objective.total_loss(values), **{f"eval/{k}": v for k, v in values.items()}}

    def _save(self, step: int, plan) -> None:
        run = self.run
        meta = CheckpointMeta(step=step, objective=run.objective_name, model=run.model_cfg,
                              generator=run.generator_cfg, vocab_hash=run.manifest.vocab_hash,
                              data=plan.position(step), manifest_sha256=self.manifest_sha256,
                              config=builder.config_dict(run))
        self.ckpt.save(step, self.state, meta)

    def train(self) -> dict:
        run, t = self.run, self.run.train
        meta = self.restore_or_init()
        start_step = int(jax.device_get(self.state.step))
        # One global batch per step; a resume continues from the data position saved with the checkpoint.
        train_ds, batches = input_pipeline.train_stream(run.data, t.batch_size, run.batch_sharding,
                                                        meta.data_batches if meta is not None else 0)
        eval_batches = []
        if t.eval_every > 0:
            eval_batches = input_pipeline.eval_batches(run.data, run.manifest, t.batch_size, t.eval_batches,
                                                       run.batch_sharding)
        self.writer.log(f"training steps {start_step} -> {t.steps}, batch {t.batch_size} x {run.data.seq_len}")
        try:
            last, final_step, seconds = self._loop(start_step, batches, train_ds, eval_batches)
        finally:  # metrics on object storage are buffered: upload them even when the loop raised
            self.writer.flush()
        if start_step >= t.steps:
            self.writer.log(f"nothing to do: the checkpoint is at step {start_step} >= train.steps={t.steps}")
        self.profiler.stop()
        self.ckpt.close()
        for line in metrics_lib.summary_lines(self.workdir, run.objective_name, final_step - start_step,
                                              final_step, t.batch_size * run.data.seq_len, seconds, last,
                                              self.ckpt.directory):
            self.writer.log(line)
        self.writer.close()
        return last

    def _loop(self, start_step: int, batches, train_ds, eval_batches: list) -> tuple[dict, int, float]:
        """Steps start_step+1 .. train.steps (or up to a preemption); -> (last metrics, last step, seconds)."""
        run, t = self.run, self.run.train
        step_fn, eval_fn = run.call(run.step), run.call(run.eval_step)
        log = _LogInterval(self, start_step)
        last, final_step = {}, start_step
        for step in range(start_step + 1, t.steps + 1):
            final_step = step
            batch = log.next_batch(batches)
            self.profiler.before(step)
            self.state, step_metrics = step_fn(self.state, batch)
            self.profiler.after(step, step_metrics)
            log.pending.append(step_metrics)
            stop = self.preempt.should_stop(step)  # SIGTERM/SIGINT: this step is saved, then the run returns
            if step % t.log_every == 0 or step == t.steps or stop:
                last = log.write(step, len(train_ds.stream_stats.skipped_shards))
            if eval_batches and (step % t.eval_every == 0 or step == t.steps):
                last = {**last, **self._evaluate(eval_fn, eval_batches)}
                self.writer.write(step, {k: v for k, v in last.items() if k.startswith("eval/")}, prefix="eval ")
                log.t_log = time.perf_counter()
            every = run.checkpoint.every
            if (every and step % every == 0) or step == t.steps or stop:
                self._save(step, train_ds.plan)
            if stop:
                self.writer.log(f"{self.preempt.signal_name}: saved a checkpoint at step {step}; stopping (run "
                                f"again to resume)")
                break
        return last, final_step, log.clock.elapsed()


class _LogInterval:
    """The metrics of the steps since the last log line, fetched from the device once per interval (the
    loop's only host sync), with the time spent waiting for data and the NaN guard's count."""

    def __init__(self, trainer: Trainer, start_step: int):
        run = trainer.run
        self.trainer = trainer
        self.lr_schedule = optim.learning_rate_schedule(run.optim_cfg)
        self.nan_guard = fault.NanGuard(run.train.max_nan_skips)
        self.clock = metrics_lib.RunClock(start_step, run.train.steps, run.train.batch_size * run.data.seq_len,
                                          trainer.flops_per_step, trainer.peak * jax.device_count())
        self.pending, self.t_log, self.t_data = [], time.perf_counter(), 0.0

    def next_batch(self, batches):
        t0 = time.perf_counter()
        batch = next(batches)
        self.t_data += time.perf_counter() - t0
        return batch

    def write(self, step: int, skipped_shards: int) -> dict:
        """Writes the interval's record ending at `step`; -> the record. Raises FaultError (NaN guard)."""
        self.pending = jax.device_get(self.pending)
        values = metrics_lib.mean_of(self.pending)
        self.nan_guard.update(step - len(self.pending) + 1, [m["skipped"] for m in self.pending])
        values["skipped_total"] = self.nan_guard.total
        elapsed = time.perf_counter() - self.t_log
        record = {**{f"train/{k}": v for k, v in values.items()},
                  "learning_rate": float(self.lr_schedule(step - 1)),
                  **self.clock.interval(step, len(self.pending), elapsed, self.t_data),
                  "data/skipped_shards": skipped_shards}
        self.trainer.writer.write(step, record, suffix=self.clock.eta_text(step))
        self.nan_guard.check(before_raise=self.trainer.ckpt.close)
        self.pending, self.t_log, self.t_data = [], time.perf_counter(), 0.0
        return record
