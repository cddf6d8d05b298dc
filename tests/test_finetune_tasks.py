"""The text-pair and token-classification shapes of task: data_pipeline's docstring_pairs and docstring_params
builders (on a few standard-library packages) and `python -m tools.finetune_hf` on each, end to end."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import docstring_params, docstrings, tasks
from tools import finetune_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The same small standard-library selection as tests/test_tasks.py: fast, and the real rules.
PACKAGES = dict(packages=("asyncio", "email", "json"), cap=150, min_docs=20)
PAIRS = docstrings.PairTaskSpec(**PACKAGES)
PARAMS = docstrings.TokenTaskSpec(**PACKAGES, max_words=48)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The two tasks and docstring_origin's selection they come from, written through data_pipeline.tasks."""
    cache = str(tmp_path_factory.mktemp("cache"))
    out = {name: str(tmp_path_factory.mktemp(name)) for name in ("pairs", "params")}
    tasks.write_task(out["pairs"], PAIRS, cache_dir=cache)
    # The command line, as the README has it (with the small selection's flags).
    assert tasks.main(["docstring_params", "--out", out["params"], "--cache-dir", cache, "--packages",
                       ",".join(PARAMS.packages), "--cap", str(PARAMS.cap), "--min-docs", str(PARAMS.min_docs),
                       "--max-words", str(PARAMS.max_words)]) == 0
    origin = docstrings.build_task(docstrings.origin_spec(PAIRS), cache)
    return out, origin


def _splits(folder):
    return {s: _read(os.path.join(folder, f"{s}.jsonl")) for s in docstrings.TASK_SPLITS}


def test_the_tasks_are_registered_and_say_their_kind(built):
    assert {n: s.kind for n, s in docstrings.TASKS.items()} == {
        "docstring_origin": "single", "docstring_pairs": "pair", "docstring_params": "token"}
    assert docstrings.TASKS["docstring_pairs"].packages == docstrings.DOCSTRING_ORIGIN.packages
    out, _ = built
    assert json.load(open(os.path.join(out["pairs"], "labels.json"))) == {"kind": "pair",
                                                                         "labels": ["different", "same"]}
    assert json.load(open(os.path.join(out["params"], "labels.json"))) == {
        "kind": "token", "labels": ["B-PARAM", "I-PARAM", "O"]}


def test_pairs_are_balanced_disjoint_and_true(built):
    out, origin = built
    label_of = {ex["text"]: ex["label"] for exs in origin.values() for ex in exs}
    split_of = {ex["text"]: s for s, exs in origin.items() for ex in exs}
    seen = []
    for split, rows in _splits(out["pairs"]).items():
        assert rows, split
        counts = collections.Counter(r["label"] for r in rows)
        assert counts["same"] == counts["different"] and set(counts) == {"same", "different"}
        for r in rows:
            assert set(r) == {"text", "text_pair", "label"}
            assert split_of[r["text"]] == split_of[r["text_pair"]] == split  # docstring_origin's splits
            assert (label_of[r["text"]] == label_of[r["text_pair"]]) == (r["label"] == "same")
            seen += [r["text"], r["text_pair"]]
    assert len(seen) == len(set(seen))  # every text in one pair at most: none in two splits


def test_parameter_tags_are_bio_and_aligned(built):
    out, origin = built
    rows_by_split = _splits(out["params"])
    assert all(rows_by_split.values())
    joined = {s: {" ".join(r["tokens"]) for r in rows} for s, rows in rows_by_split.items()}
    assert not joined["train"] & joined["test"] and not joined["train"] & joined["validation"]
    origin_words = {s: {" ".join(docstring_params.tag_words(ex["text"], [], PARAMS.max_words)[0]) for ex in exs}
                    for s, exs in origin.items()}
    kinds = collections.Counter()
    for split, rows in rows_by_split.items():
        assert joined[split] <= origin_words[split]  # each example is the start of a text of the same split
        for r in rows:
            assert set(r) == {"tokens", "tags"} and 0 < len(r["tokens"]) == len(r["tags"]) <= PARAMS.max_words
            assert "B-PARAM" in r["tags"]
            for previous, tag in zip(["O"] + r["tags"], r["tags"]):
                assert tag in ("B-PARAM", "I-PARAM", "O")
                assert tag != "I-PARAM" or previous in ("B-PARAM", "I-PARAM")  # I only continues an entity
            kinds.update(r["tags"])
    assert kinds["I-PARAM"] > 0 and kinds["O"] > 10 * kinds["B-PARAM"]


