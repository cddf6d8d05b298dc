"""DeBERTa (issue #24): the disentangled-attention configuration of our one encoder against transformers'
DebertaV2Model / DebertaV2ForMaskedLM on random weights built locally, the name table both ways, and the
DeBERTa-v3 RTD model with gradient-disentangled embedding sharing."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from transformers.models.deberta_v2 import modeling_deberta_v2  # noqa: E402

from bert_jax import checkpointing, hf_export, masking, objectives, sharding  # noqa: E402
from bert_jax.models import BertForMaskedLM, DebertaRtdForPretraining, EncoderConfig, generator_config  # noqa: E402
from bert_jax.models import hf_mapping  # noqa: E402
from bert_jax.models.encoder import document_features  # noqa: E402
from bert_jax.models.layers import log_bucket  # noqa: E402

# Outputs of ours and transformers' agree within TOL x their largest magnitude (the issue's bound).
TOL = 5e-5


def tiny_hf_config(**overrides):
    """A small DeBERTa-v3-shaped config: 2 layers of 64, 16 buckets over 32 relative positions, no absolute
    positions, no token types, shared position projections, LayerNorm on the relative embeddings."""
    kw = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64, relative_attention=True, position_buckets=16, max_relative_positions=32,
              pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
              type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu", pad_token_id=0)
    kw.update(overrides)
    return transformers.DebertaV2Config(**kw)


def random_hf(cls, config, seed=0):
    """A transformers model with every tensor perturbed (biases start at 0, LayerNorm scales at 1), eval mode."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def state_numpy(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def our_config(hf_config) -> EncoderConfig:
    return EncoderConfig(**hf_mapping.deberta_config_kwargs(hf_config.to_dict()))


def run_ours(cfg, params, ids, mask, types, model="deberta_mlm"):
    return hf_export.run_model(cfg, params, ids, mask, types, model)


def inputs(batch, seq_len, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, seq_len))
    mask = np.ones_like(ids)
    mask[1, seq_len - seq_len // 3:] = 0  # one row padded
    ids[mask == 0] = 0
    return ids, mask, np.zeros_like(ids)


def test_log_buckets_equal_transformers():
    distance = np.arange(-600, 601)
    for buckets, max_position in ((16, 32), (256, 512), (64, 100)):
        theirs = modeling_deberta_v2.make_log_bucket_position(torch.from_numpy(distance), buckets, max_position)
        np.testing.assert_array_equal(log_bucket(distance, buckets, max_position), theirs.numpy().astype(np.int64))


@pytest.mark.parametrize("overrides", [
    {},  # DeBERTa-v3's shape
    {"position_biased_input": True, "type_vocab_size": 2, "pos_att_type": "c2p", "norm_rel_ebd": "none",
     "position_buckets": -1, "max_relative_positions": 24},  # v2-like variants: absolute positions, no buckets
])
def test_masked_lm_matches_transformers(overrides):
    """Hidden states and MLM logits equal DebertaV2ForMaskedLM's at lengths below, at and beyond the buckets
    (and beyond max_relative_positions: 40 > 32)."""
    hf_cfg = tiny_hf_config(**overrides)
    model = random_hf(transformers.DebertaV2ForMaskedLM, hf_cfg)
    cfg = our_config(hf_cfg)
    tensors = state_numpy(model)
    params = hf_mapping.from_hf(tensors, cfg, "deberta_mlm")
    for seq_len in (7, 16, 40):
        ids, mask, types = inputs(2, seq_len, hf_cfg.vocab_size, seed=seq_len)
        if hf_cfg.type_vocab_size:
            types[:, seq_len // 2:] = 1
        with torch.no_grad():
            res = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        token_type_ids=torch.from_numpy(types), output_hidden_states=True)
        h, logits = run_ours(cfg, params, ids, mask, types)
        real = mask > 0
        for theirs, ours in ((res.hidden_states[-1].numpy(), h), (res.logits.numpy(), logits)):
            err = np.abs(theirs - ours)[real].max()
            assert err <= TOL * np.abs(theirs[real]).max(), (seq_len, err)
    # And back: every tensor transformers holds, bitwise (the tied decoder copies aside).
    back = hf_mapping.to_hf(params, cfg, "deberta_mlm")
    assert set(back) == set(tensors) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    for name, value in back.items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)


# ---- DeBERTa-v3's RTD with gradient-disentangled embedding sharing ----

VOCAB = 97
SPEC = masking.MaskingSpec(vocab_size=VOCAB, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4), max_predictions=6)
DISC = EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, type_vocab_size=0,
                     relative_attention=True, position_buckets=8, max_relative_positions=16,
                     position_biased_input=False, layer_norm_eps=1e-7)


