"""From a config to a run: the only code below the command lines that reads the `ml_collections` ConfigDict.

`from_config(config)` loads the data manifest, checks everything that can be known wrong before compiling
(`check_config`, raising ConfigError with one line naming the key), and `build_run` turns the config into
typed parts: the model config, the objective (masking + losses), the optimizer, the mesh and sharding rules,
the abstract state and the jitted steps, plus the typed settings the loop (`bert_jax.trainer`) and the input
side (`bert_jax.input_pipeline`) need. Nothing is allocated or compiled here. Training, `tools/plan` and
`tools/benchmark` all build through `build_run`, so they build exactly what training runs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Callable, Collection

from flax import nnx
from ml_collections import ConfigDict

from bert_jax import checkpointing, input_pipeline, objectives, optim, profiling, sharding, train_state
from bert_jax import train_step
from bert_jax.errors import ConfigError
from bert_jax.masking import MaskingSpec, special_ids_tuple
from bert_jax.models import BertForMaskedLM, ElectraForPretraining, EncoderConfig, generator_config
from bert_jax.models.config import parse_kernels
from bert_jax.models.deberta import DebertaRtdForPretraining, check_deberta_towers
from bert_jax.models.heads import check_bert_config
from data_pipeline import manifest as manifest_lib
from data_pipeline import tokenization
from data_pipeline.manifest import Manifest


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The `train` section, typed."""

    steps: int
    batch_size: int
    log_every: int
    eval_every: int
    eval_batches: int
    seed: int
    max_nan_skips: int
    peak_tflops_per_device: float
    profile_steps: str

    @classmethod
    def from_section(cls, t: ConfigDict) -> "TrainSettings":
        return cls(**{f.name: t[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """The `checkpoint` section, typed."""

    every: int
    max_to_keep: int
    keep_every: int
    async_save: bool

    @classmethod
    def from_section(cls, c: ConfigDict) -> "CheckpointSettings":
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Derived:
    """What `check_config` derives: the vocabulary size, the mesh shape and the logical-axis rules."""

    vocab_size: int
    mesh_shape: tuple[int, int, int]
    rules: tuple


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's parts as the trainer uses them. `step` and `eval_step` are jitted; call them through `call`, so
    that activation constraints see the mesh and rules."""

    model_cfg: EncoderConfig
    generator_cfg: EncoderConfig | None  # ELECTRA's generator (None for MLM)
    objective_name: str
    objective: Any
    optim_cfg: optim.OptimConfig
    mesh: Any
    rules: tuple
    tx: Any
    model_fn: Callable  # () -> the model, initialised from train.seed
    layout: train_state.StateLayout  # abstract state and shardings
    batch_sharding: Any
    step: Any
    eval_step: Any
    manifest: Manifest
    data: input_pipeline.InputSettings
    train: TrainSettings
    checkpoint: CheckpointSettings
    max_predictions: int
    init_from: str
    notes: tuple[str, ...]  # what the builder decided for the user (e.g. the model shape taken from init_from)
    config_text: str  # the resolved config as printed (the log's first lines)
    config_json: str  # the resolved config as JSON (the workdir's config.json, each checkpoint's meta)

    def call(self, fn):
        """`fn` (e.g. `run.step` or `run.step.lower`) to be called under this run's mesh and rules."""
        return sharding.in_mesh(fn, self.mesh, self.rules)


def from_config(config: ConfigDict, num_devices: int, process_count: int = 1, devices=None,
                explicit: Collection[str] = ()) -> Run:
    """The run of `config` on the dataset of `config.data.dir` (its manifest is read, no data). With
    `init_from`, the model's shape comes from that checkpoint (`adopt_init_from`); `explicit` names the keys
    the user set on the command line (e.g. "model.hidden_size"), which must then agree with it."""
    manifest = manifest_lib.load(config.data.dir)
    notes = ()
    if config.init_from:
        config, notes = adopt_init_from(config, manifest, explicit)
    derived = check_config(config, manifest, num_devices, process_count)
    return dataclasses.replace(build_run(config, manifest, derived, devices=devices), notes=notes)


# model.* keys that the weights fix (their shapes, or the function they compute): a run started from a
# checkpoint (init_from) takes them from its meta. -> the EncoderConfig field.
INIT_FROM_KEYS = ("vocab_size", "num_layers", "hidden_size", "num_heads", "intermediate_size", "embedding_size",
                  "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "position_offset",
                  # DeBERTa's attention (the relative embeddings' shape and what the layers compute)
                  "relative_attention", "position_buckets", "max_relative_positions", "pos_att_type",
                  "share_att_key", "norm_rel_ebd", "position_biased_input")


def adopt_init_from(config: ConfigDict, manifest: Manifest,
                    explicit: Collection[str] = ()) -> tuple[ConfigDict, tuple[str, ...]]:
    """A copy of `config` whose model shape and architecture (INIT_FROM_KEYS; ELECTRA: also the generator's
    fraction and depth) are those of `config.init_from`'s newest checkpoint. A key in `explicit` that differs
    from the checkpoint's value, or a vocabulary other than the data's, is a ConfigError naming both values.
    Reads the checkpoint's meta only, so it fails before anything is compiled or written."""
    where = f"init_from={config.init_from}"
    try:
        meta = checkpointing.load_meta(config.init_from)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    from_discriminator = meta.objective == "electra" and config.objective.name == "mlm"
    if meta.objective != config.objective.name and not from_discriminator:  # nothing to start from
        raise ConfigError(f"{where} holds a checkpoint of objective {meta.objective!r}, the config trains "
                          f"objective.name={config.objective.name!r}")
    if from_discriminator and meta.model.embed_dim != meta.model.hidden_size:
        raise ConfigError(f"{where}: its ELECTRA discriminator's embedding_size {meta.model.embed_dim} differs "
                          f"from its hidden_size {meta.model.hidden_size}; BERT's MLM model needs them equal")
    if meta.vocab_hash and manifest.vocab_hash and meta.vocab_hash != manifest.vocab_hash:
        raise ConfigError(f"{where}: its vocabulary differs from the one of {config.data.dir} (pretokenize with "
                          f"--vocab {config.init_from}/tokenizer)")
    config = copy.deepcopy(config)
    wanted = {f"model.{k}": getattr(meta.model, k) for k in INIT_FROM_KEYS}
    wanted["model.embedding_size"] = -1 if meta.model.embedding_size is None else meta.model.embedding_size
    if meta.generator is not None and config.objective.name in TWO_TOWERS:
        wanted["objective.generator_fraction"] = meta.generator.hidden_size / meta.model.hidden_size
        wanted["objective.generator_layers"] = meta.generator.num_layers
    for key, value in wanted.items():
        section, name = key.split(".")
        if key in explicit and config[section][name] != value:
            raise ConfigError(f"{key}={config[section][name]} differs from {value} in {where}: its weights fix "
                              f"it; drop --config.{key} (the run takes it from there)")
        config[section][name] = value
    if meta.generator is not None and config.objective.name in TWO_TOWERS:
        gen = generator_config(meta.model, config.objective.generator_fraction, config.objective.generator_layers)
        if gen != dataclasses.replace(meta.generator, **{f: getattr(gen, f) for f in _FREE_FIELDS}):
            raise ConfigError(f"{where}: its generator ({meta.generator.num_layers} x {meta.generator.hidden_size}, "
                              f"{meta.generator.num_heads} heads) is not a fraction of its discriminator that "
                              f"objective.generator_fraction can express")
    m = meta.model
    note = (f"model from {where}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, "
            f"intermediate {m.intermediate_size}, vocabulary {m.vocab_size}, {m.max_position_embeddings} positions, "
            f"{m.hidden_act}")
    if from_discriminator:
        note += ("; MLM continues from its ELECTRA discriminator (embeddings and layers), the MLM head starts "
                 "freshly initialised")
    return config, (note,)


# EncoderConfig fields that are how a run computes, not what the weights are (free to differ from init_from).
_FREE_FIELDS = ("hidden_dropout", "attention_dropout", "initializer_range", "dtype", "remat", "attention",
                "last_layer", "scan_unroll", "kernels")


def check_config(config: ConfigDict, manifest: Manifest, num_devices: int, process_count: int = 1) -> Derived:
    """Everything that can be known wrong before compiling. Raises ConfigError."""
    d, t, m = config.data, config.train, config.model
    where = manifest_lib.path(d.dir)
    if config.objective.name not in OBJECTIVES:
        raise ConfigError(f"objective.name={config.objective.name!r}: choose one of {sorted(OBJECTIVES)}")
    if d.seq_len != manifest.seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} differs from seq_len={manifest.seq_len} in {where}")
    offset = m.get("position_offset", 0)
    if d.seq_len > m.max_position_embeddings - offset:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}" + (f" less model.position_offset={offset}" if offset else ""))
    if offset and offset != manifest.special_ids.pad + 1:
        # Hugging Face's RoBERTa gives padding row padding_idx = pad_token_id and real tokens the rows after it.
        raise ConfigError(f"model.position_offset={offset}: RoBERTa's positions start right after the padding id, "
                          f"so it must be {manifest.special_ids.pad + 1} (the padding id of {where} is "
                          f"{manifest.special_ids.pad})")
    vocab_size = manifest.vocab_size if m.vocab_size == -1 else m.vocab_size
    if vocab_size != manifest.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} differs from vocab_size={manifest.vocab_size} "
                          f"in {where} (use -1 to take the manifest's)")
    try:
        mesh_shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
        rules = sharding.rules_from_config(config.mesh.get("rules"))
        profiling.parse_steps(t.profile_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_batch(config, mesh_shape[0] * mesh_shape[1], process_count)
    _check_kernels(config, mesh_shape)
    if t.eval_every > 0:
        _check_eval(config, manifest, process_count)
    return Derived(vocab_size, mesh_shape, rules)


def _check_kernels(config: ConfigDict, mesh_shape) -> None:
    """The fused AdamW kernel keeps flat, replicated moments: AdamW only, data parallelism only."""
    kernels = config.model.get("kernels", "")
    if "adamw" not in parse_kernels(kernels):
        return
    if config.optim.name != "adamw":
        raise ConfigError(f"model.kernels={kernels!r} has the fused AdamW kernel, but optim.name="
                          f"{config.optim.name!r}: drop 'adamw' from model.kernels or use optim.name=adamw")
    if mesh_shape[1] != 1 or mesh_shape[2] != 1:
        raise ConfigError(f"model.kernels={kernels!r}: the fused AdamW kernel keeps replicated moments; it needs "
                          f"mesh.fsdp=1 and mesh.tensor=1, not {mesh_shape[1]} and {mesh_shape[2]}")


def _check_batch(config: ConfigDict, batch_shards: int, process_count: int) -> None:
    t, accum = config.train, config.optim.grad_accum_steps
    for key, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size),
                       ("train.log_every", t.log_every), ("optim.grad_accum_steps", accum)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if t.batch_size % (accum * batch_shards) or t.batch_size % process_count:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by optim.grad_accum_steps={accum} "
                          f"x data*fsdp devices={batch_shards} and by the {process_count} processes")


