"""tools.mlm_accuracy: masked-token accuracy of exported folders under transformers' own classes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_documents_are_cut_at_cls_and_masked_only_where_maskable(docstring_shards):
    from data_pipeline import manifest as manifest_lib
    from tools import mlm_accuracy

    manifest = manifest_lib.load(docstring_shards)
    special = set(manifest.special_token_ids) | {manifest.special_ids.pad}
    docs, positions = mlm_accuracy.masked_documents(docstring_shards, manifest, "validation", 50, 0.15, seed=3)
    assert len(docs) > 50  # rows hold several documents
    for doc, pos in zip(docs, positions):
        assert doc[0] == manifest.special_ids.cls and (doc == manifest.special_ids.cls).sum() == 1
        assert manifest.special_ids.pad not in doc
        can = [i for i, t in enumerate(doc) if t not in special]
        assert set(pos) <= set(can) and len(set(pos)) == len(pos) == max(1, round(0.15 * len(can)))
    again = mlm_accuracy.masked_documents(docstring_shards, manifest, "validation", 50, 0.15, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(positions, again[1]))


def _constant_predictor(data_dir, out, token_id):
    """A transformers BertForMaskedLM (random body) whose logits are its output bias: it always says token_id."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from data_pipeline import manifest as manifest_lib

    manifest = manifest_lib.load(data_dir)
    model = BertForMaskedLM(BertConfig(vocab_size=manifest.vocab_size, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 1.0
    model.save_pretrained(out)
    shutil.copy(os.path.join(data_dir, manifest.tokenizer.dir, "vocab.txt"), out)
    return out


def test_cli_scores_a_transformers_folder_on_the_masked_positions(docstring_shards, tmp_path):
    """Through the CLI: a model that always predicts token t scores exactly the share of t among the masked
    tokens; a bare encoder (no masked-LM head) and a folder with another vocabulary are refused with one line."""
    from data_pipeline import manifest as manifest_lib
    from tools import mlm_accuracy

    docs, positions = mlm_accuracy.masked_documents(docstring_shards, manifest_lib.load(docstring_shards),
                                                    "validation", 40, 0.15, seed=0)
    labels = np.concatenate([d[p] for d, p in zip(docs, positions)])
    top = int(np.bincount(labels).argmax())
    model = _constant_predictor(docstring_shards, str(tmp_path / "const"), top)
    cmd = [sys.executable, "-m", "tools.mlm_accuracy", "--data", docstring_shards, "--model", model, "--rows", "40"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])[model]
    assert result["positions"] == len(labels) and result["documents"] == len(docs)
    assert result["accuracy"] == (labels == top).sum() / len(labels) > 0

    # A bare encoder (no masked-LM head: its head would be random) is refused before any scoring.
    from transformers import BertForMaskedLM
    bare = str(tmp_path / "bare")
    BertForMaskedLM.from_pretrained(model).bert.save_pretrained(bare)
    shutil.copy(os.path.join(model, "vocab.txt"), bare)
    refused = subprocess.run(cmd[:-4] + ["--model", bare, "--rows", "40"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, check=False)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith(
        f"error: --model {bare} has no trained masked-LM head for BertForMaskedLM (missing: cls.predictions.")

    with open(os.path.join(model, "vocab.txt"), "a", encoding="utf-8") as f:
        f.write("another_token\n")
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: --model {model}: its tokenizer is not the vocabulary of --data {docstring_shards} "
        "(vocab_hash differs from its manifest's)")
