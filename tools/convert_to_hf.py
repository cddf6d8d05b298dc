"""Export an orbax checkpoint of ours to a Hugging Face transformers (PyTorch) folder.

    python -m tools.convert_to_hf --workdir W --out DIR [--step N] [--model mlm] [--sentence-transformers]
        [--verify] [--overwrite]

`--model` picks what to export: `mlm` (a BERT checkpoint) as BertForMaskedLM, `roberta_mlm` (a configs/roberta.py
run or an imported RoBERTa: positions after the padding id) as RobertaForMaskedLM; from an ELECTRA checkpoint,
`discriminator` as ElectraForPreTraining or `generator` as ElectraForMaskedLM (each with the shared
embeddings; ElectraConfig with that tower's sizes and embedding_size). DeBERTa (configs/deberta.py):
`deberta_mlm` (an MLM run) or `deberta_generator` as DebertaV2ForMaskedLM; `deberta_discriminator` (a
DeBERTa-v3 RTD run) as a bare DebertaV2Model, the generator's word embeddings plus the learned difference
folded into its own, which DebertaV2ForSequenceClassification loads (--verify compares its hidden states).

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
`--sentence-transformers` exports any checkpoint (ours too; ELECTRA's towers as ElectraModel) in that layout,
with the module files of a mean-pooled encoder (Transformer + Pooling with `pooling_mode_mean_tokens`) where the
workdir kept none (an imported sentence-transformers folder keeps its own).
The library side is `bert_jax.hf_export`; this CLI adds the verification.

Writing needs only numpy and safetensors; torch and transformers are imported by `--verify` alone, which
loads the folder back, runs both models on real sentences (standard-library docstrings) and fails when the
logits (MLM, or the discriminator's per-token logits) or the last hidden states differ by more than 1e-4,
or when the exported tokenizer's ids differ from ours; for a sentence-transformers export it also loads the
folder with `SentenceTransformer` and fails when its embeddings differ from our mean-pooled last hidden states
(over the real tokens) by more than 1e-5 x their largest magnitude. The last printed line is one JSON object
of the figures.
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
# SentenceTransformer's embeddings against our mean-pooled hidden states, relative to their largest magnitude.
ST_TOLERANCE = 1e-5


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
    # The text of a special token ([MASK]) is that token in a Hugging Face tokenizer (fill-mask needs it); our
    # SentencePiece `encode` reads it as text: `encode_hf_batch` gives the ids the export must give.
    ours_ids = source.tokenizer.encode_hf_batch(texts)
    hf_ids = hf_tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    tokenizer_match = [list(a) for a in ours_ids] == [list(b) for b in hf_ids]

    cfg = source.config
    batch = hf_tok(texts, padding=True, truncation=True, max_length=min(128, cfg.max_length),
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
    compared = [("hidden", res.hidden_states[-1].numpy(), h_ours)]
    if getattr(res, "logits", None) is not None:  # a bare encoder (DeBERTa-v3's discriminator) has none
        compared.insert(0, ("logits", res.logits.numpy(), logits_ours))
    for name, theirs, ours in compared:
        figures[f"max_abs_diff_{name}"] = float(np.abs(theirs - ours)[real].max())
        figures[f"tolerance_{name}"] = TOLERANCE * max(1.0, float(np.abs(ours[real]).max()))
        ok = ok and figures[f"max_abs_diff_{name}"] <= figures[f"tolerance_{name}"]
    figures["ok"] = bool(ok)
    return figures


def verify_sentence_transformers(out: str, source: ExportSource, texts: list[str] | None = None) -> dict:
    """Loads `out` with SentenceTransformer and compares its embeddings with our last hidden states pooled as
    its Pooling module says (mean over the real tokens; an L2 Normalize after it where the folder has one);
    -> figures (`st_ok` False beyond ST_TOLERANCE; the check is skipped, with the reason, for other modules)."""
    # Imported here, not at the top: exporting without --verify must work where torch is not installed.
    import sentence_transformers  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    texts = texts or sample_texts()
    with open(os.path.join(out, "modules.json"), encoding="utf-8") as f:
        modules = json.load(f)
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = {}
    if len(kinds) > 1 and kinds[1] == "Pooling":
        with open(os.path.join(out, modules[1]["path"], "config.json"), encoding="utf-8") as f:
            pooling = json.load(f)
    mean_only = pooling.get("pooling_mode_mean_tokens") and not any(
        v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens")
    if kinds[:2] != ["Transformer", "Pooling"] or not mean_only or any(k != "Normalize" for k in kinds[2:]):
        return {"st_modules": kinds, "st_ok": True,
                "st_check": "skipped: compares mean pooling (and Normalize) only"}

    model = sentence_transformers.SentenceTransformer(out, device="cpu")
    theirs = model.encode(texts, convert_to_numpy=True, batch_size=len(texts))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = hf_tok(texts, padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="np")
    types = batch.get("token_type_ids", np.zeros_like(batch["input_ids"]))
    hidden, _ = hf_export.run_model(source.config, source.params, batch["input_ids"], batch["attention_mask"],
                                    types, source.model)
    ours = mean_pool(hidden, batch["attention_mask"])
    if "Normalize" in kinds:
        ours = ours / np.maximum(np.linalg.norm(ours, axis=-1, keepdims=True), 1e-12)
    diff = float(np.abs(theirs - ours).max())
    scale = float(np.abs(ours).max())
    rel = diff / scale if scale else diff
    return {"st_modules": kinds, "st_max_abs_diff_embedding": diff, "st_max_rel_diff_embedding": rel,
            "st_tolerance": ST_TOLERANCE, "st_ok": bool(rel <= ST_TOLERANCE)}


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """[B, S, H] hidden states, [B, S] mask -> [B, H]: the mean over the real tokens (float64 sums)."""
    mask = np.asarray(attention_mask, np.float64)[..., None]
    return ((np.asarray(hidden, np.float64) * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)).astype(np.float32)


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


def convert(workdir: str, out: str, step: int | None = None, model: str | None = "mlm", verify: bool = False,
            overwrite: bool = False, sentence_transformers: bool = False) -> dict:
    """Writes the HF folder `out` from checkpoint `step` (default: newest) of `workdir` (a sentence-transformers
    folder when `sentence_transformers`); -> a summary dict (with the verification figures when `verify`).
    Raises ConversionError on bad input and on a failed verification (after printing the summary with its
    figures)."""
    hf_export.check_request(model, out, overwrite)
    bar = progress(desc="convert: restore", total=3 if verify else 2, unit="stage")
    source = hf_export.load(workdir, model, step, sentence_transformers=sentence_transformers)
    bar.update(1)
    bar.set_description("convert: write")
    summary = hf_export.write(source, out, overwrite)
    bar.update(1)
    if verify:
        bar.set_description("convert: verify")
        figures = verify_folder(out, source)
        if sentence_transformers:
            figures.update(verify_sentence_transformers(out, source))
            figures["ok"] = figures["ok"] and figures["st_ok"]
        bar.update(1)
        summary.update(figures)
        if not figures["ok"]:
            print(json.dumps(summary))
            raise ConversionError(_failure(figures))
    bar.close()
    return summary


def _failure(fig: dict) -> str:
    if "st_max_rel_diff_embedding" in fig and not fig["st_ok"]:
        return (f"verification failed: SentenceTransformer embeddings differ from our mean-pooled hidden states by "
                f"{fig['st_max_rel_diff_embedding']:.3g} relative (tolerance {fig['st_tolerance']:.3g})")
    logits = (f"logits diff {fig['max_abs_diff_logits']:.3g} (tolerance {fig['tolerance_logits']:.3g}), "
              if "max_abs_diff_logits" in fig else "")
    return (f"verification failed: {logits}hidden diff {fig['max_abs_diff_hidden']:.3g} "
            f"(tolerance {fig['tolerance_hidden']:.3g}), tokenizer ids match: {fig['tokenizer_ids_match']}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_to_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/ and tokenizer/)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--model", default=None, help=f"one of {', '.join(MODEL_CLASSES)} (default: the first "
                        "the checkpoint exports: mlm, discriminator, deberta_mlm or deberta_discriminator)")
    parser.add_argument("--sentence-transformers", action="store_true",
                        help="write a sentence-transformers folder (bare encoder, mean pooling; the head beside it)")
    parser.add_argument("--verify", action="store_true", help="load with transformers and compare outputs")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        summary = convert(args.workdir, args.out, step=args.step, model=args.model, verify=args.verify,
                          overwrite=args.overwrite, sentence_transformers=args.sentence_transformers)
    except (ConversionError, CorruptCheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    if args.verify:
        logits = (f"logits {summary['max_abs_diff_logits']:.3g}, " if "max_abs_diff_logits" in summary else "")
        print(f"max abs diff: {logits}"
              f"last hidden state {summary['max_abs_diff_hidden']:.3g}; tokenizer ids match: "
              f"{summary['tokenizer_ids_match']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