def test_tag_words_marks_whole_parameter_names_only():
    text = ("Sum over axis_name.\n\nParameters\n----------\naxis_name : int\n"
            "    Uses `self.axis` and a copy of x's axis.")
    words, tags = docstring_params.tag_words(text, ["self", "axis_name", "axis", "a", "x"], max_words=100)
    tagged = [(w, t) for w, t in zip(words, tags) if t != "O"]
    assert tagged == [("axis", "B-PARAM"), ("_", "I-PARAM"), ("name", "I-PARAM"),  # in the summary
                      ("axis", "B-PARAM"), ("_", "I-PARAM"), ("name", "I-PARAM"),  # in Parameters
                      ("x", "B-PARAM"), ("axis", "B-PARAM")]  # not self.axis, not the article "a", not x's "s"
    assert words[:5] == ["Sum", "over", "axis", "_", "name"]
    assert docstring_params.tag_words(text, ["axis_name"], max_words=3) == (["Sum", "over", "axis"],
                                                                             ["O", "O", "B-PARAM"])


def test_function_params_reads_signatures(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('def f(a, /, b=1, *args, c, **kw):\n    """Adds b to a, twice over."""\n\n'
                    'class C:\n    def g(self, y):\n        """Returns y, untouched by C."""\n'
                    '    def h(self):\n        """short"""\n')
    assert docstring_params.function_params(str(path)) == [
        ("Adds b to a, twice over.", ["a", "b", "c", "args", "kw"]),
        ("Returns y, untouched by C.", ["self", "y"])]


def _write_model(path, words):
    """A tiny random BERT with a WordPiece vocabulary of `words` (and the subwords of the alignment test)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "keep", "##dim", "##s", "axis", "."]
    vocab += sorted(set(words) - set(vocab))
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=os.path.join(path, "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model(built, tmp_path_factory):
    out, _ = built
    words = collections.Counter(w.lower() for r in _read(os.path.join(out["params"], "train.jsonl"))
                                for w in r["tokens"])
    return _write_model(str(tmp_path_factory.mktemp("tiny")), [w for w, _ in words.most_common(400)])


def test_first_subword_labelling(model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    words = [["keepdims", "axis", "."], ["axis"]]
    enc = finetune_tasks.encode(tokenizer, "token", words, max_len=16)
    targets = finetune_tasks.token_targets(enc, [np.array([0, 0, 2]), np.array([0])])
    # [CLS] keep ##dim ##s axis . [SEP]: the first subword of each word carries its tag, the rest -100.
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"][0])[:7] == ["[CLS]", "keep", "##dim", "##s", "axis",
                                                                         ".", "[SEP]"]
    assert targets.tolist() == [[-100, 0, -100, -100, 0, 2, -100], [-100, 0, -100, -100, -100, -100, -100]]
    pair = finetune_tasks.encode(tokenizer, "pair", [("axis " * 20, "keepdims")], max_len=12)
    # longest_first trims the longer part and keeps both: [CLS] axis x 6 [SEP] keep ##dim ##s [SEP].
    assert tokenizer.convert_ids_to_tokens(pair["input_ids"][0]) == (["[CLS]"] + ["axis"] * 6 + ["[SEP]", "keep",
                                                                                               "##dim", "##s", "[SEP]"])
    assert pair["token_type_ids"][0].tolist() == [0] * 8 + [1] * 4


def test_token_scores_are_entity_level():
    task = finetune_tasks.Task("token", ["B-PARAM", "I-PARAM", "O"], train=None,
                               test=finetune_tasks.Split([["a"] * 5], [np.array([0, 1, 2, 0, 2])]))
    got = finetune_tasks.scores(task, [np.array([0, 1, 2, 2, 0])])
    # gold entities (0-1) and (3); predicted (0-1) and (4): one of two right either way.
    assert got == {"entity_precision": 0.5, "entity_recall": 0.5, "entity_f1": 0.5, "token_accuracy": 0.6,
                   "num_entities": 2}


def _run(model, task, *extra):
    cmd = [sys.executable, "-m", "tools.finetune_hf", "--model", model, "--task", task, "--epochs", "1",
           "--batch-size", "8", "--max-len", "64", "--num-train", "40", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["pairs", "params"])
def test_finetune_hf_runs_each_shape_end_to_end(built, model, name):
    out, _ = built
    result = _run(model, out[name])
    test_rows = _read(os.path.join(out[name], "test.jsonl"))
    assert result["num_train"] == 40 and result["steps"] == 5 and result["num_test"] == len(test_rows)
    if name == "pairs":
        assert result["kind"] == "pair"
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["macro_f1"] <= 1.0
    else:
        assert result["kind"] == "token" and "accuracy" not in result
        for key in ("entity_precision", "entity_recall", "entity_f1", "token_accuracy"):
            assert 0.0 <= result[key] <= 1.0, result
        assert result["num_entities"] == sum(r["tags"].count("B-PARAM") for r in test_rows)


def _copy_task(src, dst, edit_row=None, labels=None):
    os.makedirs(dst, exist_ok=True)
    for name in ("train.jsonl", "test.jsonl"):
        rows = _read(os.path.join(src, name))
        if edit_row and name == "train.jsonl":
            edit_row(rows[2])
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(dst, "labels.json"), "w", encoding="utf-8") as f:
        json.dump(labels or json.load(open(os.path.join(src, "labels.json"))), f)
    return str(dst)


def test_a_row_without_its_kinds_fields_is_one_error_line_before_any_model(built, tmp_path):
    out, _ = built
    no_model = str(tmp_path / "no_such_model")  # never reached: the task is read first
    cases = [(_copy_task(out["pairs"], tmp_path / "p", lambda r: r.pop("text_pair")),
              r"error: .*p/train.jsonl:3: no 'text_pair' \(a pair task's rows hold 'text', 'text_pair', 'label'"),
             (_copy_task(out["params"], tmp_path / "t", lambda r: r["tags"].pop()),
              r"error: .*t/train.jsonl:3: 'tags' must be a list with one tag per token"),
             (_copy_task(out["params"], tmp_path / "s", labels=["B-PARAM", "I-PARAM", "O"]),  # read as "single"
              r"error: .*s/train.jsonl:1: no 'text' \(a single task's rows"),
             (_copy_task(out["params"], tmp_path / "k", labels={"kind": "ner", "labels": ["O", "B-X"]}),
              r"error: .*k/labels.json: 'kind' must be one of single, pair, token; got 'ner'"),
             (_copy_task(out["params"], tmp_path / "b", labels={"kind": "token", "labels": ["O", "PARAM"]}),
              r"error: .*b/labels.json: a token task's 'labels' are BIO tags")]
    for task, message in cases:
        with pytest.raises(SystemExit, match=message):
            finetune_tasks.load_task(task)
    proc = subprocess.run([sys.executable, "-m", "tools.finetune_hf", "--model", no_model, "--task", cases[0][0]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no 'text_pair'" in proc.stderr


WORDS = ["alpha", "beta", "gamma", "delta", "file", "list", "value", "returns", "the", "red", "light", "blue"]


def _write_keyword_task(path, kind, n_train=64, n_test=32):
    """Learnable only through the shape's own path: a pair's label is decided by a keyword in its second text
    (ignoring text_pair scores ~50%); a token task tags the colours "red" (B-COL) and "light blue" (B-COL I-COL)."""
    rng = np.random.RandomState(0)
    os.makedirs(path, exist_ok=True)
    filler = [w for w in WORDS if w not in ("red", "light", "blue")]
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(path, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for i in range(n):
                words = list(rng.choice(filler, 6))
                key = ("red", "blue")[i % 2]
                if kind == "pair":
                    row = {"text": " ".join(rng.choice(filler, 5)), "text_pair": " ".join(words + [key]),
                           "label": key}
                else:
                    at = rng.randint(5)
                    words[at:at] = ["light", "blue"] if key == "blue" else ["red"]
                    tags = ["O"] * len(words)
                    tags[at] = "B-COL"
                    if key == "blue":
                        tags[at + 1] = "I-COL"
                    row = {"tokens": words, "tags": tags}
                f.write(json.dumps(row) + "\n")
    labels = ["blue", "red"] if kind == "pair" else ["B-COL", "I-COL", "O"]
    with open(os.path.join(path, "labels.json"), "w", encoding="utf-8") as f:
        json.dump({"kind": kind, "labels": labels}, f)
    return str(path)


@pytest.mark.parametrize("kind", ["pair", "token"])
def test_each_shape_learns_what_only_its_own_path_can(tmp_path, capsys, kind):
    from tools import finetune_hf

    task = _write_keyword_task(tmp_path / "task", kind)
    model = _write_model(str(tmp_path / "tiny"), WORDS)
    argv = ["--model", model, "--task", task, "--epochs", "8", "--lr", "3e-3", "--batch-size", "8",
            "--max-len", "24", "--seed", "1", "--dropout", "0"]
    assert finetune_hf.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == kind and result["steps"] == 8 * 8
    if kind == "pair":
        assert result["accuracy"] >= 0.9, result
    else:
        assert result["entity_f1"] >= 0.9 and result["token_accuracy"] >= 0.95, result
        assert result["num_entities"] == 32
