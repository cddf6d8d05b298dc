"""What an imported Hugging Face folder holds beyond the parameters we train, kept for the way back.

    hf_extras.keep(hf_dir, extra_tensors, workdir, model)    # bert_jax.hf_import, at import
    extras = hf_extras.load(workdir, model)                  # bert_jax.hf_export: None for a workdir without
    files = hf_extras.assemble(our_hf_tensors, extras, model)  # what model.safetensors (and a head file) hold

The folder `W/hf_extras/<model>/` (bert_jax.workdir owns the name; `<model>` is the kind the HF folder became:
`mlm` for BERT, `discriminator` / `generator` for ELECTRA's two folders) holds:

    tensors.safetensors   the folder's tensors with no place in our tree (`hf_mapping.extra_names`: BERT's pooler,
                          an NSP or task head, buffers), under their HF names (`{base}.`-prefixed), as read
    config.json           the folder's config.json, untouched: the export's config.json starts from it (label
                          names, task settings), with our sizes and activation over it
    modules.json, config_sentence_transformers.json, sentence_*config.json and the module folders modules.json
                          names (1_Pooling/, 2_Dense/, ...): a sentence-transformers folder's own files, as they are

Training with `init_from` copies the folder into the new workdir (`bert_jax.workdir.copy_hf_extras`), so the
export of the adapted model writes every tensor the original had, only the trained ones changed.

Layout of the export. A sentence-transformers folder is a bare encoder (BertModel) that sentence-transformers
loads with AutoModel; it is exported as one again: the folder's `architectures`, bare names (`embeddings.*`,
`pooler.*`, as BertModel writes them), its modules; our trained head, which that class has no place for
(transformers would report it at every load), goes beside it to `<model>_head.safetensors`, where no loader
looks. Any other folder keeps our layout (the head in model.safetensors, `{base}.` names) plus the kept
tensors, under the architectures `hf_mapping.export_architectures` names.

A checkpoint of ours (or one imported from a folder that was not a sentence-transformers one) becomes one the
same way (`convert_to_hf --sentence-transformers`): `with_sentence_transformers` gives its extras the module
files a sentence-transformers folder would have had (`st_module_files`: Transformer + mean Pooling), written
by `copy_files` like copied ones, and the bare-encoder layout above follows from them.

numpy, json and safetensors only, like the rest of the conversion.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as save_bytes
from safetensors.numpy import save_file

from bert_jax import workdir as workdir_lib
from bert_jax.models import hf_mapping
from data_pipeline import paths

TENSORS = "tensors.safetensors"
CONFIG = "config.json"
ST_MODULES = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
ST_POOLING = "1_Pooling"
# An MLM run that started from an ELECTRA discriminator keeps that discriminator's head here, under its Hugging
# Face names; the MLM export writes it beside the model, where no loader looks (`keep_discriminator_head`).
DISCRIMINATOR_HEAD = "discriminator_head.safetensors"
# Keys of the imported config.json that would describe the original, not the export.
_STALE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype")


@dataclasses.dataclass(frozen=True)
class Extras:
    """One model's kept extras: tensors {HF name: array}, the folder's config.json (None without one), the
    sentence-transformers files and folders (paths relative to `directory`), and the ones to write from
    scratch ({relative path: JSON value}, `with_sentence_transformers`)."""

    directory: str
    tensors: dict
    config: dict | None
    files: tuple[str, ...]
    generated: dict = dataclasses.field(default_factory=dict)

    @property
    def sentence_transformers(self) -> bool:
        return ST_MODULES in self.files or ST_MODULES in self.generated

    @property
    def architectures(self) -> list[str]:
        return list((self.config or {}).get("architectures") or [])


@dataclasses.dataclass(frozen=True)
class Assembled:
    """An export's tensors: `tensors` for model.safetensors, `head` for the head file ({} when the head stays
    in model.safetensors), and config.json's `architectures`."""

    tensors: dict
    head: dict
    architectures: list[str]


def directory(workdir: str, model: str) -> str:
    return os.path.join(workdir_lib.hf_extras(workdir), model)


