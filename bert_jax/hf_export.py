"""Export: one checkpoint of ours -> the files of a Hugging Face transformers folder.

    source = hf_export.load(workdir, model="mlm", step=None)   # checkpoint, tower config, tokenizer, special ids
    summary = hf_export.write(source, out)                     # config.json, model.safetensors, tokenizer files
    source = hf_export.load(workdir, sentence_transformers=True)  # ... written as a sentence-transformers folder

`model` is the exported kind: `mlm` (a BERT checkpoint) as BertForMaskedLM, `roberta_mlm` (an MLM checkpoint
whose positions start after the padding id: configs/roberta.py, an imported RoBERTa) as RobertaForMaskedLM (the
position table as it is, with RoBERTa's two leading rows; config.json's pad_token_id says where); from an
ELECTRA checkpoint,
`discriminator` as ElectraForPreTraining or `generator` as ElectraForMaskedLM (each with the shared embeddings;
ElectraConfig with that tower's sizes and embedding_size). The tensors come from `models.hf_mapping`; the
MLM decoder weight is tied to the word embeddings and not written. The tokenizer files (vocab.txt,
tokenizer.json, tokenizer_config.json, special_tokens_map.json) let `AutoTokenizer` load the folder offline.
A workdir that started from an imported folder (tools.import_from_hf, directly or through init_from) also
holds what that folder had beyond our parameters (`bert_jax.hf_extras`: the pooler, other heads, its config,
its sentence-transformers modules): the export writes it back, so that it holds every tensor the original had,
and a sentence-transformers folder exports as one (a bare encoder, our head beside it in HEAD_FILE).
`sentence_transformers=True` exports any checkpoint so: the same layout, with the module files of a mean-pooled
encoder (`hf_extras.with_sentence_transformers`) where the workdir kept none.

Writing needs numpy and safetensors only. Loading the folder back into transformers to compare outputs
(`tools.convert_to_hf --verify`) needs torch, so it lives in the tool; `run_model` gives our side of that
comparison. Bad input raises `ConversionError`, one line, which the CLIs print as `error: <message>`;
`bert_jax.hf_import` raises it too.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from bert_jax import hf_extras, sharding
from bert_jax import workdir as workdir_lib
from bert_jax.checkpointing import Checkpointer, load_params
from bert_jax.models import MODEL_CLASSES, EncoderConfig, hf_mapping
from bert_jax.workdir import CheckpointMeta
from bert_jax.models.deberta import fold_shared_embeddings
from data_pipeline import manifest as manifest_lib
from data_pipeline import paths
from data_pipeline.manifest import SpecialIds
from data_pipeline.tokenization import SPM_FILE, Tokenizer

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# objective recorded in the checkpoint meta -> the model kinds it can export.
EXPORTABLE = {"mlm": ("mlm",), "electra": ("discriminator", "generator"),
              "deberta_rtd": ("deberta_discriminator", "deberta_generator")}
# An MLM run of the DeBERTa backbone (model.relative_attention) exports as DebertaV2ForMaskedLM.
DEBERTA_MLM = ("deberta_mlm",)
# Files of a Hugging Face folder: the weights a loader may pick (ours is the first), and the tokenizer's.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Our trained head, beside an export laid out as a bare encoder (a sentence-transformers folder's), where no
# loader looks: `model.load_state_dict(safetensors.torch.load_file(...), strict=False)` puts it back.
HEAD_FILE = "{model}_head.safetensors"


class ConversionError(ValueError):
    """Input that conversion (either way) cannot handle: a missing checkpoint, step or file, a folder that would
    be overwritten, a model our encoder cannot represent. The message is one line naming what is at fault."""


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """What one export reads from a workdir: the checkpoint's step and params (ELECTRA: both towers), the
    exported `model` kind with its tower's config, the tokenizer with the special ids the data used, and what
    an imported folder held beyond our parameters (None for a workdir that did not start from one)."""

    workdir: str
    step: int
    model: str
    config: EncoderConfig
    params: dict
    tokenizer: Tokenizer
    special_ids: SpecialIds
    extras: hf_extras.Extras | None = None


def check_request(model: str, out: str, overwrite: bool) -> None:
    """Refuses an unknown `model` kind, and an `out` folder with files in it unless `overwrite`: checks that cost
    nothing, made before the (slow) restore."""
    _check_model(model)
    _check_out(out, overwrite)


def _check_model(model: str | None) -> None:
    if model is not None and model not in MODEL_CLASSES:
        raise ConversionError(f"--model {model!r}: choose one of {list(MODEL_CLASSES)}")


def _check_out(out: str, overwrite: bool) -> None:
    if paths.is_remote(out):
        raise ConversionError(f"--out {out}: the Hugging Face folder must be local (transformers reads local "
                              "folders); --workdir may be on object storage")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace its files")


def _checkpoint_steps(workdir: str) -> tuple[str, list[int]]:
    """(checkpoints folder, its committed steps); ConversionError when there is none."""
    directory = workdir_lib.checkpoints(workdir)
    if not paths.isdir(directory):  # checked first: the Checkpointer would create the folder
        raise ConversionError(f"{workdir} holds no checkpoints (no {directory} folder)")
    # read_only: a reader must not clean up the temporary folders of a run that may be saving right now.
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        steps = sorted(ckpt.all_steps())
    finally:
        ckpt.close()
    if not steps:
        raise ConversionError(f"{directory} holds no checkpoints")
    return directory, steps


def load(workdir: str, model: str | None = "mlm", step: int | None = None,
         sentence_transformers: bool = False) -> ExportSource:
    """Reads checkpoint `step` (default: the newest) of `workdir` for exporting `model` (None: the first kind
    the checkpoint exports, e.g. deberta_mlm for a DeBERTa MLM run) (as a sentence-transformers folder when
    `sentence_transformers`); ConversionError when the checkpoint cannot export it or its tokenizer does not
    fit the model."""
    _check_model(model)
    directory, steps = _checkpoint_steps(workdir)
    if step is not None and step not in steps:
        raise ConversionError(f"step {step} not found in {directory}; available steps: {steps}")
    params, meta = load_params(workdir, step)
    if model is None and exportable(meta):
        model = exportable(meta)[0]
    if model not in exportable(meta):
        raise ConversionError(f"--model {model} is not available for this checkpoint (objective {meta.objective}); "
                              f"available: {list(exportable(meta))}")
    if model == "deberta_discriminator":
        params = fold_shared_embeddings(params)
    cfg = meta.tower(model)
    if cfg is None:
        raise ConversionError(f"the checkpoint meta has no 'generator' entry: cannot rebuild --model {model}")
    tokenizer = _load_tokenizer(workdir_lib.tokenizer(workdir))
    special_ids = _special_ids(workdir, tokenizer)
    if hf_mapping.MODELS[model].model_type == "roberta":
        try:
            hf_mapping.check_roberta(cfg, special_ids.pad)
        except ValueError as e:
            raise ConversionError(f"{workdir}: {e}") from None
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConversionError(f"the tokenizer in {workdir_lib.tokenizer(workdir)} has {tokenizer.vocab_size} "
                              f"tokens, the model's vocab_size is {cfg.vocab_size}")
    extras = hf_extras.load(workdir, model)
    if sentence_transformers:
        # max_seq_length: what the positions (and the exported tokenizer's model_max_length) allow.
        extras = hf_extras.with_sentence_transformers(extras, model, cfg.hidden_size, cfg.max_length)
    return ExportSource(workdir=workdir, step=meta.step, model=model, config=cfg, params=params,
                        tokenizer=tokenizer, special_ids=special_ids, extras=extras)


def exportable(meta: CheckpointMeta) -> tuple[str, ...]:
    """The model kinds a checkpoint of `meta` exports (the first: the default). An MLM run whose positions
    start after the padding id (position_offset: configs/roberta.py or an imported RoBERTa) is a RoBERTa; one
    with relative attention a DeBERTa."""
    if meta.objective == "mlm" and meta.model.relative_attention:
        return DEBERTA_MLM
    if meta.objective == "mlm" and meta.model.position_offset:
        return ("roberta_mlm",)
    return EXPORTABLE.get(meta.objective, ())


def _load_tokenizer(tokenizer_dir: str) -> Tokenizer:
    """Our tokenizer in `tokenizer_dir`: a WordPiece vocabulary (vocab.txt), a SentencePiece model (spm.model) or a
    tokenizer.json (an imported SentencePiece-based or byte-level one; vocab.json + merges.txt too); each kind
    writes its Hugging Face tokenizer files (`Tokenizer.save_hf`)."""
    if not any(paths.isfile(paths.join(tokenizer_dir, n)) for n in ("vocab.txt", SPM_FILE, "tokenizer.json",
                                                                     "vocab.json")):
        raise ConversionError(f"no tokenizer vocabulary at {paths.join(tokenizer_dir, 'vocab.txt')} "
                              f"(nor a SentencePiece model at {paths.join(tokenizer_dir, SPM_FILE)}, nor a "
                              f"tokenizer.json)")
    return Tokenizer.load(tokenizer_dir)


def _special_ids(workdir: str, tokenizer: Tokenizer) -> SpecialIds:
    """The special-token ids: those of the data manifest the run trained on when the workdir has its copy,
    else the tokenizer's (an imported checkpoint has no data yet)."""
    file = workdir_lib.data_manifest(workdir)
    if paths.isfile(file):
        return manifest_lib.read(file).special_ids
    return SpecialIds(pad=tokenizer.pad_id, unk=tokenizer.unk_id, cls=tokenizer.cls_id, sep=tokenizer.sep_id,
                      mask=tokenizer.mask_id)


