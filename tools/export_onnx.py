"""Export a fine-tuned Hugging Face sequence classifier to ONNX and check it with onnxruntime against PyTorch.

    python -m tools.export_onnx --model DIR --out model.onnx [--opset N] [--tolerance 1e-4]
                                [--batch-sizes 1,3,7] [--max-lengths 7,33,128]

DIR: a transformers folder that `AutoModelForSequenceClassification` loads with every weight from the folder (a
classifier saved by `python -m tools.finetune_hf ... --save DIR`), with its tokenizer files. A folder whose
classifier would start from random weights (a bare `tools.convert_to_hf` export, BertForMaskedLM) is refused:
its ONNX file would serve random predictions.

The graph: int64 `input_ids`, `attention_mask` and `token_type_ids` (those of the tokenizer's inputs), each
[batch, sequence] with both axes dynamic (sequence up to the model's max_position_embeddings) -> float32
`logits` [batch, num_labels]; the labels' names are in the file's metadata (`id2label`, JSON). The weights are
inside the one .onnx file (ONNX's protobuf limit puts them in `OUT.data` beside it only past 2 GB).

The exporter is `torch.onnx.export(..., dynamo=True)`, the torch.export-based one (the default since torch 2.9;
it needs `onnxscript`): it traces with symbolic batch and sequence sizes, so transformers 5's attention-mask
code, which tests the shapes in Python, stays general. The legacy TorchScript exporter (`dynamo=False`,
deprecated) records those tests as constants of the example's shape: with torch 2.13 and transformers 5 its
BERT graph loads with dynamic axes but gives logits off by up to 2e-2 at other sizes.

The check: the standard-library docstrings that `tools.convert_to_hf --verify` uses, preceded by all of them
joined into one long text, tokenized with the folder's tokenizer at each batch size (the first B texts) and
each maximum length (truncated, padded to the longest: every batch reaches the length), run through
onnxruntime (CPU, full graph optimisation, as a server runs it) and through PyTorch; it fails when the logits
differ by more than `--tolerance` (absolute) or the argmax differs. The last stdout line is one JSON object of
the figures; a failure is one `error: ...` line and exit status 1.

Needs torch, transformers, onnx, onnxscript and onnxruntime; never jax.
"""

import argparse
import collections
import dataclasses
import json
import logging
import os
import sys
import textwrap
import time
import warnings

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOLERANCE = 1e-4
BATCH_SIZES = (1, 3, 7)
MAX_LENGTHS = (7, 33, 128)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class ExportError(Exception):
    """Bad input or a failed export or check; the CLI prints it as one `error: ...` line."""


def max_tokens(config) -> int:
    """The longest sequence the model's positions allow: RoBERTa's start after the padding id (pad_token_id + 1
    rows before the first position), BERT's at row 0."""
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    return config.max_position_embeddings - offset


def sample_texts() -> list[str]:
    """The texts of `tools.convert_to_hf.sample_texts` (kept equal by tests/test_onnx.py): that module imports
    jax, which this one must not need. First paragraphs of standard-library docstrings, and one [MASK]."""
    texts = []
    for obj in (json.dumps, os.path.join, collections.Counter, textwrap.wrap, dataclasses.dataclass):
        paragraph = (obj.__doc__ or "").strip().split("\n\n")[0]
        texts.append(" ".join(paragraph.split()))
    texts.append("The module writes its output to a [MASK] on disk.")
    return texts