def _rtd_batch(n=4, s=20, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (n, s)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[: n // 2, -4:] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray((ids != 0).astype(np.int32)),
            "token_type_ids": jnp.zeros_like(jnp.asarray(ids))}


def test_gdes_routes_the_discriminator_loss_to_e_delta_only():
    gen_cfg = generator_config(DISC, 1.0, 1)
    assert (gen_cfg.num_layers, gen_cfg.hidden_size) == (1, 32)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model_fn = lambda: DebertaRtdForPretraining(DISC, gen_cfg, nnx.Rngs(0))  # noqa: E731
    graphdef, _, shardings = sharding.abstract_params(model_fn, mesh)
    params = sharding.init_params(model_fn, mesh, shardings)
    delta = params["discriminator"]["encoder"]["embeddings"]["word"]
    assert float(jnp.abs(delta).max()) == 0.0  # E_delta starts at zero
    assert "position" not in params["generator"]["encoder"]["embeddings"]  # no absolute positions
    assert params["generator"]["encoder"]["rel_embeddings"].shape == (16, 32)

    batch = _rtd_batch()
    objective = objectives.ElectraObjective(SPEC, disc_weight=50.0)
    inputs = objective.corrupt(jax.random.PRNGKey(3), batch)
    norms = objective.normalizers(batch, inputs)

    def part(name):
        def f(p):
            _, sums = objective.loss(nnx.merge(graphdef, p), batch, inputs, None, norms)
            return sums[name][0]
        return f

    g_disc, g_gen = jax.jit(lambda p: [jax.grad(part(n))(p) for n in ("disc_loss", "gen_mlm_loss")])(params)
    # The discriminator's loss puts exactly zero on every generator parameter, its word embeddings included...
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_disc["generator"]))
    # ... and moves E_delta; the generator's loss reaches nothing of the discriminator.
    assert float(jnp.abs(g_disc["discriminator"]["encoder"]["embeddings"]["word"]).max()) > 0
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_gen["discriminator"]))
    assert float(jnp.abs(g_gen["generator"]["encoder"]["embeddings"]["word"]).max()) > 0


