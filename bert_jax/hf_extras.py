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

numpy, json and safetensors only, like the rest of the conversion.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bert_jax import workdir as workdir_lib
from bert_jax.models import hf_mapping

TENSORS = "tensors.safetensors"
CONFIG = "config.json"
ST_MODULES = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
# Keys of the imported config.json that would describe the original, not the export.
_STALE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype")


@dataclasses.dataclass(frozen=True)
class Extras:
    """One model's kept extras: tensors {HF name: array}, the folder's config.json (None without one), and the
    sentence-transformers files and folders (paths relative to `directory`)."""

    directory: str
    tensors: dict
    config: dict | None
    files: tuple[str, ...]

    @property
    def sentence_transformers(self) -> bool:
        return ST_MODULES in self.files

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
    out = directory(workdir, model)
    shutil.rmtree(out, ignore_errors=True)
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
    return {"tensors": sorted(tensors), "files": files}


def load(workdir: str, model: str) -> Extras | None:
    """The extras kept for `model` in `workdir` (an import's, or carried by init_from), else None."""
    where = directory(workdir, model)
    if not os.path.isdir(where):
        return None
    tensors = {}
    if os.path.isfile(os.path.join(where, TENSORS)):
        with safe_open(os.path.join(where, TENSORS), "np") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = None
    if os.path.isfile(os.path.join(where, CONFIG)):
        with open(os.path.join(where, CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    return Extras(directory=where, tensors=tensors, config=config,
                  files=tuple(sentence_transformers_files(where)))


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
    heads = hf_mapping.head_names(model)
    prefix = f"{spec.base}."
    encoder = {n.removeprefix(prefix): v for n, v in {**kept, **ours}.items() if n not in heads}
    return Assembled(tensors=encoder, head={n: v for n, v in ours.items() if n in heads},
                     architectures=extras.architectures or [spec.base_architecture])


def export_config(ours: dict, extras: Extras | None, architectures: list[str]) -> dict:
    """config.json: the imported folder's (when kept) with ours over it and the export's architectures."""
    original = {k: v for k, v in ((extras.config if extras else None) or {}).items()
                if k not in _STALE_CONFIG_KEYS}
    return {**original, **ours, "architectures": list(architectures)}


def copy_files(extras: Extras | None, out: str) -> list[str]:
    """Copies the sentence-transformers files and folders into `out` (replacing those there); -> their paths."""
    if extras is None:
        return []
    for name in extras.files:
        src, dst = os.path.join(extras.directory, name), os.path.join(out, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    return list(extras.files)