def _check_eval(config: ConfigDict, manifest: Manifest, process_count: int) -> None:
    d, t = config.data, config.train
    rows = manifest.rows("validation")
    if rows < t.batch_size:
        raise ConfigError(f"the validation split of {d.dir} has {rows} rows, fewer than one batch of "
                          f"train.batch_size={t.batch_size}; set train.eval_every=0 or add data")
    host_batch = t.batch_size // process_count
    if not input_pipeline.eval_batch_count(manifest, "validation", host_batch, process_count, 1):
        raise ConfigError(f"the validation split of {d.dir} gives some of the {process_count} processes fewer "
                          f"rows than one host batch of {host_batch}; set train.eval_every=0")


def _optim_config(config: ConfigDict) -> optim.OptimConfig:
    o = config.optim
    return optim.OptimConfig(name=o.name, learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                             total_steps=config.train.steps, schedule=o.schedule, end_lr_ratio=o.end_lr_ratio,
                             weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)


def _masking_spec(config: ConfigDict, manifest: Manifest, vocab_size: int) -> MaskingSpec:
    o = config.objective
    word_starts = tokenization.word_start_table(config.data.dir, manifest) if o.whole_word_masking else None
    return MaskingSpec(vocab_size=vocab_size, mask_id=manifest.special_ids.mask, pad_id=manifest.special_ids.pad,
                       special_ids=special_ids_tuple(manifest.special_token_ids), mask_rate=o.mask_rate,
                       max_predictions=o.max_predictions, mask_token_rate=o.mask_token_rate,
                       random_token_rate=o.random_token_rate, word_starts=word_starts)


