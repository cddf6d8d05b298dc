"""Import a Hugging Face BERT folder as a step-0 checkpoint of ours (e.g. to continue pretraining from it).

    python -m tools.import_from_hf --hf DIR --out W [--overwrite]

Reads config.json and the weights (model.safetensors, a sharded model.safetensors.index.json, or a
pytorch_model.bin read with `torch.load(weights_only=True)`), accepts `bert.`-prefixed names
(BertForMaskedLM, BertForPreTraining) and bare ones (`embeddings.*`, `encoder.*`, as BertModel writes
them), and writes `W/checkpoints/0/` (state {"params": ...} + meta) and `W/tokenizer/` (the HF tokenizer
files). `bert_jax.checkpointing.load_params(W)` reads it back. A folder without the MLM head (a bare
encoder) gets a freshly initialised one, with our initialiser; the pooler and the NSP head are dropped.
Architectures our encoder cannot represent (relative positions, another activation, a decoder) are
refused with one line.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys

import numpy as np

from tools import hf_mapping
from tools.convert_to_hf import TOKENIZER_FILES, ConversionError

MODEL = "mlm"  # ELECTRA folders will pick "discriminator" / "generator" here


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor (any float dtype, bf16 included) -> float32 numpy; other dtypes as they are."""
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except TypeError:  # bfloat16 has no numpy dtype: go through torch (tools/ may import it)
        with safe_open(path, "pt") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def read_weights(hf_dir: str) -> dict:
    """{HF name: numpy array} from the folder's weight file(s)."""
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    bin_file = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(_read_safetensors(os.path.join(hf_dir, shard)))
        return tensors
    if os.path.isfile(bin_file):
        import torch

        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {k: _to_numpy(v) for k, v in state.items()}
    raise ConversionError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_config(hf_dir: str):
    """-> (EncoderConfig, the config.json dict); ConversionError for what we cannot represent."""
    from bert_jax.models import EncoderConfig

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no config.json")
    with open(path, encoding="utf-8") as f:
        hf_config = json.load(f)
    try:
        return EncoderConfig(**hf_mapping.encoder_config_kwargs(hf_config)), hf_config
    except ValueError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None


def fresh_params(cfg, seed: int = 0) -> dict:
    """A freshly initialised BertForMaskedLM of ours (numpy nested dict), as training would start it."""
    import jax
    from flax import nnx

    from bert_jax import sharding
    from bert_jax.models import BertForMaskedLM

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model_fn = lambda: BertForMaskedLM(cfg, nnx.Rngs(seed))  # noqa: E731
    _, _, shardings = sharding.abstract_params(model_fn, mesh)
    return jax.tree.map(np.asarray, sharding.init_params(model_fn, mesh, shardings))


def _head_present(tensors: dict, cfg) -> bool:
    spec = hf_mapping.MODELS[MODEL]
    return any(n in tensors for row in spec.head_rows for n in hf_mapping.hf_names(row, spec, cfg.num_layers))


def import_hf(hf_dir: str, out_workdir: str, overwrite: bool = False) -> dict:
    """Writes `out_workdir/checkpoints/0` and `out_workdir/tokenizer` from the HF folder `hf_dir`;
    -> a summary dict. Raises ConversionError (a SystemExit) with one line on bad input."""
    from bert_jax.checkpointing import Checkpointer

    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir} is not a folder")
    cfg, _ = read_config(hf_dir)
    ckpt_dir = os.path.join(out_workdir, "checkpoints")
    tok_dir = os.path.join(out_workdir, "tokenizer")
    if os.path.exists(ckpt_dir) and os.listdir(ckpt_dir):
        if not overwrite:
            raise ConversionError(f"{ckpt_dir} already exists; pass --overwrite to replace it")
        shutil.rmtree(ckpt_dir)
        shutil.rmtree(tok_dir, ignore_errors=True)

    tensors = hf_mapping.normalize_names(read_weights(hf_dir), MODEL)
    head_initialised = not _head_present(tensors, cfg)
    fallback = None
    if head_initialised:
        print(f"{hf_dir} has no MLM head (cls.predictions.*): it starts freshly initialised")
        fallback = {"mlm_head": fresh_params(cfg)["mlm_head"]}
    try:
        params = hf_mapping.from_hf(tensors, cfg, MODEL, fallback=fallback)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{hf_dir}: {e.args[0] if e.args else e}") from None
    ignored = hf_mapping.unused_names(tensors, MODEL)
    if ignored:
        print(f"not imported (no place in our model, or tied copies): {', '.join(ignored)}")

    os.makedirs(tok_dir, exist_ok=True)
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    for name in copied:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tok_dir, name))
    if "vocab.txt" not in copied:
        print(f"{hf_dir} has no vocab.txt: {tok_dir} stays empty, add the vocabulary before training/export")

    meta = {"step": 0, "model": dataclasses.asdict(cfg), "objective": "mlm",
            "imported_from": os.path.abspath(hf_dir), "mlm_head_initialised": head_initialised}
    vocab_hash = _vocab_hash(tok_dir) if "vocab.txt" in copied else None
    if vocab_hash:
        meta["vocab_hash"] = vocab_hash
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        ckpt.save(0, {"params": params}, meta)
        ckpt.wait()
    finally:
        ckpt.close()
    return {"workdir": os.path.abspath(out_workdir), "step": 0, "mlm_head_initialised": head_initialised,
            "ignored": ignored, "tokenizer_files": copied,
            "parameters": int(sum(x.size for x in _leaves(params)))}


def _vocab_hash(tok_dir: str) -> str | None:
    """The vocabulary hash our data pipeline records (so a manifest built from it can be matched)."""
    try:
        from data_pipeline.tokenization import Tokenizer

        return Tokenizer.load(tok_dir).vocab_hash
    except Exception as e:  # pylint: disable=broad-except  # a hash is a nicety, the import stands
        print(f"could not hash the vocabulary ({e})")
        return None


def _leaves(tree):
    for value in tree.values():
        yield from (_leaves(value) if isinstance(value, dict) else (value,))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="a Hugging Face BERT folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="the workdir to write (checkpoints/0, tokenizer/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing W/checkpoints")
    args = parser.parse_args(argv)
    print(json.dumps(import_hf(args.hf, args.out, overwrite=args.overwrite)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
