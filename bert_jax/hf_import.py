"""Import: a Hugging Face BERT, RoBERTa or ELECTRA folder -> a step-0 checkpoint of ours (e.g. to continue pretraining).

    summary = hf_import.import_hf(hf_dir, workdir)                              # BERT
    summary = hf_import.import_hf(disc_dir, workdir, generator_dir=gen_dir)     # ELECTRA

Reads config.json and the weights, accepts `bert.`-prefixed names (BertForMaskedLM, BertForPreTraining) and bare
ones (`embeddings.*`, `encoder.*`, as BertModel writes them), and writes `W/checkpoints/0/` ({"params": ...} and a
`CheckpointMeta` whose `imported_from` names the folders and the parts that started fresh) and `W/tokenizer/`
(the folder's tokenizer files). `bert_jax.checkpointing.load_params(W)` reads it back. A folder without the MLM
head (a bare encoder) gets a freshly initialised one, with our initialiser. What the folder holds that we do not
train (the pooler, an NSP or other head, buffers; its config.json; a sentence-transformers folder's modules) is
kept in `W/hf_extras/` (`bert_jax.hf_extras`) for the export to write back. Architectures our encoder cannot
represent (BERT's relative position_embedding_type, another activation, a decoder) raise `ConversionError` (one
line).

DeBERTa-v2/v3 (model_type "deberta-v2": DebertaV2ForMaskedLM, or a bare DebertaV2Model whose MLM head then starts
fresh) becomes an MLM run's tree on our encoder with disentangled attention (model kind "deberta_mlm"); a
convolution layer (v2-xlarge), separate position projections or the non-legacy MLM head are refused.

RoBERTa (config.json model_type "roberta"; RobertaForMaskedLM, or a bare RobertaModel whose head then starts fresh)
is the same model of ours (objective mlm, exported as `roberta_mlm`) with `position_offset` = its pad_token_id + 1:
its positions start after the padding id. Its byte-level tokenizer files (tokenizer.json, vocab.json, merges.txt)
and any other tokenizer.json (e.g. a SentencePiece-based one) are copied with the rest; `Tokenizer.load` reads them.

ELECTRA (config.json model_type "electra"): `hf_dir` is the discriminator (ElectraForPreTraining, or a bare
ElectraModel whose head then starts fresh) and `generator_dir` an ElectraForMaskedLM; together they become one
ElectraForPretraining tree {"embeddings", "generator", "discriminator"} with objective "electra". Jointly
trained ELECTRA shares one embedding block, so the two folders' embeddings must be identical (else refused).
Without a generator folder the generator starts freshly initialised at `generator_fraction` of the
discriminator's width.

Weights are read by `read_weights` (model.safetensors or a sharded model.safetensors.index.json, with numpy);
tools.import_from_hf passes a reader that also takes bfloat16 tensors and pytorch_model.bin, which need torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from bert_jax import hf_extras, sharding
from bert_jax import workdir as workdir_lib
from bert_jax.checkpointing import Checkpointer
from bert_jax.hf_export import TOKENIZER_FILES, ConversionError
from bert_jax.models import MODEL_CLASSES, ElectraForPretraining, EncoderConfig, hf_mapping
from bert_jax.models.electra import check_towers, generator_config
from bert_jax.workdir import CheckpointMeta
from data_pipeline import paths
from data_pipeline.progress import progress
from data_pipeline.tokenization import Tokenizer

Log = Callable[[str], None]
ReadWeights = Callable[[str], dict]


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """{name: numpy array} of one safetensors file; TypeError for dtypes numpy lacks (bfloat16)."""
    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_weights(hf_dir: str, read_file: Callable[[str], dict] = read_safetensors_file,
                 read_bin: Callable[[str], dict] | None = None) -> dict:
    """{HF name: array} from the folder's weight file(s): model.safetensors, the shards a
    model.safetensors.index.json lists (each through `read_file`), or pytorch_model.bin through `read_bin`."""
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    bin_file = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(single):
        return read_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(read_file(os.path.join(hf_dir, shard)))
        return tensors
    if os.path.isfile(bin_file) and read_bin is not None:
        return read_bin(bin_file)
    if os.path.isfile(bin_file):
        raise ConversionError(f"{bin_file}: reading pytorch_model.bin needs torch (use tools.import_from_hf)")
    raise ConversionError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_config(hf_dir: str, model_types: tuple[str, ...] = ("bert",)) -> tuple[EncoderConfig, dict]:
    """-> (EncoderConfig, the config.json dict); ConversionError for what we cannot represent."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no config.json")
    with open(path, encoding="utf-8") as f:
        hf_config = json.load(f)
    try:
        if hf_config.get("model_type") == "deberta-v2" and "deberta-v2" in model_types:
            return EncoderConfig(**hf_mapping.deberta_config_kwargs(hf_config)), hf_config
        return EncoderConfig(**hf_mapping.encoder_config_kwargs(hf_config, model_types)), hf_config
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{hf_dir}: {e}") from None