def _mlm_setup(config: ConfigDict, model_cfg: EncoderConfig, spec: MaskingSpec):
    """BERT: -> (objective, model builder from nnx.Rngs, generator config: None)."""
    del config
    check_bert_config(model_cfg)
    return objectives.MlmObjective(spec), lambda rngs: BertForMaskedLM(model_cfg, rngs), None


def _electra_setup(config: ConfigDict, model_cfg: EncoderConfig, spec: MaskingSpec):
    """ELECTRA: `model` is the discriminator; the generator is derived from it (recorded in the checkpoint
    meta, so that each tower can be rebuilt and exported on its own)."""
    o = config.objective
    gen_cfg = generator_config(model_cfg, o.generator_fraction, o.generator_layers)
    objective = objectives.ElectraObjective(spec, disc_weight=o.disc_weight, temperature=o.sampling_temperature)
    return objective, lambda rngs: ElectraForPretraining(model_cfg, gen_cfg, rngs), gen_cfg


def _deberta_rtd_setup(config: ConfigDict, model_cfg: EncoderConfig, spec: MaskingSpec):
    """DeBERTa-v3: ELECTRA's objective on two DeBERTa towers with gradient-disentangled embedding sharing
    (models/deberta.py). The generator is as wide as the discriminator (its word embeddings are shared) and
    objective.generator_layers deep; recorded in the checkpoint meta as ELECTRA's."""
    o = config.objective
    gen_cfg = generator_config(model_cfg, o.generator_fraction, o.generator_layers)
    check_deberta_towers(model_cfg, gen_cfg)
    objective = objectives.ElectraObjective(spec, disc_weight=o.disc_weight, temperature=o.sampling_temperature)
    return objective, lambda rngs: DebertaRtdForPretraining(model_cfg, gen_cfg, rngs), gen_cfg