def load_classifier(model_dir: str):
    """-> (model in eval mode, tokenizer, the graph's input names) of a fine-tuned classifier folder."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    try:
        with open(config_path, encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError) as e:
        raise ExportError(f"{config_path}: not a JSON object ({_first_line(e)})") from e
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ExportError(f"{model_dir} holds a {' / '.join(architectures)}, not a sequence classifier; fine-tune "
                          "it first: python -m tools.finetune_hf --model DIR --task TASK --save FINETUNED")
    # Imported here: `--help` and the errors about the arguments need no torch (a few seconds to import).
    import transformers  # pylint: disable=import-outside-toplevel

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    # Missing weights are reported below, as one error line; the loader's own report and progress bar would
    # only repeat it.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{model_dir}: cannot load a sequence classifier and its tokenizer: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    if info["missing_keys"]:
        raise ExportError(f"{model_dir} holds no trained classifier ({type(model).__name__} would start "
                          f"{', '.join(sorted(info['missing_keys'])[:4])} from random weights); fine-tune it "
                          "first: python -m tools.finetune_hf --model DIR --task TASK --save FINETUNED")
    names = [n for n in INPUT_NAMES if n in tokenizer.model_input_names]
    if "input_ids" not in names:
        raise ExportError(f"{model_dir}: the tokenizer gives no input_ids ({tokenizer.model_input_names})")
    return model.eval(), tokenizer, names


def export(model, tokenizer, names: list[str], out: str, opset: int | None = None) -> dict:
    """Writes the ONNX file `out` of `model` (-> logits) with dynamic batch and sequence axes; -> figures."""
    # Imported here: see load_classifier.
    import torch  # pylint: disable=import-outside-toplevel

    class Logits(torch.nn.Module):
        """The classifier with positional inputs and the logits alone as output (no ModelOutput, no loss)."""

        def __init__(self, classifier):
            super().__init__()
            self.model = classifier

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{n: inputs[n] for n in names}).logits

    max_len = max_tokens(model.config)
    # An example of batch 2 and length 16 (not 0 or 1, which torch.export specialises, and not equal sizes).
    example = tokenizer(sample_texts()[:2], truncation=True, max_length=min(16, max_len),
                        padding="max_length", return_tensors="pt")
    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1, max=max_len)
    dynamic = {n: {0: batch, 1: sequence} for n in names}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t0 = time.time()
    try:
        with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "torch._dynamo"):
            # The exporter's notices (torchvision absent, axis names shared, deprecations) are not the user's.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(Logits(model).eval(), (), kwargs={n: example[n].long() for n in names},
                                        input_names=names, output_names=["logits"], opset_version=opset,
                                        dynamo=True, dynamic_shapes=dynamic, verbose=False)
            program.model.metadata_props["id2label"] = json.dumps(
                {str(k): v for k, v in sorted(model.config.id2label.items())})
            program.save(out)
    except Exception as e:  # pylint: disable=broad-except
        # torch.export and the ONNX translation raise many types, wrapped in a page of advice: name the root cause.
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        raise ExportError(f"torch.onnx.export failed: {type(root).__name__}: {_first_line(root)}") from e
    return {"exporter": "torch.onnx.export(dynamo=True)", "opset": int(program.model.opset_imports[""]),
            "export_seconds": round(time.time() - t0, 1), "external_data": os.path.isfile(out + ".data"),
            "bytes": os.path.getsize(out) + (os.path.getsize(out + ".data") if os.path.isfile(out + ".data") else 0)}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "(no message)"


class _quiet:
    """Raises the level of some loggers to ERROR for a while."""

    def __init__(self, *names):
        self.loggers = [logging.getLogger(n) for n in names]
        self.levels = []

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def check(model, tokenizer, names: list[str], out: str, batch_sizes=BATCH_SIZES, max_lengths=MAX_LENGTHS,
          tolerance: float = TOLERANCE, texts: list[str] | None = None) -> dict:
    """Runs the ONNX file with onnxruntime and `model` with PyTorch on real text at each batch size and maximum
    length; -> figures (`ok` False when the logits differ by more than `tolerance` or the argmax differs)."""
    # Imported here: see load_classifier.
    import onnxruntime  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    # All of them joined, first: a text longer than every maximum length, so that each is reached.
    texts = texts or [" ".join(sample_texts())] + sample_texts()
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    if [i.name for i in session.get_inputs()] != names:
        raise ExportError(f"{out}: inputs {[i.name for i in session.get_inputs()]}, expected {names}")
    worst, same_argmax, shapes = 0.0, True, []
    max_len = max_tokens(model.config)
    for length in sorted({min(n, max_len) for n in max_lengths}):
        for size in batch_sizes:
            batch = tokenizer(texts[:size], truncation=True, max_length=length, padding=True, return_tensors="np")
            feed = {n: batch[n].astype(np.int64) for n in names}
            if list(feed["input_ids"].shape) in shapes:
                continue  # the same texts at the same length as before (all shorter than both lengths)
            ours = session.run(["logits"], feed)[0]
            with torch.no_grad():
                theirs = model(**{n: torch.from_numpy(v) for n, v in feed.items()}).logits.numpy()
            if ours.shape != theirs.shape:
                raise ExportError(f"{out}: logits of shape {ours.shape} for {theirs.shape}")
            worst = max(worst, float(np.abs(ours - theirs).max()))
            same_argmax = same_argmax and bool((ours.argmax(-1) == theirs.argmax(-1)).all())
            shapes.append(list(feed["input_ids"].shape))
    return {"checked_shapes": shapes, "texts": len(texts), "max_abs_diff_logits": worst, "tolerance": tolerance,
            "predictions_match": same_argmax, "ok": bool(worst <= tolerance and same_argmax)}


def export_and_check(model_dir: str, out: str, opset: int | None = None, tolerance: float = TOLERANCE,
                     batch_sizes=BATCH_SIZES, max_lengths=MAX_LENGTHS) -> dict:
    """The CLI's work: load, export, check; -> the figures. Raises ExportError on bad input or a failed export
    (not on a failed check: the figures say `ok`)."""
    model, tokenizer, names = load_classifier(model_dir)
    # Imported here: see load_classifier.
    import onnxruntime  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    figures = {"model": model_dir, "out": out, "architecture": type(model).__name__,
               "num_labels": model.config.num_labels, "inputs": names}
    figures.update(export(model, tokenizer, names, out, opset))
    figures.update(check(model, tokenizer, names, out, batch_sizes, max_lengths, tolerance))
    figures["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "onnxruntime": onnxruntime.__version__}
    return figures


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1: {text!r}")
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export_onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="fine-tuned Hugging Face classifier folder with tokenizer")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="largest allowed absolute difference of the logits, onnxruntime vs PyTorch")
    parser.add_argument("--batch-sizes", type=_sizes, default=BATCH_SIZES, help="checked batch sizes (1,3,7)")
    parser.add_argument("--max-lengths", type=_sizes, default=MAX_LENGTHS,
                        help="checked maximum sequence lengths, capped at the model's (7,33,128)")
    args = parser.parse_args(argv)
    try:
        figures = export_and_check(args.model, args.out, args.opset, args.tolerance, args.batch_sizes,
                                   args.max_lengths)
    except ExportError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out} (opset {figures['opset']}, {figures['bytes'] / 1e6:.1f} MB, "
          f"{figures['export_seconds']} s); onnxruntime vs PyTorch on {len(figures['checked_shapes'])} batches "
          f"[batch, sequence] {figures['checked_shapes']}: max abs diff of the logits "
          f"{figures['max_abs_diff_logits']:.3g} (tolerance {figures['tolerance']:.3g}), same predictions: "
          f"{figures['predictions_match']}")
    print(json.dumps(figures))
    if not figures["ok"]:
        sys.exit(f"error: onnxruntime's logits differ from PyTorch's by {figures['max_abs_diff_logits']:.3g} "
                 f"(tolerance {figures['tolerance']:.3g}; same predictions: {figures['predictions_match']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
