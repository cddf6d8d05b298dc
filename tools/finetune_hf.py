"""Fine-tune a Hugging Face BERT or ELECTRA folder on a task of one of three shapes, in PyTorch, and test it:
classify a text, classify a text pair, or tag each word (token classification, BIO tags).

    python -m tools.finetune_hf --model HF_DIR --task DIR [--num-train N] [--seed S] [--max-len L]
                                [--epochs 3] [--min-steps 0] [--lr 5e-5] [--batch-size 16] [--random-init]
                                [--pooling cls|mean] [--head auto|bert|electra] [--layerwise-lr-decay D]

HF_DIR: any folder `AutoModelForSequenceClassification` / `AutoModelForTokenClassification` loads (ours from
`python -m tools.convert_to_hf`, or a bare encoder such as all-MiniLM-L6-v2, whose missing pooler/classifier
start fresh) with its tokenizer files. DIR: a task folder from `python -m data_pipeline.tasks` (train.jsonl,
test.jsonl, labels.json); labels.json says its shape, so no flag does (`tools.finetune_tasks`, `--help`):
single texts and text pairs ([CLS] A [SEP] B [SEP] with segment ids) go through a sequence classifier, word
lists with a tag per word through a token classifier that labels each word's first subword.

The standard recipe: the whole network is trained with AdamW (weight decay 0.01, not on biases and LayerNorm),
the learning rate rises linearly over the first 6% of the steps and then decays linearly to 0, gradients are
clipped to norm 1, dropout 0.1, `--epochs` passes over the (optionally subsampled) training set, or more
passes when that is fewer than `--min-steps` optimizer steps: with a few hundred labels 3 epochs are ~100 steps,
which leaves a model far from fitted (few-sample fine-tuning wants more iterations: Mosbach et al. 2021,
"On the Stability of Fine-tuning BERT"; Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning").
`--num-train N` keeps N training examples drawn with `--seed` (which also seeds the classifier's
initialisation, dropout and the batch order: `torch.manual_seed`). `--random-init` keeps the folder's
architecture and tokenizer but starts from random weights (the no-pretraining baseline).

Sequence tasks (single texts, pairs) may change the classifier: `--head auto` (the default) is the folder's own
`AutoModelForSequenceClassification`; `--head bert` is BERT's (a dense + tanh "pooler", dropout, a linear layer
to the labels), `--head electra` Hugging Face's ElectraClassificationHead (dropout, dense, GELU, dropout, linear).
`--pooling cls` (the default) feeds the head the [CLS] final hidden state, `--pooling mean` the mean of the
final hidden states over the attention mask. An explicit head, or mean pooling (then with the folder's family's
head: electra for ELECTRA folders, else bert), puts a freshly initialised head (normal, std = the config's
initializer_range; zero biases) on the folder's bare encoder (`AutoModel`: every encoder weight must come from
the folder, else one error line; its own pooler, if any, is dropped), so any encoder can go under any head (the
head-swap control); such a model is not a transformers class, so `--save` refuses it. Token tasks
keep their token classifier and refuse both flags. `--layerwise-lr-decay D` (ELECTRA's fine-tuning rule,
default 1: off) gives the head (classifier and pooler) the peak lr, layer k of L (0-based) lr * D**(L + 1 - k) and
the embeddings (with ELECTRA's embedding projection, DeBERTa's relative embeddings) lr * D**(L + 2), as
ELECTRA's fine-tuning code does.

Reports accuracy and macro-F1 on the test split (token tasks: entity-level precision / recall / F1 with
seqeval, and token accuracy); the last stdout line is one JSON object.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from tools.finetune_tasks import (Split, encode, fail, first_subwords, input_size, load_task, scores,
                                  token_targets)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


TASK_SHAPES = """task shapes (labels.json; rows of train.jsonl / test.jsonl):
  [labels] or {"kind": "single", ...}   {"text", "label"}: one text; accuracy, macro-F1
  {"kind": "pair", "labels": [...]}      {"text", "text_pair", "label"}: [CLS] A [SEP] B [SEP] with segment ids,
                                         truncated longer part first; accuracy, macro-F1
  {"kind": "token", "labels": BIO tags}  {"tokens": [words], "tags": [a tag per word]}: the first subword of each
                                         word is labelled; entity precision / recall / F1 (seqeval), token accuracy
