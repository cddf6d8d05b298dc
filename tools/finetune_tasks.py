"""The task folders `tools.finetune_hf` reads, in their three shapes; their encoding for a Hugging Face tokenizer;
their scores.

A task folder (`python -m data_pipeline.tasks NAME --out DIR`) holds train.jsonl, test.jsonl and labels.json,
which says the shape of the task:

- a plain list of labels (an older folder) or {"kind": "single", "labels": [...]}: one text per example,
  rows {"text", "label"}; scored by accuracy and macro-F1;
- {"kind": "pair", "labels": [...]}: two texts per example, rows {"text", "text_pair", "label"}, encoded by the
  tokenizer's pair encoding as [CLS] A [SEP] B [SEP] with segment ids 0 / 1 (token_type_ids); truncation trims
  the longer part first (longest_first), so both parts keep tokens; scored by accuracy and macro-F1;
- {"kind": "token", "labels": BIO tags ("O", "B-X", "I-X", ...)}: a tag per word, rows {"tokens": [words],
  "tags": [one per word]}; the first subword of each word carries its tag, the other subwords, the special
  tokens and the padding -100 (the loss ignores them); a word's prediction is its first subword's, and a word
  cut off by --max-len counts as predicted "O". Scored by entity-level precision / recall / F1 (`seqeval`,
  conlleval's rules) and token accuracy (the fraction of words tagged right).

Bad input is one `error: ...` line naming the file (and line) and the key, before any model is loaded.
"""

import dataclasses
import importlib.util
import json
import os

import numpy as np

KINDS = ("single", "pair", "token")
FIELDS = {"single": ("text", "label"), "pair": ("text", "text_pair", "label"), "token": ("tokens", "tags")}
IGNORE = -100  # the label torch's cross-entropy skips


def fail(message: str):
    raise SystemExit(f"error: {message}")


@dataclasses.dataclass
class Split:
    """Inputs (a text, a (text, text_pair) tuple, or a list of words) and targets (a label index, or an array
    of tag indices, one per word) of one split."""
    inputs: list
    targets: list

    def take(self, idx) -> "Split":
        return Split([self.inputs[i] for i in idx], [self.targets[i] for i in idx])


@dataclasses.dataclass
class Task:
    kind: str
    labels: list[str]
    train: Split
    test: Split


def _label_file(task_dir: str) -> tuple[str, list[str]]:
    """(kind, labels) from labels.json."""
    path = os.path.join(task_dir, "labels.json")
    if not os.path.isfile(path):
        fail(f"no {path} (make the task with `python -m data_pipeline.tasks`)")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{path} is not JSON ({e})")
    if isinstance(spec, list):
        kind, labels = "single", spec
    elif isinstance(spec, dict):
        kind, labels = spec.get("kind", "single"), spec.get("labels")
        if kind not in KINDS:
            fail(f"{path}: 'kind' must be one of {', '.join(KINDS)}; got {kind!r}")
    else:
        fail(f"{path} must hold a list of labels or an object with 'kind' and 'labels'")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        fail(f"{path}: 'labels' must be a list of at least 2 label names")
    if kind == "token":
        bad = [t for t in labels if t != "O" and not t.startswith(("B-", "I-"))]
        if bad or "O" not in labels:
            fail(f"{path}: a token task's 'labels' are BIO tags ('O', 'B-X', 'I-X'); got {bad or labels}")
        if importlib.util.find_spec("seqeval") is None:
            fail("a token task is scored with seqeval, which is not installed: pip install seqeval")
    return kind, labels


def _parse(kind: str, ex: dict, index: dict[str, int], where: str):
    """(input, target) of one row; `where` is "file:line" for the error messages."""
    for key in FIELDS[kind]:
        if key not in ex:
            fail(f"{where}: no {key!r} (a {kind} task's rows hold {', '.join(map(repr, FIELDS[kind]))}; "
                 "labels.json gives the kind)")
    if kind == "token":
        words, tags = ex["tokens"], ex["tags"]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            fail(f"{where}: 'tokens' must be a non-empty list of strings")
        if not isinstance(tags, list) or len(tags) != len(words):
            fail(f"{where}: 'tags' must be a list with one tag per token ({len(words)})")
        for tag in tags:
            if tag not in index:
                fail(f"{where}: tag {tag!r} in 'tags' is not in labels.json")
        return words, np.asarray([index[t] for t in tags], np.int64)
    texts = tuple(ex[k] for k in FIELDS[kind][:-1])
    for key, text in zip(FIELDS[kind], texts):
        if not isinstance(text, str):
            fail(f"{where}: {key!r} must be a string")
    label = ex["label"]
    if not isinstance(label, str) or label not in index:
        fail(f"{where}: label {label!r} is not in labels.json")
    return (texts[0] if kind == "single" else texts), index[label]