# objective.name -> its set-up: the one place where the objective's name chooses code.
OBJECTIVES = {"mlm": _mlm_setup, "electra": _electra_setup, "deberta_rtd": _deberta_rtd_setup}
# The objectives with a generator tower (its fraction and depth recorded in the checkpoint meta).
TWO_TOWERS = ("electra", "deberta_rtd")


def _build_objective(config: ConfigDict, manifest: Manifest, vocab_size: int):
    """-> (model config, objective, build_model, generator config) of `objective.name`, attending within each
    packed document (segments and positions from each piece's [CLS]) where `data.document_attention`.
    ValueError on a bad field."""
    model_cfg = EncoderConfig.from_section(config.model, vocab_size)
    spec = _masking_spec(config, manifest, vocab_size)
    objective, build_model, gen_cfg = OBJECTIVES[config.objective.name](config, model_cfg, spec)
    if config.data.document_attention:
        objective = dataclasses.replace(objective, document_cls_id=manifest.special_ids.cls)
    return model_cfg, objective, build_model, gen_cfg


def build_run(config: ConfigDict, manifest: Manifest, derived: Derived, devices=None) -> Run:
    """The model, objective, optimizer, mesh, state layout and jitted steps of `config` on `devices` (default
    all), from `check_config`'s `derived`. Nothing is allocated or compiled. ConfigError on a bad field."""
    try:  # the typed configs validate their own fields
        model_cfg, objective, build_model, gen_cfg = _build_objective(config, manifest, derived.vocab_size)
        optim_cfg = _optim_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mesh = sharding.make_mesh(*derived.mesh_shape, devices=devices)
    tx = optim.make_optimizer(optim_cfg, fused="adamw" in model_cfg.kernels)
    seed = config.train.seed
    model_fn = lambda: build_model(nnx.Rngs(seed))  # noqa: E731
    layout = train_state.state_layout(model_fn, tx, mesh, derived.rules)
    batch_sharding = sharding.batch_sharding(mesh)
    step = train_step.make_train_step(layout, batch_sharding, tx=tx, objective=objective,
                                      accum_steps=config.optim.grad_accum_steps)
    eval_step = train_step.make_eval_step(layout, batch_sharding, objective=objective)
    return Run(model_cfg=model_cfg, generator_cfg=gen_cfg, objective_name=config.objective.name,
               objective=objective, optim_cfg=optim_cfg, mesh=mesh, rules=derived.rules, tx=tx, model_fn=model_fn,
               layout=layout, batch_sharding=batch_sharding, step=step, eval_step=eval_step, manifest=manifest,
               data=input_pipeline.InputSettings.from_section(config.data),
               train=TrainSettings.from_section(config.train),
               checkpoint=CheckpointSettings.from_section(config.checkpoint),
               max_predictions=config.objective.max_predictions, init_from=config.init_from, notes=(),
               config_text=str(config), config_json=config.to_json_best_effort(indent=2))


def config_dict(run: Run) -> dict:
    """The resolved config as a plain dict (recorded in each checkpoint's meta)."""
    return json.loads(run.config_json)
