"""Export an orbax checkpoint of ours to a Hugging Face transformers (PyTorch) folder.

    python -m tools.convert_to_hf --workdir W --out DIR [--step N] [--model mlm] [--verify] [--overwrite]

`--model` picks what to export: `mlm` (a BERT checkpoint) as BertForMaskedLM; from an ELECTRA checkpoint,
`discriminator` as ElectraForPreTraining or `generator` as ElectraForMaskedLM (each with the shared
embeddings; ElectraConfig with that tower's sizes and embedding_size).

Writes config.json (BertConfig or ElectraConfig), model.safetensors (HF tensor names; the MLM decoder
weight is tied to the word embeddings and not written), and the tokenizer files (vocab.txt,
tokenizer.json, tokenizer_config.json, special_tokens_map.json) so that `AutoTokenizer`,
`AutoModelForMaskedLM` and `pipeline("fill-mask")` load the folder offline. Our model has no pooler: as
for any BertForMaskedLM checkpoint, `AutoModelForSequenceClassification` then starts the pooler and the
classifier freshly initialised (and reports them as missing keys), and the `cls.*` MLM head goes unused.

Writing needs only numpy and safetensors; torch and transformers are imported by `--verify` alone, which
loads the folder back, runs both models on real sentences (standard-library docstrings) and fails when the
logits (MLM, or the discriminator's per-token logits) or the last hidden states differ by more than 1e-4,
or when the exported tokenizer's ids differ from ours. The last printed line is one JSON object of the figures.
"""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from tools import hf_mapping

# Verification passes when torch's outputs differ from ours by at most TOLERANCE x the outputs' largest magnitude
# (at least 1): float32 rounding grows with the values, so a trained model with logits of ~20 differs by
# ~1e-4 through two layers with nothing wrong, while the other GELU form differs by 2e-3 to 8e-3 there.
TOLERANCE = 5e-5
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# objective recorded in the checkpoint meta -> the --model values it can export.
EXPORTABLE = {"mlm": ("mlm",), "electra": ("discriminator", "generator")}
# --model -> the checkpoint meta key holding its EncoderConfig.
CONFIG_KEY = {"mlm": "model", "discriminator": "model", "generator": "generator"}
MODEL_CHOICES = ("mlm", "discriminator", "generator")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ConversionError(SystemExit):
    """A one-line, user-facing error; as a SystemExit the command line prints it without a traceback."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def checkpoint_steps(workdir: str) -> tuple[str, list[int]]:
    """(checkpoints folder, its committed steps); raises ConversionError when there is none."""
    from bert_jax.checkpointing import Checkpointer

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):  # checked first: the Checkpointer would create the folder
        raise ConversionError(f"{workdir} holds no checkpoints (no {directory} folder)")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        steps = sorted(ckpt.all_steps())
    finally:
        ckpt.close()
    if not steps:
        raise ConversionError(f"{directory} holds no checkpoints")
    return directory, steps


def load_checkpoint(workdir: str, step: int | None = None):
    """-> (EncoderConfig, params as numpy nested dict, meta) of `step` (default: the newest)."""
    from bert_jax.checkpointing import load_params
    from bert_jax.models import EncoderConfig

    directory, steps = checkpoint_steps(workdir)
    if step is not None and step not in steps:
        raise ConversionError(f"step {step} not found in {directory}; available steps: {steps}")
    params, meta = load_params(workdir, step)
    return EncoderConfig(**meta["model"]), params, meta


def tower_config(meta: dict, model: str):
    """The EncoderConfig of the exported model, from the checkpoint meta (ELECTRA records both towers)."""
    from bert_jax.models import EncoderConfig

    key = CONFIG_KEY[model]
    if key not in meta:
        raise ConversionError(f"the checkpoint meta has no {key!r} entry: cannot rebuild --model {model}")
    return EncoderConfig(**meta[key])


def run_ours(cfg, params: dict, input_ids, attention_mask, token_type_ids,
             model: str = "mlm") -> tuple[np.ndarray, np.ndarray]:
    """Our `model`, deterministic and in float32 -> (last hidden states [B,S,H], logits: [B,S,V] for mlm and
    generator, [B,S] for the discriminator). For ELECTRA, `cfg` is the tower's and `params` may hold both."""
    import jax
    from flax import nnx

    from bert_jax import sharding
    from bert_jax.models import BertForMaskedLM, ElectraDiscriminator, ElectraGenerator

    model_class = {"mlm": BertForMaskedLM, "discriminator": ElectraDiscriminator, "generator": ElectraGenerator}
    # How the training ran (bf16, remat, cuDNN attention on a GPU, the scan's unroll) does not change the
    # function: float32 and the plain paths here, on whatever machine converts.
    cfg = dataclasses.replace(cfg, dtype="float32", remat="none", attention="einsum", scan_unroll=1)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    graphdef, abstract, _ = sharding.abstract_params(lambda: model_class[model](cfg, nnx.Rngs(0)), mesh)

    @jax.jit
    def forward(p, ids, mask, types):
        return nnx.merge(graphdef, p).hidden_and_logits(ids, mask, types)

    with jax.set_mesh(mesh):
        # A stand-alone ELECTRA tower is the same paths as in the pretraining tree, less the other tower.
        p = jax.tree.map(jax.numpy.asarray, {k: params[k] for k in abstract})
        h, logits = forward(p, *(np.asarray(x, np.int32) for x in (input_ids, attention_mask, token_type_ids)))
    return np.asarray(h), np.asarray(logits)