def read_split(path: str, kind: str, labels: list[str]) -> Split:
    """The examples of one split file; a bad line is a one-line error naming the file, the line and the key."""
    if not os.path.isfile(path):
        fail(f"no {path} (make the task with `python -m data_pipeline.tasks`)")
    index = {lab: i for i, lab in enumerate(labels)}
    split = Split([], [])
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError:
                ex = None
            if not isinstance(ex, dict):
                fail(f"{path}:{lineno}: not a JSON object")
            x, y = _parse(kind, ex, index, f"{path}:{lineno}")
            split.inputs.append(x)
            split.targets.append(y)
    if not split.inputs:
        fail(f"{path} holds no examples")
    return split


def load_task(task_dir: str) -> Task:
    kind, labels = _label_file(task_dir)
    return Task(kind, labels, read_split(os.path.join(task_dir, "train.jsonl"), kind, labels),
                read_split(os.path.join(task_dir, "test.jsonl"), kind, labels))


def input_size(kind: str, x) -> int:
    """A cheap length in characters (to sort examples into short padded batches)."""
    if kind == "single":
        return len(x)
    return sum(map(len, x)) + (len(x) if kind == "token" else 0)


def encode(tokenizer, kind: str, inputs: list, max_len: int):
    """A padded batch of torch tensors: input_ids, attention_mask (and token_type_ids where the model has them)."""
    common = dict(max_length=max_len, padding=True, return_tensors="pt")
    if kind == "pair":
        return tokenizer([a for a, _ in inputs], [b for _, b in inputs], truncation="longest_first", **common)
    if kind == "token":
        return tokenizer(inputs, is_split_into_words=True, truncation=True, **common)
    return tokenizer(inputs, truncation=True, **common)


def first_subwords(encoding, i: int) -> list[tuple[int, int]]:
    """(position, word) of the first subword of each word of example i that survived truncation."""
    found, previous = [], None
    for pos, word in enumerate(encoding.word_ids(i)):
        if word is not None and word != previous:
            found.append((pos, word))
        previous = word
    return found


def token_targets(encoding, targets: list[np.ndarray]) -> np.ndarray:
    """[batch, length] labels: each word's tag at its first subword, IGNORE elsewhere."""
    out = np.full(encoding["input_ids"].shape, IGNORE, np.int64)
    for i, tags in enumerate(targets):
        for pos, word in first_subwords(encoding, i):
            out[i, pos] = tags[word]
    return out


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    """Unweighted mean over labels of F1 (a label never predicted nor present counts as 0)."""
    scores = []
    for k in range(num_labels):
        tp = np.sum((y_pred == k) & (y_true == k))
        fp = np.sum((y_pred == k) & (y_true != k))
        fn = np.sum((y_pred != k) & (y_true == k))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def scores(task: Task, predictions: list) -> dict:
    """The test figures: accuracy and macro_f1, or (token tasks) entity precision / recall / F1 and token
    accuracy, with the gold entity count."""
    if task.kind != "token":
        y, p = np.asarray(task.test.targets, np.int64), np.asarray(predictions, np.int64)
        return {"accuracy": float(np.mean(p == y)), "macro_f1": macro_f1(y, p, len(task.labels))}
    # seqeval is needed by token tasks only (checked when labels.json is read): imported here, not for all.
    # Its default mode follows conlleval's rules, as CoNLL results are reported.
    from seqeval.metrics import f1_score, precision_score, recall_score  # pylint: disable=import-outside-toplevel
    from seqeval.metrics.sequence_labeling import get_entities  # pylint: disable=import-outside-toplevel

    gold = [[task.labels[t] for t in tags] for tags in task.test.targets]
    pred = [[task.labels[t] for t in tags] for tags in predictions]
    right = sum(int(np.sum(np.asarray(p) == np.asarray(g))) for p, g in zip(predictions, task.test.targets))
    return {"entity_precision": float(precision_score(gold, pred, zero_division=0)),
            "entity_recall": float(recall_score(gold, pred, zero_division=0)),
            "entity_f1": float(f1_score(gold, pred, zero_division=0)),
            "token_accuracy": right / sum(len(t) for t in gold),
            "num_entities": len(get_entities(gold))}
