"""Import a Hugging Face BERT, RoBERTa or ELECTRA folder as a step-0 checkpoint of ours (e.g. to continue pretraining).

    python -m tools.import_from_hf --hf DIR --out W [--overwrite]
    python -m tools.import_from_hf --hf DISC_DIR [--generator GEN_DIR | --generator-fraction F] --out W

Reads config.json and the weights (model.safetensors, a sharded model.safetensors.index.json, or a
pytorch_model.bin read with `torch.load(weights_only=True)`), accepts `bert.`-prefixed names
(BertForMaskedLM, BertForPreTraining) and bare ones (`embeddings.*`, `encoder.*`, as BertModel writes
them), and writes `W/checkpoints/0/` (state {"params": ...} + meta) and `W/tokenizer/` (the HF tokenizer
files). `bert_jax.checkpointing.load_params(W)` reads it back. A folder without the MLM head (a bare
encoder) gets a freshly initialised one, with our initialiser. What the folder holds that we do not train
(the pooler, an NSP or task head, buffers, its config.json, a sentence-transformers folder's modules.json,
1_Pooling/, ...) is kept in `W/hf_extras/`; training with `--config.init_from=W` carries it along and
tools.convert_to_hf writes it back (bert_jax.hf_extras). Architectures our encoder cannot represent (relative
positions, another activation, a decoder) are refused with one line.

ELECTRA (config.json model_type "electra"): `--hf` is the discriminator (ElectraForPreTraining, or a bare
ElectraModel whose head then starts fresh) and `--generator` an ElectraForMaskedLM; together they become one
ElectraForPretraining tree {"embeddings", "generator", "discriminator"} with objective "electra". Jointly
trained ELECTRA shares one embedding block, so the two folders' embeddings must be identical (else refused).
Without `--generator` the generator starts freshly initialised at `--generator-fraction` of the
discriminator's width.

The library side is `bert_jax.hf_import`; this CLI adds the readers that need torch (bfloat16 safetensors,
pytorch_model.bin). The last printed line is one JSON object: the import's summary.
"""

import argparse
import json
import sys

import numpy as np
from safetensors import safe_open

from bert_jax import hf_import
from bert_jax.hf_export import ConversionError


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor (any float dtype, bf16 included) -> float32 numpy; other dtypes as they are."""
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _read_safetensors(path: str) -> dict:
    try:
        return hf_import.read_safetensors_file(path)
    except TypeError:  # bfloat16 has no numpy dtype: go through torch
        with safe_open(path, "pt") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def _read_bin(path: str) -> dict:
    # Imported here, not at the top: only pytorch_model.bin folders need torch.
    import torch  # pylint: disable=import-outside-toplevel

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _to_numpy(v) for k, v in state.items()}


def read_weights(hf_dir: str) -> dict:
    """{HF name: numpy array} from the folder's weight file(s), whatever their dtype or format."""
    return hf_import.read_weights(hf_dir, read_file=_read_safetensors, read_bin=_read_bin)


def next_commands(workdir: str, objective: str, model: str = "mlm") -> list[str]:
    """The commands that continue pretraining from `workdir`: pretokenize text with its own vocabulary, then
    train with init_from (the model's shape comes from the checkpoint; DATA, RUN and the source are the user's)."""
    recipe = "configs/electra.py:base" if objective == "electra" else "configs/bert.py:base"
    if model == "roberta_mlm":
        recipe = "configs/roberta.py:base"
    if model == "deberta_mlm":
        recipe = "configs/deberta.py:base --config.objective.name=mlm"
    return [f"python -m data_pipeline.pretokenize --source YOUR_TEXT --out DATA --vocab {workdir}/tokenizer",
            f"python -m bert_jax.training --config {recipe} --workdir RUN --config.init_from={workdir} "
            "--config.data.dir=DATA"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="a Hugging Face BERT or DeBERTa-v2/v3 folder, or an ELECTRA "
                        "discriminator (ElectraForPreTraining / ElectraModel) folder (config.json + weights)")
    parser.add_argument("--generator", default=None,
                        help="ELECTRA only: the generator's folder (ElectraForMaskedLM, same embeddings)")
    parser.add_argument("--generator-fraction", type=float, default=0.25,
                        help="ELECTRA without --generator: the fresh generator's width relative to the "
                        "discriminator's (default 0.25)")
    parser.add_argument("--out", required=True, help="the workdir to write (checkpoints/0, tokenizer/, hf_extras/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing W/checkpoints")
    args = parser.parse_args(argv)
    try:
        summary = hf_import.import_hf(args.hf, args.out, overwrite=args.overwrite, generator_dir=args.generator,
                                      generator_fraction=args.generator_fraction, read=read_weights)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    print("continue pretraining from it (your text in place of YOUR_TEXT; DATA and RUN are new folders):")
    for command in next_commands(summary["workdir"], summary.get("objective", "mlm"), summary.get("model", "mlm")):
        print(f"  {command}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