def _load_tokenizer(tokenizer_dir: str):
    """Our tokenizer (data_pipeline.tokenization) for the vocabulary in `tokenizer_dir`."""
    from data_pipeline.tokenization import Tokenizer

    if not os.path.isfile(os.path.join(tokenizer_dir, "vocab.txt")):
        raise ConversionError(f"no tokenizer vocabulary at {os.path.join(tokenizer_dir, 'vocab.txt')}")
    return Tokenizer.load(tokenizer_dir)


def special_ids(workdir: str, tokenizer) -> dict:
    """The special-token ids: the data manifest's when the workdir has one, else the tokenizer's."""
    manifest = os.path.join(workdir, "data_manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            ids = json.load(f).get("special_ids")
        if ids:
            return {k: int(ids[k]) for k in SPECIAL_TOKENS}
    return {k: tokenizer.token_to_id(t) for k, t in SPECIAL_TOKENS.items()}


def write_tokenizer(tokenizer, out: str, max_length: int) -> None:
    """vocab.txt + tokenizer.json (ours, so ids agree by construction) and the transformers configs."""
    tokenizer.save(out)
    config = {
        "tokenizer_class": "BertTokenizer",  # the tokenizers-backed class in transformers 5
        "do_lower_case": tokenizer.lowercase,
        "strip_accents": None,  # follows do_lower_case, as our normaliser does
        "tokenize_chinese_chars": True,
        "model_max_length": max_length,
        "vocab_hash": tokenizer.vocab_hash,  # provenance: the hash our data manifests record
        **{f"{k}_token": t for k, t in SPECIAL_TOKENS.items()},
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({f"{k}_token": t for k, t in SPECIAL_TOKENS.items()}, f, indent=2)


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not overwrite:
            raise ConversionError(f"{out} already exists; pass --overwrite to replace its files")
        # Only what we write, plus weight files a loader could prefer over ours; anything else stays.
        for name in ("config.json",) + WEIGHT_FILES + TOKENIZER_FILES:
            path = os.path.join(out, name)
            if os.path.isfile(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)


def sample_texts() -> list[str]:
    """Real sentences of varied length: first paragraphs of standard-library docstrings, and one [MASK]."""
    import collections
    import json as json_mod
    import textwrap

    texts = []
    for obj in (json_mod.dumps, os.path.join, collections.Counter, textwrap.wrap, dataclasses.dataclass):
        paragraph = (obj.__doc__ or "").strip().split("\n\n")[0]
        texts.append(" ".join(paragraph.split()))
    texts.append("The module writes its output to a [MASK] on disk.")
    return texts


def verify_folder(out: str, cfg, params: dict, tokenizer, texts: list[str] | None = None,
                  model_name: str = "mlm") -> dict:
    """Loads `out` with transformers and compares it with our model; -> figures (raises on mismatch)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    texts = texts or sample_texts()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours_ids = tokenizer.encode_batch(texts)
    hf_ids = hf_tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    tokenizer_match = [list(a) for a in ours_ids] == [list(b) for b in hf_ids]

    batch = hf_tok(texts, padding=True, truncation=True, max_length=min(128, cfg.max_position_embeddings),
                   return_tensors="np")
    types = batch.get("token_type_ids", np.zeros_like(batch["input_ids"]))
    h_ours, logits_ours = run_ours(cfg, params, batch["input_ids"], batch["attention_mask"], types, model_name)

    model = getattr(transformers, hf_mapping.MODELS[model_name].architecture).from_pretrained(out).eval()
    with torch.no_grad():
        res = model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                    attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                    token_type_ids=torch.from_numpy(types).long(), output_hidden_states=True)
    # Only real tokens count: outputs at padding positions are meaningless (and differ by ~1e-5 more,
    # from the two ways of masking).
    real = batch["attention_mask"] > 0
    figures = {"tokenizer_ids_match": tokenizer_match, "texts": len(texts),
               "tokens": int(batch["attention_mask"].sum())}
    ok = tokenizer_match
    for name, theirs, ours in (("logits", res.logits.numpy(), logits_ours),
                               ("hidden", res.hidden_states[-1].numpy(), h_ours)):
        figures[f"max_abs_diff_{name}"] = float(np.abs(theirs - ours)[real].max())
        figures[f"tolerance_{name}"] = TOLERANCE * max(1.0, float(np.abs(ours[real]).max()))
        ok = ok and figures[f"max_abs_diff_{name}"] <= figures[f"tolerance_{name}"]
    figures["ok"] = bool(ok)
    return figures


def convert(workdir: str, out: str, step: int | None = None, model: str = "mlm", verify: bool = False,
            overwrite: bool = False) -> dict:
    """Writes the HF folder `out` from checkpoint `step` (default: newest) of `workdir`; -> a summary dict
    (with the verification figures when `verify`). Raises ConversionError (a SystemExit) on bad input."""
    if model not in MODEL_CHOICES:
        raise ConversionError(f"--model {model!r}: choose one of {list(MODEL_CHOICES)}")
    if os.path.exists(out) and os.listdir(out) and not overwrite:  # before the (slow) restore
        raise ConversionError(f"{out} already exists; pass --overwrite to replace its files")
    from data_pipeline.progress import progress
    bar = progress(desc="convert: restore", total=4 if verify else 3, unit="stage")
    cfg, params, meta = load_checkpoint(workdir, step)
    bar.update(1)
    objective = meta.get("objective", "mlm")
    if model not in EXPORTABLE.get(objective, ()):
        raise ConversionError(f"--model {model} is not available for this checkpoint (objective {objective}); "
                              f"available: {list(EXPORTABLE.get(objective, ()))}")
    cfg = tower_config(meta, model)
    tokenizer = _load_tokenizer(os.path.join(workdir, "tokenizer"))
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConversionError(f"the tokenizer in {workdir}/tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the model's vocab_size is {cfg.vocab_size}")
    ids = special_ids(workdir, tokenizer)

    from safetensors.numpy import save_file

    _prepare_out(out, overwrite)
    bar.set_description("convert: map tensors")
    tensors = hf_mapping.to_hf(params, cfg, model)
    bar.update(1)
    bar.set_description("convert: write")
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_mapping.hf_config(cfg, ids, model), f, indent=2)
    write_tokenizer(tokenizer, out, cfg.max_position_embeddings)
    summary = {"out": os.path.abspath(out), "step": int(meta.get("step", -1)), "model": model,
               "architecture": hf_mapping.MODELS[model].architecture, "tensors": len(tensors),
               "parameters": int(sum(t.size for t in tensors.values()))}
    bar.update(1)
    if verify:
        bar.set_description("convert: verify")
        figures = verify_folder(out, cfg, params, tokenizer, model_name=model)
        bar.update(1)
        summary.update(figures)
        if not figures["ok"]:
            print(json.dumps(summary))
            fig = figures
            raise ConversionError(f"verification failed: logits diff {fig['max_abs_diff_logits']:.3g} (tolerance "
                                  f"{fig['tolerance_logits']:.3g}), hidden diff {fig['max_abs_diff_hidden']:.3g} "
                                  f"(tolerance {fig['tolerance_hidden']:.3g}), "
                                  f"tokenizer ids match: {fig['tokenizer_ids_match']}")
    bar.close()
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/ and tokenizer/)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--model", default="mlm", help=f"one of {', '.join(MODEL_CHOICES)}")
    parser.add_argument("--verify", action="store_true", help="load with transformers and compare outputs")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = convert(args.workdir, args.out, step=args.step, model=args.model, verify=args.verify,
                      overwrite=args.overwrite)
    if args.verify:
        print(f"max abs diff: logits {summary['max_abs_diff_logits']:.3g}, "
              f"last hidden state {summary['max_abs_diff_hidden']:.3g}; tokenizer ids match: "
              f"{summary['tokenizer_ids_match']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