def test_packed_documents_stay_apart_and_prediction_rows_agree():
    """Two documents packed in one row give each the outputs it has alone (segment bias + distances within the
    document), and the MLM call's last layer at the prediction rows only equals the full forward there."""
    hf_cfg = tiny_hf_config()
    cfg = our_config(hf_cfg)
    params = hf_mapping.from_hf(state_numpy(random_hf(transformers.DebertaV2ForMaskedLM, hf_cfg)), cfg,
                                "deberta_mlm")
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    graphdef, _, _ = sharding.abstract_params(lambda: BertForMaskedLM(cfg, nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
        _packed_and_rows(model)


def _packed_and_rows(model):
    rng = np.random.default_rng(1)
    cls_id, a_len, b_len = 5, 23, 17
    a, b = rng.integers(6, 120, a_len), rng.integers(6, 120, b_len)
    a[0] = b[0] = cls_id
    row = np.concatenate([a, b])[None]
    segments, position_ids = document_features(jnp.asarray(row), cls_id)
    packed, full = model.hidden_and_logits(row, np.ones_like(row), np.zeros_like(row), segment_ids=segments,
                                           position_ids=position_ids)
    for doc, span in ((a, slice(0, a_len)), (b, slice(a_len, a_len + b_len))):
        alone, _ = model.hidden_and_logits(doc[None], np.ones_like(doc[None]), np.zeros_like(doc[None]))
        np.testing.assert_allclose(np.asarray(packed)[0, span], np.asarray(alone)[0], atol=2e-5)
    positions = jnp.asarray([[3, 30, 24, 0]])
    at_rows = model(row, np.ones_like(row), np.zeros_like(row), positions, segment_ids=segments,
                    position_ids=position_ids)
    np.testing.assert_allclose(np.asarray(at_rows)[0], np.asarray(full)[0, [3, 30, 24, 0]], atol=1e-4)


# ---- through the command lines: import_from_hf, convert_to_hf --verify ----

def _wordpiece_vocab(vocab_size):
    """A WordPiece vocabulary of `vocab_size` tokens (the special ones first, then letters and made-up words):
    the import reads the weights; a SentencePiece DeBERTa tokenizer folder is the tokenizer work's to import."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
    words += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + ["the", "module", "writes", "its", "output",
                                                                    "to", "on", "disk", ".", ",", "("]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    return words


def test_hf_folder_imports_exports_bitwise_and_verifies(tmp_path):
    """A random DebertaV2ForMaskedLM folder -> tools.import_from_hf -> tools.convert_to_hf --model deberta_mlm
    --verify: every tensor back bitwise, the outputs within the tolerance."""
    from safetensors.numpy import load_file

    from tools import convert_to_hf, import_from_hf

    hf_cfg = tiny_hf_config(vocab_size=120, max_position_embeddings=128)
    model = random_hf(transformers.DebertaV2ForMaskedLM, hf_cfg)
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "vocab.txt").write_text("".join(t + "\n" for t in _wordpiece_vocab(hf_cfg.vocab_size)))
    original = load_file(str(src / "model.safetensors"))

    assert import_from_hf.main(["--hf", str(src), "--out", str(tmp_path / "w")]) == 0
    assert convert_to_hf.main(["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "back"),
                               "--model", "deberta_mlm", "--verify"]) == 0
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    exported = transformers.DebertaV2Config.from_pretrained(tmp_path / "back")
    assert (exported.position_buckets, exported.position_biased_input, exported.pos_att_type) == (
        16, False, ["p2c", "c2p"])


# ---- end to end: python -m bert_jax.training with configs/deberta.py, then the exports ----

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cli(data_dir, workdir, *overrides):
    args = [sys.executable, "-m", "bert_jax.training", "--config", "configs/deberta.py:tiny", f"--workdir={workdir}",
            f"--config.data.dir={data_dir}", "--config.data.seq_len=64", "--config.data.shuffle_buffer=1000",
            "--config.objective.max_predictions=10", "--config.train.steps=20", "--config.train.log_every=10",
            "--config.train.eval_every=20", "--config.train.eval_batches=2", "--config.checkpoint.every=0",
            *overrides]
    # One CPU device, as a user runs it (the suite's 8 fake devices are for the sharding tests).
    env = {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # ~90 s on 2 busy cores: 20 steps of both towers, two exports with --verify
def test_tiny_deberta_v3_rtd_trains_and_exports(docstring_shards, tmp_path):
    from tools import convert_to_hf

    workdir = str(tmp_path / "w")
    records = _train_cli(docstring_shards, workdir)
    train = [r for r in records if "train/loss" in r]
    final = [r for r in records if "eval/disc_loss" in r][-1]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert final["eval/replaced_fraction"] > 0.05 and np.isfinite(final["eval/loss"])
    params, meta = checkpointing.load_params(workdir)
    assert meta.objective == "deberta_rtd" and set(params) == {"generator", "discriminator"}
    assert (meta.generator.num_layers, meta.generator.hidden_size, meta.model.num_layers) == (1, 128, 2)
    delta = params["discriminator"]["encoder"]["embeddings"]["word"]
    assert np.abs(delta).max() > 0  # E_delta learned from the discriminator's loss

    disc_out, gen_out = str(tmp_path / "disc"), str(tmp_path / "gen")
    assert convert_to_hf.main(["--workdir", workdir, "--out", disc_out, "--verify"]) == 0  # the default kind
    assert convert_to_hf.main(["--workdir", workdir, "--out", gen_out, "--model", "deberta_generator",
                               "--verify"]) == 0
    from safetensors.numpy import load_file
    folded = load_file(os.path.join(disc_out, "model.safetensors"))["deberta.embeddings.word_embeddings.weight"]
    gen_word = params["generator"]["encoder"]["embeddings"]["word"]
    np.testing.assert_array_equal(folded, (gen_word + delta).astype(np.float32))
    _, info = transformers.DebertaV2ForSequenceClassification.from_pretrained(
        disc_out, num_labels=3, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight", "pooler.dense.bias",
                                            "pooler.dense.weight"]
    assert not info["unexpected_keys"]


@pytest.mark.slow  # ~50 s: MLM on the DeBERTa backbone through the same recipe, exported as DebertaV2ForMaskedLM
def test_tiny_deberta_mlm_trains_and_exports(docstring_shards, tmp_path):
    from tools import convert_to_hf

    workdir = str(tmp_path / "w")
    records = _train_cli(docstring_shards, workdir, "--config.objective.name=mlm", "--config.train.eval_every=0")
    train = [r for r in records if "train/loss" in r]
    assert train[-1]["train/mlm_loss"] < train[0]["train/mlm_loss"]
    _, meta = checkpointing.load_params(workdir)
    assert meta.objective == "mlm" and meta.model.relative_attention and not meta.model.position_biased_input
    out = str(tmp_path / "hf")
    assert convert_to_hf.main(["--workdir", workdir, "--out", out, "--verify"]) == 0
    assert transformers.AutoConfig.from_pretrained(out).architectures == ["DebertaV2ForMaskedLM"]


@pytest.mark.parametrize("key, value, message", [
    ("model.pos_att_type", "c2p|x2y", "model.pos_att_type='c2p|x2y': terms are c2p and/or p2c"),
    ("model.share_att_key", False, "model.share_att_key=False (separate position projections) is not supported"),
    ("objective.generator_fraction", 0.5, "its hidden_size 64 must equal 128 (objective.generator_fraction=1)"),
])
def test_bad_deberta_settings_fail_before_anything_is_written(docstring_shards, tmp_path, key, value, message):
    from bert_jax import trainer
    from bert_jax.errors import ConfigError
    from configs import deberta

    c = deberta.get_config("tiny")
    section, name = key.split(".")
    with c.unlocked():
        c.data.dir, c.data.seq_len = docstring_shards, 64
        c[section][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        trainer.train_and_evaluate(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_import_refuses_what_our_encoder_does_not_compute(tmp_path):
    from tools import import_from_hf

    model = random_hf(transformers.DebertaV2Model, tiny_hf_config(conv_kernel_size=3))
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(SystemExit, match=r"^error: .*src: cannot import this model: conv_kernel_size=3"):
        import_from_hf.main(["--hf", str(tmp_path / "src"), "--out", str(tmp_path / "w")])
    assert not os.path.exists(tmp_path / "w")
