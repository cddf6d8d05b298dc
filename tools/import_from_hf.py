"""Import a Hugging Face BERT or ELECTRA folder as a step-0 checkpoint of ours (e.g. to continue pretraining).

    python -m tools.import_from_hf --hf DIR --out W [--overwrite]
    python -m tools.import_from_hf --hf DISC_DIR [--generator GEN_DIR | --generator-fraction F] --out W

Reads config.json and the weights (model.safetensors, a sharded model.safetensors.index.json, or a
pytorch_model.bin read with `torch.load(weights_only=True)`), accepts `bert.`-prefixed names
(BertForMaskedLM, BertForPreTraining) and bare ones (`embeddings.*`, `encoder.*`, as BertModel writes
them), and writes `W/checkpoints/0/` (state {"params": ...} + meta) and `W/tokenizer/` (the HF tokenizer
files). `bert_jax.checkpointing.load_params(W)` reads it back. A folder without the MLM head (a bare
encoder) gets a freshly initialised one, with our initialiser; the pooler and the NSP head are dropped.
Architectures our encoder cannot represent (relative positions, another activation, a decoder) are
refused with one line.

ELECTRA (config.json model_type "electra"): `--hf` is the discriminator (ElectraForPreTraining, or a bare
ElectraModel whose head then starts fresh) and `--generator` an ElectraForMaskedLM; together they become one
ElectraForPretraining tree {"embeddings", "generator", "discriminator"} with objective "electra". Jointly
trained ELECTRA shares one embedding block, so the two folders' embeddings must be identical (else refused).
Without `--generator` the generator starts freshly initialised at `--generator-fraction` of the
discriminator's width.
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


def read_config(hf_dir: str, model_types: tuple[str, ...] = ("bert",)):
    """-> (EncoderConfig, the config.json dict); ConversionError for what we cannot represent."""
    from bert_jax.models import EncoderConfig

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no config.json")
    with open(path, encoding="utf-8") as f:
        hf_config = json.load(f)
    try:
        return EncoderConfig(**hf_mapping.encoder_config_kwargs(hf_config, model_types)), hf_config
    except ValueError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None


def _init_numpy(model_fn) -> dict:
    """The params of `model_fn()` initialised as training would start them, as a numpy nested dict."""
    import jax

    from bert_jax import sharding

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    _, _, shardings = sharding.abstract_params(model_fn, mesh)
    return jax.tree.map(np.asarray, sharding.init_params(model_fn, mesh, shardings))


def fresh_params(cfg, seed: int = 0) -> dict:
    """A freshly initialised BertForMaskedLM of ours (numpy nested dict), as training would start it."""
    from flax import nnx

    from bert_jax.models import BertForMaskedLM

    return _init_numpy(lambda: BertForMaskedLM(cfg, nnx.Rngs(seed)))


def _electra_fn(disc_cfg, gen_cfg, seed: int = 0):
    from flax import nnx

    from bert_jax.models.electra import ElectraForPretraining

    return lambda: ElectraForPretraining(disc_cfg, gen_cfg, nnx.Rngs(seed))


def fresh_electra_params(disc_cfg, gen_cfg, seed: int = 0) -> dict:
    """A freshly initialised ElectraForPretraining of ours (numpy nested dict)."""
    return _init_numpy(_electra_fn(disc_cfg, gen_cfg, seed))


def electra_shapes(disc_cfg, gen_cfg) -> dict:
    """{path: shape} of the ElectraForPretraining tree, without allocating it."""
    import jax

    from bert_jax import sharding

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    _, abstract, _ = sharding.abstract_params(_electra_fn(disc_cfg, gen_cfg), mesh)
    return _shapes(abstract)


def _shapes(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_shapes(value, path + "/"))
        else:
            out[path] = tuple(value.shape)
    return out


def _head_present(tensors: dict, cfg, model: str = MODEL) -> bool:
    spec = hf_mapping.MODELS[model]
    return any(n in tensors for row in spec.head_rows for n in hf_mapping.hf_names(row, spec, cfg.num_layers))


def _model_type(hf_dir: str) -> str | None:
    """config.json's model_type, or None where there is no readable config (read_config then says why)."""
    try:
        with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _prepare_workdir(out_workdir: str, overwrite: bool) -> tuple[str, str]:
    """-> (checkpoints dir, tokenizer dir), emptied when `overwrite`; refuses to clobber otherwise."""
    ckpt_dir = os.path.join(out_workdir, "checkpoints")
    tok_dir = os.path.join(out_workdir, "tokenizer")
    if os.path.exists(ckpt_dir) and os.listdir(ckpt_dir):
        if not overwrite:
            raise ConversionError(f"{ckpt_dir} already exists; pass --overwrite to replace it")
        shutil.rmtree(ckpt_dir)
        shutil.rmtree(tok_dir, ignore_errors=True)
    return ckpt_dir, tok_dir