def sentence_transformers_files(hf_dir: str) -> list[str]:
    """The files and folders of `hf_dir` that belong to sentence-transformers (relative paths; [] when
    the folder has no modules.json): modules.json, its configs, and the module folders it names."""
    if not os.path.isfile(os.path.join(hf_dir, ST_MODULES)):
        return []
    names = [ST_MODULES] + sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "sentence_*config.json")))
    if os.path.isfile(os.path.join(hf_dir, ST_CONFIG)):
        names.append(ST_CONFIG)
    try:
        with open(os.path.join(hf_dir, ST_MODULES), encoding="utf-8") as f:
            modules = json.load(f)
        paths = [m.get("path") or "" for m in modules if isinstance(m, dict)]
    except (OSError, ValueError, TypeError):
        paths = []  # copied as it is; a modules.json sentence-transformers cannot read names no folder
    for path in paths:
        # The module at "" is the transformer at the folder's root: that is the model itself.
        path = os.path.normpath(path) if path else ""
        if path and not os.path.isabs(path) and not path.startswith("..") \
                and os.path.isdir(os.path.join(hf_dir, path)):
            names.append(path)
    return names


def keep(hf_dir: str, tensors: dict, workdir: str, model: str) -> dict:
    """Writes `W/hf_extras/<model>/` for the HF folder `hf_dir`: `tensors` (the extra ones, {HF name: array}),
    its config.json and its sentence-transformers files; -> {"tensors": names, "files": relative paths}."""
    final = out = directory(workdir, model)
    paths.rmtree(final)
    if paths.is_remote(final):  # written locally (safetensors, copytree need local files), then uploaded
        out = tempfile.mkdtemp(prefix="bert_jax_hf_extras_")
    else:
        os.makedirs(out)
    if tensors:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out, TENSORS),
                  metadata={"format": "pt"})
    files = sentence_transformers_files(hf_dir)
    for name in ([CONFIG] if os.path.isfile(os.path.join(hf_dir, CONFIG)) else []) + files:
        src = os.path.join(hf_dir, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out, name))
        else:
            shutil.copyfile(src, os.path.join(out, name))
    if out != final:
        paths.copy_tree(out, final)
        shutil.rmtree(out, ignore_errors=True)
    return {"tensors": sorted(tensors), "files": files}


