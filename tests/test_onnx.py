"""tools.export_onnx: Hugging Face sequence classifiers -> ONNX, checked with onnxruntime against PyTorch.

(1) a tiny random transformers BertForSequenceClassification through the real CLI: dynamic batch and sequence
axes, onnxruntime's logits within 1e-4 of torch's at other shapes than the example's, padding included;
(2) the path from our own checkpoint: tools.convert_to_hf -> tools.finetune_hf --save -> tools.export_onnx, the
commands of README's "Serving with ONNX"; (3) the one-line errors.
"""

import json
import glob
import os
import re
import subprocess
import sys

import numpy as np
import onnxruntime
import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) translates through it: the test extra has it)
import pytest
import torch
import transformers

from tools import export_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
LABELS = ["colour_blue", "colour_green", "colour_red"]


def _cli(*args):
    """`python -m tools.export_onnx ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tools.export_onnx", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _tiny_classifier(path):
    """A random BertForSequenceClassification (2 layers, hidden 48, 3 labels, 64 positions) with a WordPiece
    tokenizer whose vocabulary holds the words of the check's texts (so that real text gives real ids)."""
    words = sorted({w for t in export_onnx.sample_texts() for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in words if w != "mask"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=3, intermediate_size=96, max_position_embeddings=64,
                                     num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                     label2id={lab: i for i, lab in enumerate(LABELS)})
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # larger logits than the initialisation's ~1e-2, so that a wrong graph shows
        model.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The tiny classifier exported by the CLI: (folder, onnx file, the CLI's result)."""
    folder = _tiny_classifier(tmp_path_factory.mktemp("cls") / "model")
    out = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    res = _cli("--model", folder, "--out", out)
    return folder, out, res


def test_cli_exports_and_checks(tiny_export):
    folder, out, res = tiny_export
    assert res.returncode == 0, res.stderr
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    print("tiny classifier:", {k: figures[k] for k in ("max_abs_diff_logits", "opset", "checked_shapes")})
    assert figures["ok"] and figures["predictions_match"]
    assert figures["max_abs_diff_logits"] <= TOL and figures["tolerance"] == TOL
    assert figures["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert figures["exporter"] == "torch.onnx.export(dynamo=True)" and figures["opset"] >= 18
    # Batch sizes 1, 3, 7 and lengths 7, 33 and the 64 positions, other than the example's [2, 16].
    assert figures["checked_shapes"] == [[b, n] for n in (7, 33, 64) for b in (1, 3, 7)]
    assert figures["texts"] == 7 and not figures["external_data"]
    assert os.listdir(os.path.dirname(out)) == ["model.onnx"]


def test_onnx_graph_has_dynamic_axes_and_matches_torch(tiny_export):
    """Independently of the CLI's check: symbolic [batch, sequence] inputs, and onnxruntime == torch on
    random ids at batch 1 and 3, lengths 7 and 33, with padding (a zero attention mask) in a row."""
    folder, out, res = tiny_export
    assert res.returncode == 0, res.stderr
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        (n, ["batch", "sequence"], "tensor(int64)") for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", len(LABELS)])]
    id2label = json.loads(session.get_modelmeta().custom_metadata_map["id2label"])
    assert id2label == {str(i): label for i, label in enumerate(LABELS)}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rng = np.random.default_rng(0)
    for batch, length in ((1, 7), (3, 7), (1, 33), (3, 33)):
        feed = {"input_ids": rng.integers(5, model.config.vocab_size, (batch, length)),
                "attention_mask": np.ones((batch, length), np.int64),
                "token_type_ids": (np.arange(length) >= length // 2).astype(np.int64)[None].repeat(batch, 0)}
        if batch > 1:
            feed["attention_mask"][1, length // 2:] = 0
        ours = session.run(["logits"], feed)[0]
        with torch.no_grad():
            theirs = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        assert ours.shape == (batch, len(LABELS))
        assert np.abs(ours - theirs).max() <= TOL, (batch, length)
        assert np.abs(theirs).max() > 0.1  # not trivially small logits


def test_sample_texts_are_convert_to_hf_s():
    """The same real text as tools.convert_to_hf --verify (copied there: that module imports jax)."""
    from tools import convert_to_hf  # pylint: disable=import-outside-toplevel
    assert export_onnx.sample_texts() == convert_to_hf.sample_texts()


def test_error_folder_without_config_is_one_line(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    res = _cli("--model", str(tmp_path), "--out", str(tmp_path / "m.onnx"))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path} is not a Hugging Face model folder "
                                               "(no config.json)"]
    assert not os.path.exists(tmp_path / "m.onnx")


def test_error_not_a_trained_classifier(tmp_path):
    """A folder whose classifier would start random (a MaskedLM export, or a config without architectures
    whose head weights are missing) is refused before anything is written."""
    src = _tiny_classifier(tmp_path / "cls")
    model = transformers.BertForSequenceClassification.from_pretrained(src)
    masked = tmp_path / "mlm"
    transformers.BertForMaskedLM(model.config).save_pretrained(masked)
    with pytest.raises(SystemExit, match=r"^error: .*mlm holds a BertForMaskedLM, not a sequence classifier"):
        export_onnx.main(["--model", str(masked), "--out", str(tmp_path / "a.onnx")])
    bare = tmp_path / "bare"
    transformers.BertModel(model.config).save_pretrained(bare)
    for name in os.listdir(src):
        if name != "config.json" and not name.endswith(".safetensors"):
            os.link(os.path.join(src, name), bare / name)
    with open(bare / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    config.pop("architectures")
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"^error: .*bare holds no trained classifier .*classifier.bias"):
        export_onnx.main(["--model", str(bare), "--out", str(tmp_path / "b.onnx")])
    assert not os.path.exists(tmp_path / "a.onnx") and not os.path.exists(tmp_path / "b.onnx")


def test_failed_check_prints_figures_then_one_error_line(tiny_export, tmp_path, capsys):
    """A check that fails (here: a tolerance no float32 graph meets) is the JSON figures, then `error:`."""
    folder, _, _ = tiny_export
    out = str(tmp_path / "strict.onnx")
    with pytest.raises(SystemExit, match=r"^error: onnxruntime's logits differ from PyTorch's by .*tolerance 1e-30"):
        export_onnx.main(["--model", folder, "--out", out, "--tolerance", "1e-30", "--max-lengths", "7",
                          "--batch-sizes", "3", "--opset", "18"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not figures["ok"] and figures["opset"] == 18 and figures["checked_shapes"] == [[3, 7]]
    assert 0 < figures["max_abs_diff_logits"] <= TOL


# --- (2) from our own checkpoint ---

WORDS = ["alpha", "beta", "gamma", "delta", "file", "list", "value", "returns", "the", "path", "object"]


def _write_task(path, n_train=16, n_test=8):
    """Two labels told apart by one keyword among filler words (as tests/test_finetune.py's task)."""
    rng = np.random.RandomState(0)
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(path, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for i in range(n):
                key = ("red", "blue")[i % 2]
                filler = list(rng.choice(WORDS, 5))
                filler.insert(rng.randint(6), key)
                f.write(json.dumps({"text": " ".join(filler), "label": f"colour_{key}"}) + "\n")
    with open(os.path.join(path, "labels.json"), "w", encoding="utf-8") as f:
        json.dump(["colour_blue", "colour_red"], f)
    return str(path)


def _our_workdir(workdir):
    """A workdir with one checkpoint of a random (perturbed) small BertForMaskedLM of ours, a WordPiece
    tokenizer trained on standard-library docstrings and the workdir's dataset manifest (as
    tests/test_convert.py's small_workdir)."""
    # Imported here: only this test needs jax and our model; the others run on torch alone.
    import collections  # pylint: disable=import-outside-toplevel
    import dataclasses  # pylint: disable=import-outside-toplevel
    import textwrap  # pylint: disable=import-outside-toplevel

    from data_pipeline import tokenization, tokenizer_training  # pylint: disable=import-outside-toplevel
    from tests.helpers import write_random_checkpoint  # pylint: disable=import-outside-toplevel

    docs = [getattr(m, n).__doc__ or "" for m in (collections, json, textwrap, os.path, dataclasses) for n in dir(m)]
    docs.append(" ".join(WORDS + ["red", "blue"]))
    tok = tokenization.Tokenizer.load(tokenizer_training.train_wordpiece([d for d in docs if isinstance(d, str) and d],
                                                                   500, str(workdir / "tokenizer")))
    write_random_checkpoint(str(workdir), tok)
    return str(workdir)


@pytest.mark.slow
def test_our_checkpoint_to_onnx_end_to_end(tmp_path, capsys, monkeypatch):
    """README's "Serving with ONNX" as written: convert_to_hf --verify -> finetune_hf --save -> export_onnx (from
    its bash block, on runs/tiny and data/task), then its onnxruntime snippet."""
    from tests.helpers import readme_commands, readme_python  # pylint: disable=import-outside-toplevel
    from tools import convert_to_hf, finetune_hf  # pylint: disable=import-outside-toplevel

    _our_workdir(tmp_path / "runs" / "tiny")
    _write_task(tmp_path / "data" / "task")
    cls, onnx_file = (str(tmp_path / "hf" / n) for n in ("tiny-cls", "tiny-cls.onnx"))
    commands = readme_commands("### Serving with ONNX")
    assert [m for m, _ in commands] == ["tools.convert_to_hf", "tools.finetune_hf", "tools.export_onnx"]
    (_, convert_args), (_, finetune_args), (_, export_args) = commands
    monkeypatch.chdir(tmp_path)
    assert convert_to_hf.main(convert_args) == 0
    assert finetune_hf.main(finetune_args) == 0
    finetuned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert finetuned["steps"] == 3 and "save" not in finetuned  # 16 examples, batch 16, 3 epochs; same JSON
    assert transformers.AutoConfig.from_pretrained(cls).architectures == ["BertForSequenceClassification"]

    assert export_onnx.main(export_args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])
    print("ours, fine-tuned:", out[-2])
    assert figures["ok"] and figures["max_abs_diff_logits"] <= TOL and figures["predictions_match"]
    assert figures["architecture"] == "BertForSequenceClassification" and figures["num_labels"] == 2
    assert figures["checked_shapes"] == [[b, n] for n in (7, 33, 64) for b in (1, 3, 7)]
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["id2label"]) == {"0": "colour_blue",
                                                                                   "1": "colour_red"}

    # Serving: the tokenizer of the fine-tuned folder, onnxruntime alone -> the same labels as PyTorch.
    tok = transformers.AutoTokenizer.from_pretrained(cls)
    texts = ["alpha red the file", "the blue value returns", "path object red"]
    enc = tok(texts, padding=True, return_tensors="np")
    logits = session.run(["logits"], {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                                             "token_type_ids")})[0]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(cls).eval()
    with torch.no_grad():
        expected = model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(logits - expected).max() <= TOL
    snippet = subprocess.run([sys.executable, "-c", readme_python("### Serving with ONNX")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, check=False)
    assert snippet.returncode == 0, snippet.stderr[-3000:]
    assert re.fullmatch(r"\[[01] [01]\]\n", snippet.stdout)


@pytest.mark.slow
def test_readme_trainer_snippet_runs(tmp_path):
    """README's fine-tuning snippet with transformers' Trainer (which needs accelerate, from the hf extra), run
    as written on a tiny export of ours; the trained classifier is saved by Trainer's last checkpoint."""
    from tools import convert_to_hf  # pylint: disable=import-outside-toplevel

    workdir = _our_workdir(tmp_path / "runs" / "tiny")
    assert convert_to_hf.main(["--workdir", workdir, "--out", str(tmp_path / "hf" / "tiny")]) == 0
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    snippet = re.search(r"Trainer` \(PyTorch.*?```python\n(.*?)```", readme, re.S).group(1)
    p = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT}, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = glob.glob(str(tmp_path / "runs" / "trainer" / "checkpoint-*" / "model.safetensors"))
    assert len(saved) == 1 and "train_loss" in p.stdout + p.stderr