def import_hf(hf_dir: str, out_workdir: str, overwrite: bool = False, generator_dir: str | None = None,
              generator_fraction: float = 0.25) -> dict:
    """Writes `out_workdir/checkpoints/0` and `out_workdir/tokenizer` from the HF folder `hf_dir`;
    -> a summary dict. Raises ConversionError (a SystemExit) with one line on bad input.
    `generator_dir` / `generator_fraction` apply to ELECTRA folders only."""
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir} is not a folder")
    if _model_type(hf_dir) == "electra":
        return import_electra(hf_dir, out_workdir, overwrite, generator_dir, generator_fraction)
    cfg, _ = read_config(hf_dir)
    if generator_dir is not None:
        raise ConversionError(f"--generator applies to ELECTRA only; {hf_dir} is a BERT folder")
    ckpt_dir, tok_dir = _prepare_workdir(out_workdir, overwrite)

    from data_pipeline.progress import progress
    bar = progress(desc="import: read weights", total=3, unit="stage")
    tensors = hf_mapping.normalize_names(read_weights(hf_dir), MODEL)
    bar.update(1)
    bar.set_description("import: map tensors")
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

    copied = _copy_tokenizer(hf_dir, tok_dir)
    meta = {"step": 0, "model": dataclasses.asdict(cfg), "objective": "mlm",
            "imported_from": os.path.abspath(hf_dir), "mlm_head_initialised": head_initialised}
    bar.update(1)
    bar.set_description("import: save checkpoint")
    _save(ckpt_dir, tok_dir, copied, params, meta)
    bar.update(1)
    bar.close()
    return {"workdir": os.path.abspath(out_workdir), "step": 0, "mlm_head_initialised": head_initialised,
            "ignored": ignored, "tokenizer_files": copied,
            "parameters": int(sum(x.size for x in _leaves(params)))}


def _copy_tokenizer(hf_dir: str, tok_dir: str) -> list[str]:
    """Copies the HF tokenizer files of `hf_dir` into `tok_dir`; -> the names copied."""
    os.makedirs(tok_dir, exist_ok=True)
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    for name in copied:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tok_dir, name))
    if "vocab.txt" not in copied:
        print(f"{hf_dir} has no vocab.txt: {tok_dir} stays empty, add the vocabulary before training/export")
    return copied


def _save(ckpt_dir: str, tok_dir: str, copied: list[str], params: dict, meta: dict) -> None:
    """Writes step 0 ({"params": params} + meta, with the vocabulary hash when there is a vocabulary)."""
    from bert_jax.checkpointing import Checkpointer

    vocab_hash = _vocab_hash(tok_dir) if "vocab.txt" in copied else None
    if vocab_hash:
        meta["vocab_hash"] = vocab_hash
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        ckpt.save(0, {"params": params}, meta)
        ckpt.wait()
    finally:
        ckpt.close()


def _tower(tensors: dict, cfg, model: str, where: str, fallback: dict | None) -> dict:
    """from_hf for one ELECTRA tower, its errors as one ConversionError line naming the folder."""
    try:
        return hf_mapping.from_hf(tensors, cfg, model, fallback=fallback)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{where}: {e.args[0] if e.args else e}") from None