e.g. python -m data_pipeline.tasks docstring_pairs --out data/docstring_pairs   (or docstring_origin,
docstring_params). The last stdout line is one JSON object."""


POOLINGS = ("cls", "mean")
HEADS = ("auto", "bert", "electra")


def build_model(model_dir: str, labels: list[str], random_init: bool, dropout: float, kind: str = "single",
                head: str = "auto", pooling: str = "cls"):
    """A sequence classifier (single texts, pairs) or a token classifier (kind "token") with `labels`: the
    folder's transformers class, or (an explicit head, or mean pooling) its bare encoder under
    tools.finetune_heads.SequenceClassifier."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        fail(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
             "label2id": {lab: i for i, lab in enumerate(labels)},
             "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    config = AutoConfig.from_pretrained(model_dir, **extra)
    if kind != "token" and (head != "auto" or pooling != "cls"):
        from tools.finetune_heads import SequenceClassifier

        if random_init:
            encoder = AutoModel.from_config(config)
        else:
            encoder, info = AutoModel.from_pretrained(model_dir, config=config, output_loading_info=True)
            missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
            if missing:  # a bare encoder must come whole from the folder: nothing silently random
                fail(f"{model_dir}: the encoder's weights {', '.join(missing[:5])}... are not in the folder")
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # the head has its own; the encoder's would get no gradient
        if head == "auto":
            head = "electra" if config.model_type == "electra" else "bert"
        return SequenceClassifier(encoder, len(labels), head, pooling, dropout)
    auto = AutoModelForTokenClassification if kind == "token" else AutoModelForSequenceClassification
    if random_init:
        return auto.from_config(config)
    return auto.from_pretrained(model_dir, config=config)


def optimizer_and_schedule(model, lr: float, weight_decay: float, total_steps: int, warmup_fraction: float,
                           layer_decay: float = 1.0):
    """AdamW over parameter groups (no weight decay on biases and LayerNorm parameters, as in BERT; with
    `layer_decay` < 1, lr * layer_decay ** decay_exponent per depth) and the warmup-then-linear schedule."""
    import torch
    from tools.finetune_heads import decay_exponent

    groups = {}  # (exponent, no decay) -> parameters; a single exponent (0) when layer_decay is 1
    for name, p in model.named_parameters():
        depth = decay_exponent(name, model.config.num_hidden_layers) if layer_decay != 1.0 else 0
        no_decay = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
        groups.setdefault((depth, no_decay), []).append(p)
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                              "lr": lr * layer_decay ** depth} for (depth, no_decay), params in sorted(groups.items())],
                            lr=lr, eps=1e-8)
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batch(tokenizer, kind: str, split: Split, idx, max_len: int):
    """The encoded inputs of examples `idx` and their labels (per example, or per token for token tasks)."""
    import torch

    enc = encode(tokenizer, kind, [split.inputs[i] for i in idx], max_len)
    if kind == "token":
        return enc, torch.as_tensor(token_targets(enc, [split.targets[i] for i in idx]))
    return enc, torch.as_tensor(np.asarray([split.targets[i] for i in idx], np.int64))


def predict(model, tokenizer, kind: str, inputs: list, max_len: int, outside: int = 0, batch_size: int = 128):
    """Label indices per example, or (token tasks) an array of tag indices per word, where a word cut off by
    max_len gets `outside` (the "O" tag)."""
    import torch

    model.eval()
    # Sorting by length makes the padded batches short; the predictions go back to the input order.
    order = sorted(range(len(inputs)), key=lambda i: input_size(kind, inputs[i]))
    preds = [None] * len(inputs)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = encode(tokenizer, kind, [inputs[i] for i in idx], max_len)
            best = model(**enc).logits.argmax(-1).numpy()
            for row, i in enumerate(idx):
                if kind != "token":
                    preds[i] = int(best[row])
                    continue
                preds[i] = np.full(len(inputs[i]), outside, np.int64)
                for pos, word in first_subwords(enc, row):
                    preds[i][word] = best[row, pos]
    return preds