def write(source: ExportSource, out: str, overwrite: bool = False) -> dict:
    """Writes the Hugging Face folder `out` (config.json, model.safetensors, tokenizer files, and what an
    imported folder held beyond our parameters); -> a summary dict (out, step, model, architecture(s),
    tensors, parameters, the kept tensors and sentence-transformers files, the head file if any)."""
    _prepare_out(out, overwrite)
    cfg, extras = source.config, source.extras
    files = hf_extras.assemble(hf_mapping.to_hf(source.params, cfg, source.model), extras, source.model)
    save_file(files.tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    head_file = HEAD_FILE.format(model=source.model) if files.head else None
    if head_file:
        save_file(files.head, os.path.join(out, head_file), metadata={"format": "pt"})
    config = hf_extras.export_config(hf_mapping.hf_config(cfg, source.special_ids.pad, source.model), extras,
                                     files.architectures)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    _write_tokenizer(source.tokenizer, out, cfg.max_length)
    st_files = hf_extras.copy_files(extras, out)
    return {"out": os.path.abspath(out), "step": source.step, "model": source.model,
            "architecture": files.architectures[0], "architectures": files.architectures,
            "tensors": len(files.tensors),
            "parameters": int(sum(t.size for t in [*files.tensors.values(), *files.head.values()])),
            "kept_tensors": len(extras.tensors) if extras else 0, "sentence_transformers_files": st_files,
            "head_file": head_file}


def _prepare_out(out: str, overwrite: bool) -> None:
    _check_out(out, overwrite)
    if os.path.isdir(out):
        # Only what we write, plus weight files a loader could prefer over ours; anything else stays.
        heads = tuple(HEAD_FILE.format(model=m) for m in MODEL_CLASSES)
        for name in ("config.json",) + WEIGHT_FILES + TOKENIZER_FILES + heads:
            path = os.path.join(out, name)
            if os.path.isfile(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)


def _write_tokenizer(tokenizer: Tokenizer, out: str, max_length: int) -> None:
    """The tokenizer files of either kind (WordPiece: vocab.txt, tokenizer.json, BertTokenizer configs;
    SentencePiece: a tokenizer.json built from the model, PreTrainedTokenizerFast configs)."""
    tokenizer.save_hf(out, max_length)


def run_model(cfg: EncoderConfig, params: dict, input_ids, attention_mask, token_type_ids,
              model: str = "mlm") -> tuple[np.ndarray, np.ndarray]:
    """Our `model` kind, deterministic and in float32, on [B, S] int inputs -> (last hidden states [B, S, H],
    logits: [B, S, V] for mlm and generator, [B, S] for the discriminator). For ELECTRA, `cfg` is the tower's
    and `params` may hold both towers."""
    # How the training ran (bf16, remat, cuDNN attention on a GPU, the scan's unroll) does not change the
    # function: float32 and the plain paths here, on whatever machine converts.
    cfg = dataclasses.replace(cfg, dtype="float32", remat="none", attention="einsum", scan_unroll=1,
                              kernels=())
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    graphdef, abstract, _ = sharding.abstract_params(lambda: MODEL_CLASSES[model](cfg, nnx.Rngs(0)), mesh)

    @jax.jit
    def forward(p, ids, mask, types):
        return nnx.merge(graphdef, p).hidden_and_logits(ids, mask, types)

    with jax.set_mesh(mesh):
        # A stand-alone ELECTRA tower is the same paths as in the pretraining tree, less the other tower.
        p = jax.tree.map(jax.numpy.asarray, {k: params[k] for k in abstract})
        h, logits = forward(p, *(np.asarray(x, np.int32) for x in (input_ids, attention_mask, token_type_ids)))
    return np.asarray(h), np.asarray(logits)
