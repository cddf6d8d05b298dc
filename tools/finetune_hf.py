"""Fine-tune a Hugging Face BERT or ELECTRA folder for sequence classification, in PyTorch, and test it.

    python -m tools.finetune_hf --model HF_DIR --task DIR [--num-train N] [--seed S] [--max-len L]
                                [--epochs 3] [--min-steps 0] [--lr 5e-5] [--batch-size 16] [--random-init]

HF_DIR: any folder `AutoModelForSequenceClassification` loads (ours from `python -m tools.convert_to_hf`, or a
bare encoder such as all-MiniLM-L6-v2, whose missing pooler/classifier start fresh) with its tokenizer files.
DIR: a task folder from `python -m data_pipeline.tasks` (train.jsonl, test.jsonl, labels.json).

The standard recipe: the whole network is trained with AdamW (weight decay 0.01, not on biases and LayerNorm),
the learning rate rises linearly over the first 6% of the steps and then decays linearly to 0, gradients are
clipped to norm 1, dropout 0.1, `--epochs` passes over the (optionally subsampled) training set, or more
passes when that is fewer than `--min-steps` optimizer steps: with a few hundred labels 3 epochs are ~100 steps,
which leaves a model far from fitted (few-sample fine-tuning wants more iterations: Mosbach et al. 2021,
"On the Stability of Fine-tuning BERT"; Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning").
`--num-train N` keeps N training examples drawn with `--seed` (which also seeds the classifier's
initialisation, dropout and the batch order: `torch.manual_seed`). `--random-init` keeps the folder's
architecture and tokenizer but starts from random weights (the no-pretraining baseline).
Reports accuracy and macro-F1 on the test split; the last stdout line is one JSON object.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fail(message: str):
    raise SystemExit(f"error: {message}")


def read_jsonl(path: str, labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Texts and label indices of one split file; a bad line is a one-line error naming the file and line."""
    if not os.path.isfile(path):
        fail(f"no {path} (make the task with `python -m data_pipeline.tasks`)")
    index = {lab: i for i, lab in enumerate(labels)}
    texts, ys = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                text, label = ex["text"], ex["label"]
            except (json.JSONDecodeError, KeyError, TypeError):
                fail(f"{path}:{lineno}: not a JSON object with 'text' and 'label'")
            if label not in index:
                fail(f"{path}:{lineno}: label {label!r} is not in labels.json")
            texts.append(text)
            ys.append(index[label])
    if not texts:
        fail(f"{path} holds no examples")
    return texts, np.asarray(ys, np.int64)


def load_task(task_dir: str):
    path = os.path.join(task_dir, "labels.json")
    if not os.path.isfile(path):
        fail(f"no {path} (make the task with `python -m data_pipeline.tasks`)")
    with open(path, encoding="utf-8") as f:
        labels = json.load(f)
    if not isinstance(labels, list) or len(labels) < 2:
        fail(f"{path} must hold a list of at least 2 labels")
    train = read_jsonl(os.path.join(task_dir, "train.jsonl"), labels)
    test = read_jsonl(os.path.join(task_dir, "test.jsonl"), labels)
    return labels, train, test


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    """Unweighted mean over labels of F1 (a label never predicted nor present counts as 0)."""
    scores = []
    for k in range(num_labels):
        tp = np.sum((y_pred == k) & (y_true == k))
        fp = np.sum((y_pred == k) & (y_true != k))
        fn = np.sum((y_pred != k) & (y_true == k))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def build_model(model_dir: str, labels: list[str], random_init: bool, dropout: float):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        fail(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
             "label2id": {lab: i for i, lab in enumerate(labels)},
             "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    config = AutoConfig.from_pretrained(model_dir, **extra)
    if random_init:
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)


def optimizer_and_schedule(model, lr: float, weight_decay: float, total_steps: int, warmup_fraction: float):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # No weight decay on biases and LayerNorm parameters, as in BERT.
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-8)
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def encode(tokenizer, texts: list[str], max_len: int):
    return tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")


def predict(model, tokenizer, texts: list[str], max_len: int, batch_size: int = 128) -> np.ndarray:
    import torch

    model.eval()
    # Sorting by length makes the padded batches short; the predictions go back to the input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds = np.empty(len(texts), np.int64)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            logits = model(**encode(tokenizer, [texts[i] for i in idx], max_len)).logits
            preds[idx] = logits.argmax(-1).numpy()
    return preds


def num_epochs(num_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """`epochs`, or more whole epochs when that gives fewer than `min_steps` optimizer steps."""
    return max(epochs, math.ceil(min_steps / math.ceil(num_train / batch_size)))


def finetune(model_dir: str, task_dir: str, num_train: int | None = None, seed: int = 0, max_len: int = 128,
             epochs: int = 3, lr: float = 5e-5, batch_size: int = 16, weight_decay: float = 0.01,
             warmup_fraction: float = 0.06, dropout: float = 0.1, random_init: bool = False,
             min_steps: int = 0, log=print) -> dict:
    """Fine-tunes and evaluates; returns the figures (accuracy, macro_f1, ...)."""
    import torch
    from transformers import AutoTokenizer

    if num_train is not None and num_train < 1:
        fail(f"--num-train must be >= 1, got {num_train}")
    if max_len < 8 or epochs < 1 or batch_size < 1 or lr <= 0 or min_steps < 0:
        fail(f"need max_len >= 8, epochs >= 1, batch_size >= 1, lr > 0, min_steps >= 0; got {max_len}, {epochs}, "
             f"{batch_size}, {lr}, {min_steps}")
    labels, (train_x, train_y), (test_x, test_y) = load_task(task_dir)
    rng = np.random.RandomState(seed)
    keep = rng.permutation(len(train_x))[:num_train] if num_train else np.arange(len(train_x))
    train_x, train_y = [train_x[i] for i in keep], train_y[keep]
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(model_dir, labels, random_init, dropout)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    epochs = num_epochs(len(train_x), batch_size, epochs, min_steps)
    total = steps_per_epoch * epochs
    opt, sched = optimizer_and_schedule(model, lr, weight_decay, total, warmup_fraction)
    t0 = time.time()
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_x)).tolist()
        losses = []
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            batch = encode(tokenizer, [train_x[i] for i in idx], max_len)
            out = model(**batch, labels=torch.as_tensor(train_y[idx]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: train loss {np.mean(losses):.4f} ({time.time() - t0:.0f} s)")
    train_seconds = time.time() - t0
    preds = predict(model, tokenizer, test_x, max_len)
    return {"model": model_dir, "task": task_dir, "random_init": random_init, "num_train": len(train_x),
            "seed": seed, "max_len": max_len, "epochs": epochs, "min_steps": min_steps, "lr": lr,
            "batch_size": batch_size,
            "steps": step, "num_test": len(test_x),
            "accuracy": float(np.mean(preds == test_y)), "macro_f1": macro_f1(test_y, preds, len(labels)),
            "train_seconds": round(train_seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.finetune_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face folder (BERT or ELECTRA) with its tokenizer")
    parser.add_argument("--task", required=True, help="task folder from `python -m data_pipeline.tasks`")
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
    args = parser.parse_args(argv)
    result = finetune(args.model, args.task, args.num_train, args.seed, args.max_len, args.epochs, args.lr,
                      args.batch_size, args.weight_decay, args.warmup, args.dropout, args.random_init,
                      min_steps=args.min_steps, log=lambda msg: print(msg, flush=True))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
