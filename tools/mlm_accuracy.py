"""Masked-token accuracy of exported models under transformers' own classes, on held-out documents.

    python -m tools.mlm_accuracy --data runs/downstream/data --model runs/downstream/hf_mlm \
        --model runs/downstream/hf_deberta_mlm

An independent check of the pretraining eval (which runs our model on packed rows with 80/10/10 corruption):
the validation split's packed rows are cut back into their documents at each [CLS], each document is its own
sequence, `--fraction` of its non-special tokens (at least one) become [MASK] (all of them: no random or kept
tokens, so the input shows nothing of the answers), and each `--model` folder runs through
`transformers.AutoModelForMaskedLM` (PyTorch). Every model sees the same documents and positions (`--seed`).
A model that does well here does so on masked ids alone: nothing of our packing, attention masks or eval code
is involved. The last stdout line is one JSON object: model -> accuracy, positions, documents.
"""

import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def masked_documents(data_dir: str, manifest, split: str, max_rows: int, fraction: float, seed: int):
    """-> (documents: list of int64 [L] token ids, positions: list of sorted masked indices), the first
    `max_rows` packed rows of `split` of `data_dir` (whose loaded manifest is `manifest`) cut at each [CLS]
    (padding dropped; documents with fewer than 2 maskable tokens skipped), masked positions drawn uniformly
    among each document's non-special tokens."""
    from data_pipeline import dataset  # pylint: disable=import-outside-toplevel

    cls_id, pad_id = manifest.special_ids.cls, manifest.special_ids.pad
    special = np.asarray(sorted(set(manifest.special_token_ids) | {pad_id}))
    rng = np.random.default_rng(seed)
    docs, positions, rows = [], [], 0
    ds = dataset.make_dataset(data_dir, split, 64, shuffle=False, repeat=False, drop_remainder=False)
    for batch in dataset.as_numpy(ds):
        for row in batch["input_ids"][:max_rows - rows].astype(np.int64):
            starts = list(np.flatnonzero(row == cls_id)) + [len(row)]
            for a, b in zip(starts[:-1], starts[1:]):
                doc = row[a:b][row[a:b] != pad_id]
                can = np.flatnonzero(~np.isin(doc, special))
                if len(can) < 2:
                    continue
                k = max(1, int(round(fraction * len(can))))
                docs.append(doc)
                positions.append(np.sort(rng.choice(can, size=k, replace=False)))
        rows += min(len(batch["input_ids"]), max_rows - rows)
        if rows >= max_rows:
            break
    return docs, positions


def check_vocabulary(manifest, data_dir: str, model_dir: str) -> None:
    """One-line error unless the model folder's tokenizer has the data's vocabulary (`Tokenizer.vocab_hash`, the
    hash the manifest records, for every tokenizer family) and its config at least the data's vocabulary size."""
    from data_pipeline.tokenization import Tokenizer  # pylint: disable=import-outside-toplevel

    config = os.path.join(model_dir, "config.json")
    if not os.path.exists(config):
        raise SystemExit(f"error: --model {model_dir}: no config.json (not a transformers model folder)")
    try:
        vocab_hash = Tokenizer.load(model_dir).vocab_hash
    except Exception:  # pylint: disable=broad-except  # no tokenizer in the folder: the size check below stands
        vocab_hash = None
    if manifest.vocab_hash and vocab_hash and vocab_hash != manifest.vocab_hash:
        raise SystemExit(f"error: --model {model_dir}: its tokenizer is not the vocabulary of --data {data_dir} "
                         "(vocab_hash differs from its manifest's)")
    with open(config, encoding="utf-8") as f:
        size = json.load(f).get("vocab_size", 0)
    if size < manifest.vocab_size:
        raise SystemExit(f"error: {config}: vocab_size {size} < the data's {manifest.vocab_size}")


def load_masked_lm(model_dir: str):
    """transformers' AutoModelForMaskedLM of the folder; a one-line error when any of its weights would be newly
    initialised (e.g. an ELECTRA discriminator or a bare encoder: no trained masked-LM head)."""
    from transformers import AutoModelForMaskedLM  # pylint: disable=import-outside-toplevel

    model, info = AutoModelForMaskedLM.from_pretrained(model_dir, output_loading_info=True)
    if info["missing_keys"]:
        raise SystemExit(f"error: --model {model_dir} has no trained masked-LM head for {type(model).__name__} "
                         f"(missing: {', '.join(sorted(info['missing_keys']))})")
    return model.eval()


def accuracy(model, docs, positions, mask_id: int, batch_size: int = 32) -> tuple[int, int]:
    """(correct, total) argmax predictions of a transformers masked-LM model at the masked positions, documents
    batched by length."""
    import torch  # pylint: disable=import-outside-toplevel

    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(docs[i]) for i in idx)
            ids = np.zeros((len(idx), width), np.int64)
            mask = np.zeros((len(idx), width), np.int64)
            for r, i in enumerate(idx):
                ids[r, :len(docs[i])], mask[r, :len(docs[i])] = docs[i], 1
                ids[r, positions[i]] = mask_id
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
            for r, i in enumerate(idx):
                pred = logits[r, positions[i]].argmax(-1).numpy()
                correct += int((pred == docs[i][positions[i]]).sum())
                total += len(positions[i])
    return correct, total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mlm_accuracy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="pretokenized data folder (its manifest and shards)")
    parser.add_argument("--model", action="append", required=True,
                        help="a transformers *ForMaskedLM folder with the data's vocabulary (repeatable)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--rows", type=int, default=400, help="packed rows read from the split (default 400)")
    parser.add_argument("--fraction", type=float, default=0.15, help="of each document's tokens masked")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 < args.fraction < 1.0:
        parser.error(f"--fraction must be in (0, 1), got {args.fraction}")
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    from data_pipeline import manifest as manifest_lib  # pylint: disable=import-outside-toplevel
    if not os.path.exists(manifest_lib.path(args.data)):
        parser.error(f"--data {args.data}: no manifest.json (not a pretokenized data folder)")
    manifest = manifest_lib.load(args.data)
    for model_dir in args.model:
        check_vocabulary(manifest, args.data, model_dir)
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    models = {model_dir: load_masked_lm(model_dir) for model_dir in args.model}
    docs, positions = masked_documents(args.data, manifest, args.split, args.rows, args.fraction, args.seed)
    if not docs:
        raise SystemExit(f"error: --data {args.data}: no document with 2 maskable tokens in the {args.split} split")
    out = {}
    for model_dir, model in models.items():
        correct, total = accuracy(model, docs, positions, manifest.special_ids.mask)
        out[model_dir] = {"accuracy": correct / total, "positions": total, "documents": len(docs)}
        print(f"{model_dir}: {correct / total:.4f} ([MASK]-only accuracy, {total} positions in {len(docs)} "
              f"documents of {args.split})", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