def _model_type(hf_dir: str) -> str | None:
    """config.json's model_type, or None where there is no readable config (read_config then says why)."""
    try:
        with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def init_params(model_fn: Callable[[], nnx.Module]) -> dict:
    """The params of `model_fn()` initialised as training would start them, as a numpy nested dict."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    _, _, shardings = sharding.abstract_params(model_fn, mesh)
    return jax.tree.map(np.asarray, sharding.init_params(model_fn, mesh, shardings))


def _electra_fn(disc_cfg: EncoderConfig, gen_cfg: EncoderConfig, seed: int = 0) -> Callable[[], nnx.Module]:
    return lambda: ElectraForPretraining(disc_cfg, gen_cfg, nnx.Rngs(seed))


def _electra_shapes(disc_cfg: EncoderConfig, gen_cfg: EncoderConfig) -> dict[str, tuple]:
    """{path: shape} of the ElectraForPretraining tree, without allocating it."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    _, abstract, _ = sharding.abstract_params(_electra_fn(disc_cfg, gen_cfg), mesh)
    return {path: tuple(x.shape) for path, x in _flat(abstract).items()}


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a/b/c": leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _leaves(tree: dict) -> Iterator:
    for value in tree.values():
        yield from (_leaves(value) if isinstance(value, dict) else (value,))


def _from_hf(tensors: dict, cfg: EncoderConfig, model: str, where: str, fallback: dict | None) -> dict:
    """hf_mapping.from_hf, its errors as one ConversionError line naming the folder."""
    try:
        return hf_mapping.from_hf(tensors, cfg, model, fallback=fallback)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{where}: {e.args[0] if e.args else e}") from None


def _prepare_workdir(out_workdir: str, overwrite: bool) -> None:
    """Empties the workdir's checkpoints, tokenizer and kept extras when `overwrite`; refuses to clobber them
    otherwise."""
    ckpt_dir, tok_dir = workdir_lib.checkpoints(out_workdir), workdir_lib.tokenizer(out_workdir)
    if paths.exists(ckpt_dir) and paths.listdir(ckpt_dir):
        if not overwrite:
            raise ConversionError(f"{ckpt_dir} already exists; pass --overwrite to replace it")
        paths.rmtree(ckpt_dir)
        paths.rmtree(tok_dir)
    # No checkpoint: what an earlier, interrupted import kept belongs to no one.
    paths.rmtree(workdir_lib.hf_extras(out_workdir))


# The tokenizer files an import copies: an export's, and a byte-level BPE's vocab.json + merges.txt (RoBERTa).
IMPORT_TOKENIZER_FILES = TOKENIZER_FILES + ("vocab.json", "merges.txt")


