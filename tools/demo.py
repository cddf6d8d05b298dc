"""The README's main job: raw text -> tokenizer -> shards -> a trained tiny BERT, on this CPU, no download.

    python -m tools.demo --workdir runs/demo

1. builds the embedded corpus (docstrings of the standard library and the installed packages),
2. trains a WordPiece vocabulary and pretokenizes the corpus into TFRecord shards (`W/data`),
3. trains configs/bert.py:tiny for a few minutes (`W/train`; run again to resume),
4. prints the eval curve, and compares the final eval MLM accuracy with the accuracy of always predicting
   the most frequent token (it must be at least 3x that).
Extra `--config.KEY=VALUE`-style overrides are not taken here: use `python -m bert_jax.training` for that.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def most_frequent_token_accuracy(data_dir: str) -> tuple[float, str]:
    """Accuracy of always predicting the training split's most frequent maskable token, on the validation
    split's maskable tokens (masked positions are drawn uniformly among those, so this is the expected
    accuracy of that constant predictor)."""
    import numpy as np
    from data_pipeline import dataset, manifest as manifest_lib, tokenization

    manifest = manifest_lib.load(data_dir)
    special = np.asarray(list(manifest.special_token_ids) + [manifest.special_ids.pad])

    def counts(split):
        total = np.zeros(manifest.vocab_size, np.int64)
        ds = dataset.make_dataset(data_dir, split, 256, shuffle=False, repeat=False, drop_remainder=False)
        for batch in ds.as_numpy_iterator():
            total += np.bincount(batch["input_ids"].ravel(), minlength=len(total))
        total[special] = 0
        return total

    train, val = counts("train"), counts("validation")
    top = int(train.argmax())
    tok = tokenization.Tokenizer.load(os.path.join(data_dir, manifest.tokenizer.dir))
    return float(val[top] / val.sum()), tok.id_to_token(top)


FILL_MASK_SENTENCES = (
    "Return the number of [MASK] in the list.",
    "If the file does not [MASK], an error is raised.",
    "This function returns a new [MASK] object.",
    "The default value is [MASK].",
)


def fill_mask_demo(workdir: str, hf_dir: str) -> None:
    """Exports the newest checkpoint as a Hugging Face BertForMaskedLM folder and runs transformers'
    fill-mask pipeline on it (needs the `hf` extra: transformers + torch)."""
    if importlib.util.find_spec("transformers") is None:
        print("      (skipping the Hugging Face export: install the `hf` extra for it)")
        return
    from tools import convert_to_hf  # pylint: disable=import-outside-toplevel
    convert_to_hf.convert(workdir, hf_dir, overwrite=True)
    from transformers import pipeline  # pylint: disable=import-outside-toplevel
    fill = pipeline("fill-mask", model=hf_dir, device="cpu")
    print(f"exported to {hf_dir} (transformers BertForMaskedLM); fill-mask, top 3:")
    for sentence in FILL_MASK_SENTENCES:
        guesses = ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in fill(sentence, top_k=3))
        print(f"      {sentence:50s} -> {guesses}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and metrics go")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the tiny recipe's)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-documents", type=int, default=None, help="cap on corpus documents")
    parser.add_argument("--source", default="docstrings",
                        help="corpus: docstrings (stdlib + installed packages), docstrings:stdlib, or files")
    args = parser.parse_args(argv)

    from bert_jax import training  # first: it sets TensorFlow's environment before TensorFlow loads
    from bert_jax import trainer, workdir as workdir_lib
    from configs import bert as bert_configs
    from data_pipeline import manifest as manifest_lib, pretokenize

    training.quiet_logs()

    data_dir = os.path.join(args.workdir, "data")
    t0 = time.time()
    if os.path.exists(manifest_lib.path(data_dir)):
        print(f"[1/3] reusing the pretokenized corpus in {data_dir}")
    else:
        print("[1/3] building the docstring corpus, training WordPiece, pretokenizing ...", flush=True)
        pretokenize.pretokenize(args.source, data_dir, vocab_size=args.vocab_size, seq_len=args.seq_len,
                                max_documents=args.max_documents,
                                cache_dir=os.path.join(args.workdir, "corpus_cache"))
    manifest = manifest_lib.load(data_dir)
    train, val = manifest.splits["train"], manifest.splits["validation"]
    print(f"      {train.documents:,} train / {val.documents:,} validation documents -> {train.rows:,} / "
          f"{val.rows:,} rows of {manifest.seq_len} tokens; vocab {manifest.vocab_size} ({time.time() - t0:.0f} s)")

    config = bert_configs.get_config("tiny")
    with config.unlocked():
        config.data.dir = data_dir
        config.data.seq_len = manifest.seq_len
        if args.steps:
            config.train.steps = args.steps
            config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, args.steps // 10))
    workdir = os.path.join(args.workdir, "train")
    print(f"[2/3] training configs/bert.py:tiny for {config.train.steps} steps in {workdir}", flush=True)
    t1 = time.time()
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    trainer.train_and_evaluate(config, workdir)
    print(f"      trained in {time.time() - t1:.0f} s")

    print("[3/3] eval curve (validation split, fixed masks):")
    records = [json.loads(line) for line in open(workdir_lib.metrics(workdir), encoding="utf-8")]
    evals = [r for r in records if "eval/loss" in r]
    print("      step   eval/loss   eval/mlm_accuracy")
    for r in evals:
        print(f"      {r['step']:>4}   {r['eval/loss']:9.4f}   {r['eval/mlm_accuracy']:.4f}")
    baseline, token = most_frequent_token_accuracy(data_dir)
    final = evals[-1]["eval/mlm_accuracy"]
    ratio = final / baseline
    print(f"final eval MLM accuracy {final:.4f}; always predicting the most frequent token ({token!r}) "
          f"scores {baseline:.4f}: {ratio:.1f}x ({'OK' if ratio >= 3 else 'BELOW'} the 3x target)")
    fill_mask_demo(workdir, os.path.join(args.workdir, "hf"))
    print(json.dumps({"eval_mlm_accuracy": final, "most_frequent_token_accuracy": baseline, "ratio": ratio,
                      "steps": evals[-1]["step"], "seconds": round(time.time() - t0, 1)}))
    return 0 if ratio >= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
