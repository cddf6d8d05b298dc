"""The workdir: the one module that knows its layout and the metadata saved with each checkpoint.

    W/checkpoints/<step>/      orbax: the training state + `CheckpointMeta` as JSON (bert_jax.checkpointing)
    W/checkpoints-bad/         checkpoints that failed their fingerprint, kept for a post-mortem
    W/config.json              the resolved config of the run that started the workdir
    W/data_manifest.json       a copy of the dataset's manifest (data_pipeline.manifest)
    W/tokenizer/               the tokenizer files (training copies the dataset's; import_from_hf the folder's)
    W/hf_extras/<model>/       what an imported HF folder held that we do not train (pooler, other heads, buffers,
                               its config.json, its sentence-transformers modules), written back by the export
                               (bert_jax.hf_extras); training with init_from carries it along (`copy_hf_extras`)
    W/metrics.jsonl            one JSON object per log line (bert_jax.metrics)
    W/tensorboard/             the same scalars as TensorBoard event files
    W/profile/                 jax.profiler traces, when asked for
    W/lock-<process>           held by a running training process (bert_jax.fault.WorkdirLock)

W may be an object-store URL (gs://bucket/run): every path is built and read through `data_pipeline.paths`.

Training (`bert_jax.trainer`) and `tools.import_from_hf` both write checkpoints whose meta is a
`CheckpointMeta`; resume checks, conversion, init_from and the FLOPs count read it back through
`CheckpointMeta.from_json`, which also reads checkpoints written before this dataclass existed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bert_jax.models.config import EncoderConfig
from data_pipeline import paths

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
DATA_MANIFEST = "data_manifest.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
HF_EXTRAS = "hf_extras"


def checkpoints(workdir: str) -> str:
    return paths.join(workdir, CHECKPOINTS)


def config_file(workdir: str) -> str:
    return paths.join(workdir, CONFIG)


def data_manifest(workdir: str) -> str:
    return paths.join(workdir, DATA_MANIFEST)


def tokenizer(workdir: str) -> str:
    return paths.join(workdir, TOKENIZER)


def metrics(workdir: str) -> str:
    return paths.join(workdir, METRICS)


def tensorboard(workdir: str) -> str:
    return paths.join(workdir, TENSORBOARD)


def profile(workdir: str) -> str:
    return paths.join(workdir, PROFILE)


def hf_extras(workdir: str) -> str:
    return paths.join(workdir, HF_EXTRAS)


def copy_hf_extras(src_workdir: str, dst_workdir: str) -> bool:
    """Carries `src_workdir`'s hf_extras (an import's, or a run's that started from one) into `dst_workdir`,
    replacing any there; -> whether there was any. `src_workdir` may also be its checkpoints folder, as
    init_from may name it. Either may be an object-store URL."""
    src = hf_extras(src_workdir)
    if not paths.isdir(src) and paths.basename(src_workdir.rstrip("/")) == CHECKPOINTS:
        src = hf_extras(paths.dirname(src_workdir.rstrip("/")))
    if not paths.isdir(src):
        return False
    dst = hf_extras(dst_workdir)
    if paths.abspath(src) != paths.abspath(dst):
        paths.rmtree(dst)
        paths.copy_tree(src, dst)
    return True


def lock(workdir: str, process_index: int) -> str:
    return paths.join(workdir, f"lock-{process_index}")


def _encoder_config(fields: dict) -> EncoderConfig:
    """An EncoderConfig from its saved fields; fields added since the checkpoint was written take their defaults
    (e.g. `hidden_act`: checkpoints from before it trained the exact GELU, the default)."""
    known = {f.name for f in dataclasses.fields(EncoderConfig)}
    return EncoderConfig(**{k: v for k, v in fields.items() if k in known})


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """The JSON saved beside each checkpoint's state.

    `model` is the trained model's config (ELECTRA: the discriminator's) and `generator` ELECTRA's generator;
    `data` the reader's position (data_pipeline.dataset.Plan.position); `vocab_hash` and `manifest_sha256` tie
    the checkpoint to its data; `config` is the resolved run config; `imported_from` says where
    tools.import_from_hf took the weights from and which parts started freshly initialised; `fingerprint`
    is added by the checkpointer (bert_jax.checkpointing)."""

    step: int
    objective: str
    model: EncoderConfig
    generator: EncoderConfig | None = None
    vocab_hash: str | None = None
    data: dict | None = None
    manifest_sha256: str | None = None
    config: dict | None = None
    imported_from: dict | None = None
    fingerprint: dict | None = None

    def tower(self, name: str) -> EncoderConfig | None:
        """The config of one exported model: "mlm" / "discriminator" -> `model`, "generator" -> `generator`
        (and so for DeBERTa's "deberta_*" kinds)."""
        return self.generator if name.endswith("generator") else self.model

    @property
    def data_batches(self) -> int:
        """Batches the training stream had consumed at this checkpoint (the step, for checkpoints that predate
        the recorded data position)."""
        return int((self.data or {}).get("batches_consumed", self.step))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"step": self.step, "objective": self.objective,
                               "model": dataclasses.asdict(self.model)}
        if self.generator is not None:
            out["generator"] = dataclasses.asdict(self.generator)
        for key in ("vocab_hash", "data", "manifest_sha256", "config", "imported_from", "fingerprint"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, meta: dict) -> "CheckpointMeta":
        """Reads the meta of any checkpoint of ours, including those written before this dataclass (whose
        import provenance sat in top-level keys)."""
        imported = meta.get("imported_from")
        if isinstance(imported, str):  # the keys tools.import_from_hf wrote before
            imported = {"hf": imported, "generator": meta.get("generator_imported_from"),
                        "initialised": [k[:-len("_initialised")] for k, v in meta.items()
                                        if k.endswith("_initialised") and v]}
        return cls(step=int(meta.get("step", 0)), objective=meta.get("objective", "mlm"),
                   model=_encoder_config(meta["model"]),
                   generator=_encoder_config(meta["generator"]) if meta.get("generator") else None,
                   vocab_hash=meta.get("vocab_hash"), data=meta.get("data"),
                   manifest_sha256=meta.get("manifest_sha256"), config=meta.get("config"),
                   imported_from=imported, fingerprint=meta.get("fingerprint"))
