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

A workdir that started from an imported Hugging Face folder (tools.import_from_hf, directly or through
`--config.init_from`) exports what that folder held beyond our parameters too (`bert_jax.hf_extras`): its
pooler (which `AutoModel` and `AutoModelForSequenceClassification` then load), NSP or task heads, buffers and
config.json settings, unchanged; config.json's `architectures` names the classes that hold them
(BertForPreTraining for a BertForPreTraining folder; else BertForMaskedLM first, then the folder's own). A
sentence-transformers folder exports as one: a bare encoder under the folder's architecture (BertModel) with
its modules (pooling, Normalize, ...), which `SentenceTransformer(DIR)` loads offline without a warning; our
trained MLM head, which BertModel has no place for, lies beside it in `mlm_head.safetensors`.
The library side is `bert_jax.hf_export`; this CLI adds the verification.

Writing needs only numpy and safetensors; torch and transformers are imported by `--verify` alone, which
loads the folder back, runs both models on real sentences (standard-library docstrings) and fails when the
logits (MLM, or the discriminator's per-token logits) or the last hidden states differ by more than 1e-4,
or when the exported tokenizer's ids differ from ours. The last printed line is one JSON object of the figures.
"""

import argparse
import collections
import dataclasses
import json
import os
import sys
import textwrap

import numpy as np

from bert_jax import hf_export
from bert_jax.checkpointing import CorruptCheckpointError
from bert_jax.hf_export import ConversionError, ExportSource
from bert_jax.models import MODEL_CLASSES, hf_mapping
from data_pipeline.errors import DataError
from data_pipeline.progress import progress

# Verification passes when torch's outputs differ from ours by at most TOLERANCE x the outputs' largest magnitude
# (at least 1): float32 rounding grows with the values, so a trained model with logits of ~20 differs by
# ~1e-4 through two layers with nothing wrong, while the other GELU form differs by 2e-3 to 8e-3 there.
TOLERANCE = 5e-5


def sample_texts() -> list[str]:
    """Real sentences of varied length: first paragraphs of standard-library docstrings, and one [MASK]."""
    texts = []
    for obj in (json.dumps, os.path.join, collections.Counter, textwrap.wrap, dataclasses.dataclass):
        paragraph = (obj.__doc__ or "").strip().split("\n\n")[0]
        texts.append(" ".join(paragraph.split()))
    texts.append("The module writes its output to a [MASK] on disk.")
    return texts


def verify_folder(out: str, source: ExportSource, texts: list[str] | None = None) -> dict:
    """Loads `out` with transformers and compares it with our model of `source`; -> figures (`ok` False on a
    mismatch beyond the tolerance, or when the tokenizers' ids differ)."""
    # Imported here, not at the top: exporting without --verify must work where torch is not installed.
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    texts = texts or sample_texts()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_ids = source.tokenizer.encode_batch(texts)
    hf_ids = hf_tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    tokenizer_match = [list(a) for a in ours_ids] == [list(b) for b in hf_ids]

    cfg = source.config
    batch = hf_tok(texts, padding=True, truncation=True, max_length=min(128, cfg.max_position_embeddings),
                   return_tensors="np")
    types = batch.get("token_type_ids", np.zeros_like(batch["input_ids"]))
    h_ours, logits_ours = hf_export.run_model(cfg, source.params, batch["input_ids"], batch["attention_mask"],
                                              types, source.model)

    model = _load_exported(out, source.model).eval()
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


def _load_exported(out: str, model: str):
    """The exported folder in transformers' class of `model` (BertForMaskedLM, ...); where the export is a
    bare encoder (a sentence-transformers folder's), with our head from the head file beside it."""
    # Imported here, not at the top: exporting without --verify must work where torch is not installed.
    import transformers  # pylint: disable=import-outside-toplevel
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

    cls = getattr(transformers, hf_mapping.MODELS[model].architecture)
    head = os.path.join(out, hf_export.HEAD_FILE.format(model=model))
    if not os.path.isfile(head):
        return cls.from_pretrained(out)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head it reports missing is the one loaded next
    try:
        loaded = cls.from_pretrained(out)
    finally:
        transformers.logging.set_verbosity(verbosity)
    result = loaded.load_state_dict(load_file(head), strict=False)
    if result.unexpected_keys:
        raise ConversionError(f"{head}: tensors {model} has no place for: {result.unexpected_keys[:4]}")
    return loaded


def convert(workdir: str, out: str, step: int | None = None, model: str = "mlm", verify: bool = False,
            overwrite: bool = False) -> dict:
    """Writes the HF folder `out` from checkpoint `step` (default: newest) of `workdir`; -> a summary dict
    (with the verification figures when `verify`). Raises ConversionError on bad input and on a failed
    verification (after printing the summary with its figures)."""
    hf_export.check_request(model, out, overwrite)
    bar = progress(desc="convert: restore", total=3 if verify else 2, unit="stage")
    source = hf_export.load(workdir, model, step)
    bar.update(1)
    bar.set_description("convert: write")
    summary = hf_export.write(source, out, overwrite)
    bar.update(1)
    if verify:
        bar.set_description("convert: verify")
        figures = verify_folder(out, source)
        bar.update(1)
        summary.update(figures)
        if not figures["ok"]:
            print(json.dumps(summary))
            raise ConversionError(_failure(figures))
    bar.close()
    return summary


def _failure(fig: dict) -> str:
    return (f"verification failed: logits diff {fig['max_abs_diff_logits']:.3g} (tolerance "
            f"{fig['tolerance_logits']:.3g}), hidden diff {fig['max_abs_diff_hidden']:.3g} "
            f"(tolerance {fig['tolerance_hidden']:.3g}), tokenizer ids match: {fig['tokenizer_ids_match']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/ and tokenizer/)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--model", default="mlm", help=f"one of {', '.join(MODEL_CLASSES)}")
    parser.add_argument("--verify", action="store_true", help="load with transformers and compare outputs")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        summary = convert(args.workdir, args.out, step=args.step, model=args.model, verify=args.verify,
                          overwrite=args.overwrite)
    except (ConversionError, CorruptCheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    if args.verify:
        print(f"max abs diff: logits {summary['max_abs_diff_logits']:.3g}, "
              f"last hidden state {summary['max_abs_diff_hidden']:.3g}; tokenizer ids match: "
              f"{summary['tokenizer_ids_match']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