def num_epochs(num_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """`epochs`, or more whole epochs when that gives fewer than `min_steps` optimizer steps."""
    return max(epochs, math.ceil(min_steps / math.ceil(num_train / batch_size)))


def train(model, tokenizer, kind: str, split: Split, opt, sched, epochs: int, batch_size: int, max_len: int,
          log) -> int:
    """`epochs` passes in a fresh torch.randperm order each; returns the optimizer steps taken."""
    import torch

    t0 = time.time()
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(split.inputs)).tolist()
        losses = []
        for start in range(0, len(perm), batch_size):
            enc, labels = batch(tokenizer, kind, split, perm[start:start + batch_size], max_len)
            out = model(**enc, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: train loss {np.mean(losses):.4f} ({time.time() - t0:.0f} s)")
    return step


def finetune(model_dir: str, task_dir: str, num_train: int | None = None, seed: int = 0, max_len: int = 128,
             epochs: int = 3, lr: float = 5e-5, batch_size: int = 16, weight_decay: float = 0.01,
             warmup_fraction: float = 0.06, dropout: float = 0.1, random_init: bool = False,
             min_steps: int = 0, log=print, save: str | None = None, pooling: str = "cls", head: str = "auto",
             layerwise_lr_decay: float = 1.0) -> dict:
    """Fine-tunes and evaluates; returns the figures (accuracy and macro_f1, or entity_precision / entity_recall /
    entity_f1 and token_accuracy for a token task, with the settings)."""
    import torch
    from transformers import AutoTokenizer

    if num_train is not None and num_train < 1:
        fail(f"--num-train must be >= 1, got {num_train}")
    if max_len < 8 or epochs < 1 or batch_size < 1 or lr <= 0 or min_steps < 0:
        fail(f"need max_len >= 8, epochs >= 1, batch_size >= 1, lr > 0, min_steps >= 0; got {max_len}, {epochs}, "
             f"{batch_size}, {lr}, {min_steps}")
    if pooling not in POOLINGS or head not in HEADS:
        fail(f"--pooling must be one of {', '.join(POOLINGS)} and --head one of {', '.join(HEADS)}; "
             f"got {pooling!r}, {head!r}")
    if not 0.0 < layerwise_lr_decay <= 1.0:
        fail(f"--layerwise-lr-decay must be in (0, 1] (1: off), got {layerwise_lr_decay}")
    custom = (pooling, head) != ("cls", "auto")
    if custom and save:
        fail("--save writes a transformers class: it takes the default --head auto --pooling cls only")
    task = load_task(task_dir)
    if custom and task.kind == "token":
        fail(f"{task_dir} is a token task: --pooling and --head apply to sequence tasks only "
             f"(got --pooling {pooling} --head {head})")
    rng = np.random.RandomState(seed)
    keep = rng.permutation(len(task.train.inputs))[:num_train] if num_train else range(len(task.train.inputs))
    task.train = task.train.take(keep)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if task.kind == "token" and not tokenizer.is_fast:
        fail(f"{model_dir}: a token task needs a fast tokenizer (tokenizer.json) for its word alignment")
    model = build_model(model_dir, task.labels, random_init, dropout, task.kind, head, pooling)
    n = len(task.train.inputs)
    epochs = num_epochs(n, batch_size, epochs, min_steps)
    opt, sched = optimizer_and_schedule(model, lr, weight_decay, math.ceil(n / batch_size) * epochs,
                                        warmup_fraction, layerwise_lr_decay)
    t0 = time.time()
    steps = train(model, tokenizer, task.kind, task.train, opt, sched, epochs, batch_size, max_len, log)
    train_seconds = time.time() - t0
    if save:  # the fine-tuned model and its tokenizer, a folder that from_pretrained and tools.export_onnx load
        model.save_pretrained(save)
        tokenizer.save_pretrained(save)
    outside = task.labels.index("O") if task.kind == "token" else 0
    preds = predict(model, tokenizer, task.kind, task.test.inputs, max_len, outside)
    return {"model": model_dir, "task": task_dir, "kind": task.kind, "random_init": random_init, "num_train": n,
            "seed": seed, "max_len": max_len, "epochs": epochs, "min_steps": min_steps, "lr": lr,
            "batch_size": batch_size, "pooling": pooling, "head": head,
            "layerwise_lr_decay": layerwise_lr_decay, "steps": steps, "num_test": len(task.test.inputs),
            **scores(task, preds), "train_seconds": round(train_seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.finetune_hf", description=__doc__.split("\n\n")[0],
                                     epilog=TASK_SHAPES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face folder (BERT or ELECTRA) with its tokenizer")
    parser.add_argument("--task", required=True,
                        help="task folder from `python -m data_pipeline.tasks`; its labels.json gives the shape")
    parser.add_argument("--num-train", type=int, default=None, help="training examples to use (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=128, help="tokens per example, [CLS]/[SEP] included")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--min-steps", type=int, default=0,
                        help="train more epochs when --epochs gives fewer optimizer steps than this")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.06, help="warmup fraction of the steps")
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
    parser.add_argument("--random-init", action="store_true", help="the folder's architecture, random weights")
    parser.add_argument("--pooling", choices=POOLINGS, default="cls",
                        help="sequence tasks: the head reads the [CLS] state (cls) or the masked mean (mean)")
    parser.add_argument("--head", choices=HEADS, default="auto",
                        help="sequence tasks: auto (the folder's own classifier), or BERT's / ELECTRA's head, "
                             "fresh, on the folder's bare encoder")
    parser.add_argument("--layerwise-lr-decay", type=float, default=1.0, metavar="D",
                        help="head lr, layer k of L lr * D**(L+1-k), embeddings lr * D**(L+2) (ELECTRA's "
                             "rule); 1 (default): off")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="write the fine-tuned model and tokenizer there (save_pretrained)")
    args = parser.parse_args(argv)
    result = finetune(args.model, args.task, args.num_train, args.seed, args.max_len, args.epochs, args.lr,
                      args.batch_size, args.weight_decay, args.warmup, args.dropout, args.random_init,
                      min_steps=args.min_steps, log=lambda msg: print(msg, flush=True), save=args.save,
                      pooling=args.pooling, head=args.head, layerwise_lr_decay=args.layerwise_lr_decay)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