def load(workdir: str, model: str) -> Extras | None:
    """The extras kept for `model` in `workdir` (an import's, or carried by init_from), else None."""
    where = directory(workdir, model)
    if not paths.isdir(where):
        return None
    where = paths.local_copy(where)  # an object-store workdir's: read from a local copy (safetensors, globs)
    tensors = {}
    if os.path.isfile(os.path.join(where, TENSORS)):
        with safe_open(os.path.join(where, TENSORS), "np") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = None
    if os.path.isfile(os.path.join(where, CONFIG)):
        with open(os.path.join(where, CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    head = (DISCRIMINATOR_HEAD,) if os.path.isfile(os.path.join(where, DISCRIMINATOR_HEAD)) else ()
    return Extras(directory=where, tensors=tensors, config=config,
                  files=tuple(sentence_transformers_files(where)) + head)


def keep_discriminator_head(workdir: str, electra_params: dict, disc_cfg) -> list[str]:
    """Writes `W/hf_extras/mlm/discriminator_head.safetensors`: the head of the ELECTRA discriminator an MLM
    run starts from (`discriminator_predictions.*`), which that run does not train; its export copies the
    file beside the model (`copy_files`), so nothing the original had is lost. -> the names written."""
    tensors = {n: v for n, v in hf_mapping.to_hf(electra_params, disc_cfg, "discriminator").items()
               if n.startswith("discriminator_predictions.")}
    out = directory(workdir, "mlm")
    paths.makedirs(out)
    with paths.atomic_write(paths.join(out, DISCRIMINATOR_HEAD), "wb") as f:
        f.write(save_bytes(tensors, metadata={"format": "pt"}))
    return sorted(tensors)


def st_module_files(hidden_size: int, max_seq_length: int, model_args: dict | None = None) -> dict:
    """The files of a sentence-transformers folder whose model is the folder's encoder, mean-pooled over the
    real tokens ({relative path: JSON value}), in the format sentence-transformers 2 to 6 all read;
    `model_args`: keyword arguments its Transformer module passes to `AutoModel.from_pretrained`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": ST_POOLING, "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    return {
        ST_MODULES: modules,
        f"{ST_POOLING}/config.json": pooling,
        # Lower-casing, where the vocabulary wants it, is the tokenizer's (tokenizer.json), not this flag's.
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False,
                                      **({"model_args": model_args} if model_args else {})},
        # No "__version__": a version newer than the reader's makes it warn.
        ST_CONFIG: {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
                    "similarity_fn_name": "cosine"},
    }


def with_sentence_transformers(extras: Extras | None, model: str, hidden_size: int,
                               max_seq_length: int) -> Extras:
    """`extras` (None: a workdir of ours) exported as a sentence-transformers folder: unchanged when it is one
    already (its own modules, pooling included); else with `st_module_files` to write and the bare encoder's
    architecture, so that `assemble` lays it out as it does an imported sentence-transformers folder."""
    if extras is not None and extras.sentence_transformers:
        return extras
    spec = hf_mapping.MODELS[model]
    if extras is None:
        extras = Extras(directory="", tensors={}, config=None, files=())
    config = {**extras.config, "architectures": [spec.base_architecture]} if extras.config is not None else None
    # BertModel builds a pooler that our model does not have (transformers would report it missing at every
    # load, and mean pooling does not use it): the folder's Transformer module builds it without one, unless the
    # workdir kept an imported pooler. ElectraModel has none.
    pooled = any(n.startswith(f"{spec.base}.pooler.") for n in hf_mapping.normalize_names(extras.tensors, model))
    bare = spec.base_architecture in ("BertModel", "RobertaModel") and not pooled
    model_args = {"add_pooling_layer": False} if bare else None
    return dataclasses.replace(extras, config=config,
                               generated=st_module_files(hidden_size, max_seq_length, model_args))


def base_layout(extras: Extras | None, model: str) -> bool:
    """Whether the export is a bare encoder (a sentence-transformers folder that was not ours to begin with)."""
    return (extras is not None and extras.sentence_transformers
            and hf_mapping.MODELS[model].architecture not in extras.architectures)


def assemble(ours: dict, extras: Extras | None, model: str) -> Assembled:
    """Our exported tensors ({HF name: array}, `hf_mapping.to_hf`) and the kept ones, laid out for the export
    (see the module docstring)."""
    spec = hf_mapping.MODELS[model]
    if extras is None:
        return Assembled(tensors=ours, head={}, architectures=[spec.architecture])
    kept = hf_mapping.normalize_names(extras.tensors, model)
    if not base_layout(extras, model):
        return Assembled(tensors={**kept, **ours}, head={},
                         architectures=hf_mapping.export_architectures(model, extras.architectures, list(kept)))
    # The bare encoder holds the `{base}.` tensors (bare names); anything else (our head; a kept NSP or task
    # head, where a folder of another kind is exported this way) has no place in it and goes to the head file.
    prefix = f"{spec.base}."
    both = {**kept, **ours}
    encoder = {n.removeprefix(prefix): v for n, v in both.items() if n.startswith(prefix)}
    return Assembled(tensors=encoder, head={n: v for n, v in both.items() if not n.startswith(prefix)},
                     architectures=extras.architectures or [spec.base_architecture])


def export_config(ours: dict, extras: Extras | None, architectures: list[str]) -> dict:
    """config.json: the imported folder's (when kept) with ours over it and the export's architectures."""
    original = {k: v for k, v in ((extras.config if extras else None) or {}).items()
                if k not in _STALE_CONFIG_KEYS}
    return {**original, **ours, "architectures": list(architectures)}


def copy_files(extras: Extras | None, out: str) -> list[str]:
    """Copies the sentence-transformers files and folders (and a kept discriminator head) into `out`
    (replacing those there) and writes the generated ones; -> their paths."""
    if extras is None:
        return []
    for name in extras.files:
        src, dst = os.path.join(extras.directory, name), os.path.join(out, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    for name, value in extras.generated.items():
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
    return list(extras.files) + list(extras.generated)