def _copy_tokenizer(hf_dir: str, tok_dir: str, log: Log) -> list[str]:
    """Copies the HF tokenizer files of `hf_dir` into `tok_dir`; -> the names copied."""
    paths.makedirs(tok_dir)
    copied = [n for n in IMPORT_TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    for name in copied:
        paths.copy(os.path.join(hf_dir, name), paths.join(tok_dir, name))
    if not _has_vocabulary(copied):
        log(f"{hf_dir} has no vocab.txt, tokenizer.json or vocab.json + merges.txt: {tok_dir} has no vocabulary, "
            "add it before training/export")
    return copied


def _has_vocabulary(names: list[str]) -> bool:
    """Whether tokenizer files `names` hold a vocabulary `Tokenizer.load` reads (WordPiece's vocab.txt, any
    tokenizer.json: SentencePiece-based, byte-level, ...; a byte-level vocab.json + merges.txt)."""
    return "vocab.txt" in names or "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= set(names)


def _vocab_hash(tok_dir: str, log: Log) -> str | None:
    """The vocabulary hash our data pipeline records (so a manifest built from it can be matched)."""
    try:
        return Tokenizer.load(tok_dir).vocab_hash
    except Exception as e:  # pylint: disable=broad-except  # a hash is a nicety, the import stands
        log(f"could not hash the vocabulary ({e})")
        return None


def _keep(folders: dict[str, tuple[str, dict]], out_workdir: str, log: Log) -> dict:
    """Keeps what each HF folder ({model: (folder, its tensors not imported)}) holds beyond our parameters
    (bert_jax.hf_extras); -> {"tensors": names, "files": sentence-transformers files} over all folders."""
    kept: dict = {"tensors": [], "files": []}
    for model, (hf_dir, tensors) in folders.items():
        extras = {n: tensors[n] for n in hf_mapping.extra_names(tensors, model)}
        done = hf_extras.keep(hf_dir, extras, out_workdir, model)
        kept["tensors"] += done["tensors"]
        kept["files"] += done["files"]
    if kept["tensors"] or kept["files"]:
        log(f"kept for the export in {workdir_lib.hf_extras(out_workdir)} (not trained): "
            f"{', '.join(kept['tensors'] + kept['files'])}")
    return kept


def _save(hf_dir: str, out_workdir: str, params: dict, meta: CheckpointMeta, log: Log) -> list[str]:
    """Copies the tokenizer files and writes step 0 ({"params": params} + meta, with the vocabulary hash when
    there is a vocabulary); -> the tokenizer files copied. The extras are kept (`_keep`) before: a checkpoint
    0 means the import is complete."""
    ckpt_dir, tok_dir = workdir_lib.checkpoints(out_workdir), workdir_lib.tokenizer(out_workdir)
    copied = _copy_tokenizer(hf_dir, tok_dir, log)
    meta = dataclasses.replace(meta, vocab_hash=_vocab_hash(tok_dir, log) if _has_vocabulary(copied) else None)
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        ckpt.save(0, {"params": params}, meta)
        ckpt.wait()
    finally:
        ckpt.close()
    return copied


def _provenance(hf_dir: str, generator_dir: str | None, initialised: dict[str, bool]) -> dict:
    """CheckpointMeta.imported_from: the folders, and the parts that started freshly initialised."""
    return {"hf": os.path.abspath(hf_dir), "generator": os.path.abspath(generator_dir) if generator_dir else None,
            "initialised": [name for name, fresh in initialised.items() if fresh]}


def _report_ignored(ignored: list[str], log: Log) -> None:
    if ignored:
        log(f"not imported into our model (no place in it, or tied copies): {', '.join(ignored)}")


def import_hf(hf_dir: str, out_workdir: str, *, overwrite: bool = False, generator_dir: str | None = None,
              generator_fraction: float = 0.25, read: ReadWeights = read_weights, log: Log = print) -> dict:
    """Writes `out_workdir`'s checkpoint 0, tokenizer and hf_extras from the HF folder `hf_dir`; -> a summary
    dict (workdir, step, which parts started fresh, tensors not imported, those kept in hf_extras and the
    sentence-transformers files kept, tokenizer files, parameters).
    Raises ConversionError (one line) on bad input. `generator_dir` / `generator_fraction` apply to ELECTRA
    folders only; `read` reads a folder's weights; `log` takes the notes on what was initialised or dropped."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir} is not a folder")
    if _model_type(hf_dir) == "electra":
        return _import_electra(hf_dir, out_workdir, overwrite=overwrite, generator_dir=generator_dir,
                               generator_fraction=generator_fraction, read=read, log=log)
    kind = {"roberta": "roberta_mlm", "deberta-v2": "deberta_mlm"}.get(_model_type(hf_dir), "mlm")
    return _import_bert(hf_dir, out_workdir, overwrite=overwrite, generator_dir=generator_dir, read=read, log=log,
                        kind=kind)


def _import_bert(hf_dir: str, out_workdir: str, *, overwrite: bool, generator_dir: str | None, read: ReadWeights,
                 log: Log, kind: str = "mlm") -> dict:
    """A BERT folder (`kind` "mlm"), a RoBERTa one ("roberta_mlm": positions after the padding id) or a
    DeBERTa-v2/v3 one ("deberta_mlm"): each an MLM run's checkpoint, our BertForMaskedLM's tree."""
    spec = hf_mapping.MODELS[kind]
    cfg, _ = _read_config(hf_dir, (spec.model_type,))
    if generator_dir is not None:
        raise ConversionError(f"--generator applies to ELECTRA only; {hf_dir} is a {spec.model_type} folder")
    _prepare_workdir(out_workdir, overwrite)

    bar = progress(desc="import: read weights", total=3, unit="stage")
    tensors = hf_mapping.normalize_names(read(hf_dir), kind)
    bar.update(1)
    bar.set_description("import: map tensors")
    head_initialised = not hf_mapping.head_present(tensors, cfg, kind)
    fallback = None
    if head_initialised:
        head = "lm_head" if kind == "roberta_mlm" else "cls.predictions"
        log(f"{hf_dir} has no MLM head ({head}.*): it starts freshly initialised")
        fallback = {"mlm_head": init_params(lambda: MODEL_CLASSES[kind](cfg, nnx.Rngs(0)))["mlm_head"]}
    params = _from_hf(tensors, cfg, kind, hf_dir, fallback)
    ignored = hf_mapping.unused_names(tensors, kind)
    _report_ignored(ignored, log)
    bar.update(1)
    bar.set_description("import: save checkpoint")
    meta = CheckpointMeta(step=0, objective="mlm", model=cfg,
                          imported_from=_provenance(hf_dir, None, {"mlm_head": head_initialised}))
    kept = _keep({kind: (hf_dir, tensors)}, out_workdir, log)
    copied = _save(hf_dir, out_workdir, params, meta, log)
    bar.update(1)
    bar.close()
    return {"workdir": paths.abspath(out_workdir), "step": 0, "model": kind, "mlm_head_initialised": head_initialised,
            "ignored": ignored, "kept": kept["tensors"], "kept_files": kept["files"], "tokenizer_files": copied,
            "parameters": int(sum(x.size for x in _leaves(params)))}


def _import_electra(hf_dir: str, out_workdir: str, *, overwrite: bool, generator_dir: str | None,
                    generator_fraction: float, read: ReadWeights, log: Log) -> dict:
    disc_cfg, gen_cfg = _electra_configs(hf_dir, generator_dir, generator_fraction)
    _prepare_workdir(out_workdir, overwrite)

    bar = progress(desc="import: read weights", total=3, unit="stage")
    params, initialised, ignored, folders = _electra_params(hf_dir, generator_dir, disc_cfg, gen_cfg, read,
                                                            log)
    bar.update(2)  # read and mapped
    # from_hf checks names, not shapes: a config.json that disagrees with its weights must not reach a checkpoint.
    expected, got = _electra_shapes(disc_cfg, gen_cfg), {k: v.shape for k, v in _flat(params).items()}
    wrong = sorted(p for p in set(expected) | set(got) if expected.get(p) != got.get(p))
    if wrong:
        raise ConversionError(f"weights do not match config.json: {wrong[0]} has shape {got.get(wrong[0])}, "
                              f"expected {expected.get(wrong[0])}")
    _report_ignored(ignored, log)
    bar.set_description("import: save checkpoint")
    meta = CheckpointMeta(step=0, objective="electra", model=disc_cfg, generator=gen_cfg,
                          imported_from=_provenance(hf_dir, generator_dir, initialised))
    kept = _keep(folders, out_workdir, log)
    copied = _save(hf_dir, out_workdir, params, meta, log)
    bar.update(1)
    bar.close()
    return {"workdir": paths.abspath(out_workdir), "step": 0, "objective": "electra",
            **{f"{name}_initialised": fresh for name, fresh in initialised.items()}, "ignored": ignored,
            "kept": kept["tensors"], "kept_files": kept["files"], "tokenizer_files": copied,
            "parameters": int(sum(x.size for x in _leaves(params)))}


def _electra_configs(hf_dir: str, generator_dir: str | None,
                     generator_fraction: float) -> tuple[EncoderConfig, EncoderConfig]:
    """(discriminator, generator) configs: from the folders' config.json, or the generator derived from the
    discriminator's at `generator_fraction` of its width; ConversionError when they cannot share embeddings."""
    disc_cfg, disc_config = _read_config(hf_dir, ("electra",))
    if "ElectraForMaskedLM" in disc_config.get("architectures", ()):
        raise ConversionError(f"{hf_dir} is an ElectraForMaskedLM (a generator): pass the discriminator as "
                              "--hf and this folder as --generator")
    if generator_dir is not None:
        if not os.path.isdir(generator_dir):
            raise ConversionError(f"{generator_dir} is not a folder")
        gen_cfg, _ = _read_config(generator_dir, ("electra",))
    else:
        try:
            gen_cfg = generator_config(disc_cfg, generator_fraction)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    try:
        check_towers(disc_cfg, gen_cfg)
    except ValueError as e:
        raise ConversionError(f"{generator_dir}: {e}") from None
    return disc_cfg, gen_cfg


def _electra_params(hf_dir: str, generator_dir: str | None, disc_cfg: EncoderConfig, gen_cfg: EncoderConfig,
                    read: ReadWeights, log: Log) -> tuple[dict, dict[str, bool], list[str], dict]:
    """-> (the ElectraForPretraining params, {part: started fresh} for discriminator_head / generator /
    generator_head, the HF tensors not imported, {tower: (its folder, its tensors)} for `_keep`)."""
    disc_tensors = hf_mapping.normalize_names(read(hf_dir), "discriminator")
    initialised = {"discriminator_head": not hf_mapping.head_present(disc_tensors, disc_cfg, "discriminator"),
                   "generator": generator_dir is None, "generator_head": False}
    gen_tensors = None
    if generator_dir is not None:
        gen_tensors = hf_mapping.normalize_names(read(generator_dir), "generator")
        initialised["generator_head"] = not hf_mapping.head_present(gen_tensors, gen_cfg, "generator")
    # One fresh tree serves every missing part, so they come from the same initialiser training uses.
    fresh = init_params(_electra_fn(disc_cfg, gen_cfg)) if any(initialised.values()) else None
    if initialised["discriminator_head"]:
        log(f"{hf_dir} has no discriminator head (discriminator_predictions.*): it starts freshly initialised")
    disc = _from_hf(disc_tensors, disc_cfg, "discriminator", hf_dir,
                    {"discriminator": {"head": fresh["discriminator"]["head"]}}
                    if initialised["discriminator_head"] else None)
    ignored = hf_mapping.unused_names(disc_tensors, "discriminator")
    if gen_tensors is None:
        log(f"no --generator: the generator (hidden {gen_cfg.hidden_size}, {gen_cfg.num_heads} heads, "
            f"{gen_cfg.num_layers} layers) starts freshly initialised")
        generator = fresh["generator"]
    else:
        generator = _electra_generator(gen_tensors, gen_cfg, generator_dir, disc["embeddings"],
                                       fresh if initialised["generator_head"] else None, log)
        ignored += hf_mapping.unused_names(gen_tensors, "generator")
    params = {"embeddings": disc["embeddings"], "generator": generator, "discriminator": disc["discriminator"]}
    folders = {"discriminator": (hf_dir, disc_tensors)}
    if gen_tensors is not None:
        folders["generator"] = (generator_dir, gen_tensors)
    return params, initialised, ignored, folders


def _electra_generator(tensors: dict, cfg: EncoderConfig, generator_dir: str, embeddings: dict,
                       fresh: dict | None, log: Log) -> dict:
    """The generator tower from its folder's tensors (its head from `fresh` when the folder has none);
    ConversionError when the folder's embeddings are not exactly the discriminator's."""
    if fresh is not None:
        log(f"{generator_dir} has no generator head (generator_predictions.*): it starts freshly initialised")
    gen = _from_hf(tensors, cfg, "generator", generator_dir,
                   {"generator": {"mlm_head": fresh["generator"]["mlm_head"]}} if fresh is not None else None)
    # Our ELECTRA has one embedding block; two different ones cannot both be kept.
    differs = _first_difference(embeddings, gen["embeddings"])
    if differs is not None:
        raise ConversionError(f"the generator's embeddings differ from the discriminator's (embeddings/"
                              f"{differs}): only jointly trained ELECTRA with shared embeddings can be imported")
    return gen["generator"]


def _first_difference(a: dict, b: dict) -> str | None:
    """The first path where two params trees differ (structure, shape or any value), else None."""
    fa, fb = _flat(a), _flat(b)
    for path in sorted(set(fa) | set(fb)):
        if path not in fa or path not in fb or fa[path].shape != fb[path].shape \
                or not np.array_equal(fa[path], fb[path]):
            return path
    return None