def _first_difference(a: dict, b: dict) -> str | None:
    """The first path where two params trees differ (structure, shape or any value), else None."""
    fa, fb = _flat(a), _flat(b)
    for path in sorted(set(fa) | set(fb)):
        if path not in fa or path not in fb or fa[path].shape != fb[path].shape \
                or not np.array_equal(fa[path], fb[path]):
            return path
    return None


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def import_electra(hf_dir: str, out_workdir: str, overwrite: bool = False, generator_dir: str | None = None,
                   generator_fraction: float = 0.25) -> dict:
    """The ELECTRA path of `import_hf` (see the module docstring)."""
    from bert_jax.models.electra import check_towers, generator_config

    disc_cfg, disc_config = read_config(hf_dir, ("electra",))
    if "ElectraForMaskedLM" in disc_config.get("architectures", ()):
        raise ConversionError(f"{hf_dir} is an ElectraForMaskedLM (a generator): pass the discriminator as "
                              "--hf and this folder as --generator")
    if generator_dir is not None:
        if not os.path.isdir(generator_dir):
            raise ConversionError(f"{generator_dir} is not a folder")
        gen_cfg, _ = read_config(generator_dir, ("electra",))
    else:
        try:
            gen_cfg = generator_config(disc_cfg, generator_fraction)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    try:
        check_towers(disc_cfg, gen_cfg)
    except ValueError as e:
        raise ConversionError(f"{generator_dir}: {e}") from None
    ckpt_dir, tok_dir = _prepare_workdir(out_workdir, overwrite)

    from data_pipeline.progress import progress
    bar = progress(desc="import: read weights", total=3, unit="stage")
    disc_tensors = hf_mapping.normalize_names(read_weights(hf_dir), "discriminator")
    head_initialised = not _head_present(disc_tensors, disc_cfg, "discriminator")
    gen_tensors = gen_head_initialised = None
    if generator_dir is not None:
        gen_tensors = hf_mapping.normalize_names(read_weights(generator_dir), "generator")
        gen_head_initialised = not _head_present(gen_tensors, gen_cfg, "generator")
    # One fresh tree serves every missing part, so they come from the same initialiser training uses.
    fresh = None
    if head_initialised or generator_dir is None or gen_head_initialised:
        fresh = fresh_electra_params(disc_cfg, gen_cfg)
    if head_initialised:
        print(f"{hf_dir} has no discriminator head (discriminator_predictions.*): it starts freshly initialised")
    disc = _tower(disc_tensors, disc_cfg, "discriminator", hf_dir,
                  {"discriminator": {"head": fresh["discriminator"]["head"]}} if head_initialised else None)
    ignored = hf_mapping.unused_names(disc_tensors, "discriminator")

    if generator_dir is None:
        print(f"no --generator: the generator (hidden {gen_cfg.hidden_size}, {gen_cfg.num_heads} heads, "
              f"{gen_cfg.num_layers} layers) starts freshly initialised")
        generator = fresh["generator"]
    else:
        if gen_head_initialised:
            print(f"{generator_dir} has no generator head (generator_predictions.*): it starts freshly "
                  "initialised")
        gen = _tower(gen_tensors, gen_cfg, "generator", generator_dir,
                     {"generator": {"mlm_head": fresh["generator"]["mlm_head"]}} if gen_head_initialised else None)
        # Our ELECTRA has one embedding block; two different ones cannot both be kept.
        differs = _first_difference(disc["embeddings"], gen["embeddings"])
        if differs is not None:
            raise ConversionError(f"the generator's embeddings differ from the discriminator's (embeddings/"
                                  f"{differs}): only jointly trained ELECTRA with shared embeddings can be imported")
        generator = gen["generator"]
        ignored += hf_mapping.unused_names(gen_tensors, "generator")
    params = {"embeddings": disc["embeddings"], "generator": generator, "discriminator": disc["discriminator"]}
    bar.update(2)  # read and mapped

    # from_hf checks names, not shapes: a config.json that disagrees with its weights must not reach a checkpoint.
    expected, got = electra_shapes(disc_cfg, gen_cfg), {k: v.shape for k, v in _flat(params).items()}
    wrong = sorted(p for p in set(expected) | set(got) if expected.get(p) != got.get(p))
    if wrong:
        raise ConversionError(f"weights do not match config.json: {wrong[0]} has shape {got.get(wrong[0])}, "
                              f"expected {expected.get(wrong[0])}")
    if ignored:
        print(f"not imported (no place in our model, or tied copies): {', '.join(ignored)}")

    copied = _copy_tokenizer(hf_dir, tok_dir)
    meta = {"step": 0, "objective": "electra", "model": dataclasses.asdict(disc_cfg),
            "generator": dataclasses.asdict(gen_cfg), "imported_from": os.path.abspath(hf_dir),
            "generator_imported_from": os.path.abspath(generator_dir) if generator_dir else None,
            "discriminator_head_initialised": head_initialised, "generator_initialised": generator_dir is None,
            "generator_head_initialised": bool(gen_head_initialised)}
    bar.set_description("import: save checkpoint")
    _save(ckpt_dir, tok_dir, copied, params, meta)
    bar.update(1)
    bar.close()
    return {"workdir": os.path.abspath(out_workdir), "step": 0, "objective": "electra",
            "discriminator_head_initialised": head_initialised, "generator_initialised": generator_dir is None,
            "generator_head_initialised": bool(gen_head_initialised), "ignored": ignored,
            "tokenizer_files": copied, "parameters": int(sum(x.size for x in _leaves(params)))}


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
    parser.add_argument("--hf", required=True, help="a Hugging Face BERT folder, or an ELECTRA discriminator "
                        "(ElectraForPreTraining / ElectraModel) folder (config.json + weights)")
    parser.add_argument("--generator", default=None,
                        help="ELECTRA only: the generator's folder (ElectraForMaskedLM, same embeddings)")
    parser.add_argument("--generator-fraction", type=float, default=0.25,
                        help="ELECTRA without --generator: the fresh generator's width relative to the "
                        "discriminator's (default 0.25)")
    parser.add_argument("--out", required=True, help="the workdir to write (checkpoints/0, tokenizer/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing W/checkpoints")
    args = parser.parse_args(argv)
    print(json.dumps(import_hf(args.hf, args.out, overwrite=args.overwrite, generator_dir=args.generator,
                               generator_fraction=args.generator_fraction)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
