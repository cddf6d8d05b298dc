"""RoBERTa (#23 item 2): the byte-level BPE tokenizer (`--tokenizer bytelevel-bpe`, `ByteLevelBPETokenizer`) against
transformers' RobertaTokenizer, configs/roberta.py, the RobertaForMaskedLM export (positions after the padding id:
`EncoderConfig.position_offset`) verified by logits, and a RoBERTa folder imported for continued pretraining,
HF -> ours -> HF bitwise. Everything is built here: the tokenizer trained on standard-library docstrings, the
transformers models from configs with random weights."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bert_jax import builder, checkpointing, hf_export, trainer  # noqa: E402
from bert_jax.errors import ConfigError  # noqa: E402
from bert_jax.hf_export import ConversionError  # noqa: E402
from configs import roberta as roberta_configs  # noqa: E402
from data_pipeline import manifest as manifest_lib  # noqa: E402
from data_pipeline import pretokenize  # noqa: E402
from data_pipeline.errors import DataError  # noqa: E402
from data_pipeline.sources import docstring_documents  # noqa: E402
from data_pipeline.tokenization import ByteLevelBPETokenizer, Tokenizer  # noqa: E402
from data_pipeline.tokenizer_training import train_tokenizer  # noqa: E402
from tools import convert_to_hf, import_from_hf  # noqa: E402


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return docstring_documents(include_site_packages=False, max_documents=1200,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))


@pytest.fixture(scope="module")
def texts(docs):
    paragraphs = [p.strip() for d in docs for p in d.split("\n\n") if p.strip()]
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    return paragraphs + lines


@pytest.fixture(scope="module")
def cased(docs, tmp_path_factory):
    """A cased byte-level BPE of 1000 tokens, and its Hugging Face export folder."""
    out = tmp_path_factory.mktemp("bytelevel")
    tok = Tokenizer.load(train_tokenizer("bytelevel-bpe", docs, 1000, str(out / "ours"), lowercase=False))
    tok.save_hf(str(out / "hf"), 512)
    return tok, str(out / "hf")


def test_bytelevel_bpe_ids_match_transformers_roberta_tokenizer(cased, docs, texts, tmp_path):
    tok, hf_dir = cased
    assert isinstance(tok, ByteLevelBPETokenizer) and tok.kind == "bytelevel-bpe" and not tok.lowercase
    assert [tok.id_to_token(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert sorted(os.listdir(hf_dir)) == ["merges.txt", "special_tokens_map.json", "tokenizer.json",
                                          "tokenizer_config.json", "vocab.json"]
    # transformers' RobertaTokenizer built from vocab.json + merges.txt alone (not from our tokenizer.json), and
    # AutoTokenizer on the folder.
    rt = transformers.RobertaTokenizer(vocab=os.path.join(hf_dir, "vocab.json"),
                                       merges=os.path.join(hf_dir, "merges.txt"))
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert auto.model_max_length == 512 and (auto.pad_token_id, auto.mask_token_id) == (1, 4)
    ours = tok.encode_batch(texts)
    with_special = [list(x) for x in rt(texts, verbose=False)["input_ids"]]
    differ_rt = sum(a != b[1:-1] or b[0] != 0 or b[-1] != 2 for a, b in zip(ours, with_special))
    theirs = [list(x) for x in auto(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    differ_auto = sum(a != b for a, b in zip(ours, theirs))
    print(f"bytelevel-bpe cased: {len(texts)} texts, {sum(map(len, ours))} tokens; differ from RobertaTokenizer "
          f"(vocab.json + merges.txt): {differ_rt}, from AutoTokenizer: {differ_auto}")
    assert len(texts) > 5000 and sum(map(len, ours)) > 150_000
    assert differ_rt == differ_auto == 0
    assert all(tok.decode(ids) == text for ids, text in zip(ours[:500], texts[:500]))  # lossless on bytes
    # RoBERTa's pair layout.
    a, b = tok.encode("the first text"), tok.encode("and the second")
    assert rt("the first text", "and the second")["input_ids"] == [0, *a, 2, 2, *b, 2]
    # <mask> takes the space before it, as in roberta-base's published tokenizer.json (lstrip); transformers 5's
    # RobertaTokenizer built from vocab.json + merges.txt alone keeps that space as a "Ġ" token instead.
    masked = ["Return a <mask> of the path.", "<s>x</s><pad>"]
    assert [list(x) for x in auto(masked, add_special_tokens=False)["input_ids"]] == tok.encode_hf_batch(masked)
    assert tok.encode_hf_batch(masked) == [tok.encode("Return a") + [4] + tok.encode(" of the path."),
                                           [0, *tok.encode("x"), 2, 1]]
    assert rt("<s>x</s><pad>", add_special_tokens=False)["input_ids"] == [0, *tok.encode("x"), 2, 1]
    # Our own encoding (pretokenize's) reads that text as text: a literal "<s>" in a document starts no new one.
    assert not set(tok.encode("a <s> in HTML, </s> and <mask>")) & set(tok.special_ids)
    # Whole words start at "Ġ"; the loaded forms (tokenizer.json, vocab.json + merges.txt) are the same tokenizer.
    starts = tok.word_start_mask()
    assert all(starts[i] == tok.id_to_token(i).startswith("\u0120") for i in range(5, tok.vocab_size))
    for name in ("merges.txt", "vocab.json"):
        (tmp_path / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
    assert Tokenizer.load(str(tmp_path)).vocab_hash == Tokenizer.load(hf_dir).vocab_hash == tok.vocab_hash
    assert Tokenizer.load(str(tmp_path / "vocab.json")).vocab_hash == tok.vocab_hash
    os.remove(tmp_path / "merges.txt")
    with pytest.raises(DataError, match=r"no tokenizer at .* \(no tokenizer.json, nor vocab.json \+ merges.txt\)"):
        Tokenizer.load(str(tmp_path / "vocab.json"))


def test_bytelevel_bpe_training_is_deterministic_and_uncased_folds_case(docs, tmp_path):
    first = Tokenizer.load(train_tokenizer("bytelevel-bpe", docs[:600], 700, str(tmp_path / "a")))
    again = Tokenizer.load(train_tokenizer("bytelevel-bpe", docs[:600], 700, str(tmp_path / "b")))
    assert first.vocab_hash == again.vocab_hash and first.lowercase
    assert first.encode("Return The PATH") == first.encode("return the path")
    first.save_hf(str(tmp_path / "hf"), 128)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    lines = [line for d in docs[600:] for line in d.splitlines() if line.strip()]
    assert [list(x) for x in hf(lines, add_special_tokens=False)["input_ids"]] == first.encode_batch(lines)
    with pytest.raises(DataError, match="needs vocab_size > 261"):
        train_tokenizer("bytelevel-bpe", docs[:10], 200, str(tmp_path / "c"))


def _random_roberta(tok, max_positions: int = 66):
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=tok.vocab_size, hidden_size=48, num_hidden_layers=2,
                                        num_attention_heads=3, intermediate_size=96, type_vocab_size=1,
                                        max_position_embeddings=max_positions, pad_token_id=tok.pad_id,
                                        bos_token_id=tok.cls_id, eos_token_id=tok.sep_id)
    model = transformers.RobertaForMaskedLM(config)
    with torch.no_grad():  # non-trivial biases, LayerNorms and padding row
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_roberta_folder_round_trip_bitwise_and_same_logits(cased, tmp_path, capsys):
    """A random RobertaForMaskedLM -> tools.import_from_hf -> export: identical tensors; our model gives its logits
    at every position of a padded batch (padding included: it reads the padding row as RoBERTa does)."""
    from safetensors.numpy import load_file

    tok, _ = cased
    model = _random_roberta(tok)
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    tok.save_hf(src, 64)
    w = str(tmp_path / "w")
    assert import_from_hf.main(["--hf", src, "--out", w]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not summary["mlm_head_initialised"] and {"vocab.json", "merges.txt"} <= set(summary["tokenizer_files"])
    params, meta = checkpointing.load_params(w)
    assert (meta.model.position_offset, meta.model.type_vocab_size, meta.model.max_position_embeddings) == (2, 1, 66)
    assert meta.vocab_hash == tok.vocab_hash

    back = str(tmp_path / "back")
    with pytest.raises(ConversionError, match=r"--model mlm is not available .* available: \['roberta_mlm'\]"):
        convert_to_hf.convert(w, back)
    convert_to_hf.convert(w, back, model="roberta_mlm")
    original = load_file(os.path.join(src, "model.safetensors"))
    exported = load_file(os.path.join(back, "model.safetensors"))
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["architectures"] == ["RobertaForMaskedLM"] and config["model_type"] == "roberta"
    assert (config["pad_token_id"], config["max_position_embeddings"], config["type_vocab_size"]) == (1, 66, 1)

    hf_tok = transformers.AutoTokenizer.from_pretrained(back)
    batch = hf_tok(["Return the path.", "A longer text, which goes on for a while: it has a <mask> too."],
                   padding=True, return_tensors="np")
    assert (batch["attention_mask"] == 0).any()
    hidden, logits = hf_export.run_model(meta.model, params, batch["input_ids"], batch["attention_mask"],
                                         np.zeros_like(batch["input_ids"]), "roberta_mlm")
    with torch.no_grad():
        res = model.eval()(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                           attention_mask=torch.from_numpy(batch["attention_mask"]).long(), output_hidden_states=True)
    diff_logits = float(np.abs(res.logits.numpy() - logits).max())
    diff_hidden = float(np.abs(res.hidden_states[-1].numpy() - hidden).max())
    print(f"random RoBERTa, every position of a padded batch: logits diff {diff_logits:.3g}, hidden {diff_hidden:.3g}")
    assert diff_logits < 1e-5 and diff_hidden < 1e-5
    # As a sentence-transformers folder: a bare RobertaModel, mean pooling, our head beside it.
    st = convert_to_hf.convert(w, str(tmp_path / "st"), model="roberta_mlm", verify=True, sentence_transformers=True)
    print("as sentence-transformers:", {k: st[k] for k in ("max_abs_diff_logits", "st_max_rel_diff_embedding")})
    assert st["ok"] and st["st_ok"] and st["architectures"] == ["RobertaModel"]
    assert st["head_file"] == "roberta_mlm_head.safetensors"


def test_roberta_recipe(cased):
    tok, _ = cased
    for size, lr, warmup in (("base", 6e-4, 24_000), ("large", 4e-4, 30_000)):
        c = roberta_configs.get_config(f"{size},gpu")
        assert (c.optim.learning_rate, c.optim.warmup_steps, c.optim.b1, c.optim.b2, c.optim.eps) == (
            lr, warmup, 0.9, 0.98, 1e-6)
        assert (c.data.seq_len, c.train.batch_size, c.train.steps, c.optim.clip_norm) == (512, 8192, 500_000, 0.0)
        assert (c.model.type_vocab_size, c.model.position_offset, c.model.max_position_embeddings) == (1, 2, 514)
        assert c.model.hidden_act == "gelu" and c.model.dtype == "bfloat16"
    # The positions must start right after the data's padding id: a WordPiece dataset (pad 0) is refused in one line.
    c = roberta_configs.get_config("tiny")
    ids = manifest_lib.SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    with pytest.raises(ConfigError, match=r"model.position_offset=2: .* must be 1 \(the padding id"):
        builder.check_config(c, manifest_lib.synthetic(128, 1000, ids), num_devices=1)
    ids = manifest_lib.SpecialIds(pad=tok.pad_id, unk=tok.unk_id, cls=tok.cls_id, sep=tok.sep_id, mask=tok.mask_id)
    with c.unlocked():
        c.data.seq_len = 513
    with pytest.raises(ConfigError, match="data.seq_len=513 exceeds model.max_position_embeddings=514 less "
                                          "model.position_offset=2"):
        builder.check_config(c, manifest_lib.synthetic(513, 1000, ids), num_devices=1)


@pytest.mark.slow
def test_roberta_folder_continues_pretraining(cased, docs, tmp_path, capsys):
    """A random RobertaForMaskedLM folder with a byte-level BPE -> tools.import_from_hf -> pretokenize with its
    tokenizer (whole-word masking from "Ġ") -> configs/roberta.py:tiny with init_from -> export RobertaForMaskedLM
    with --verify -> fill-mask."""
    tok, _ = cased
    src = str(tmp_path / "src")
    _random_roberta(tok).save_pretrained(src)
    tok.save_hf(src, 64)
    imported = str(tmp_path / "imported")
    assert import_from_hf.main(["--hf", src, "--out", imported]) == 0
    start, _ = checkpointing.load_params(imported)

    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in docs[:400]:
            f.write(json.dumps({"text": d}) + "\n")
    data = str(tmp_path / "data")
    assert pretokenize.main(["--source", str(corpus), "--out", data, "--vocab", os.path.join(imported, "tokenizer"),
                             "--tokenizer", "bytelevel-bpe", "--seq-len", "64", "--validation-fraction", "0.1",
                             "--workers", "1"]) == 0
    manifest = manifest_lib.load(data)
    assert manifest.tokenizer.type == "bytelevel-bpe" and manifest.special_ids.pad == 1 and not manifest.lowercase
    assert set(manifest.tokenizer.files) == {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    assert manifest.vocab_hash == tok.vocab_hash

    c = roberta_configs.get_config("tiny")
    with c.unlocked():
        c.data.dir, c.data.seq_len, c.init_from = data, 64, imported
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every, c.train.eval_batches = 2, 8, 1, 2, 1
        c.optim.warmup_steps = 0
        c.objective.whole_word_masking = True
    run = str(tmp_path / "run")
    assert np.isfinite(trainer.train_and_evaluate(c, run)["eval/loss"])
    end, meta = checkpointing.load_params(run)
    assert meta.step == 2 and (meta.model.position_offset, meta.model.hidden_size, meta.model.layer_norm_eps) == (
        2, 48, 1e-12)  # the shape and settings of the imported folder, not the tiny recipe's
    assert not np.array_equal(end["encoder"]["embeddings"]["word"], start["encoder"]["embeddings"]["word"])

    out = str(tmp_path / "out")
    assert convert_to_hf.main(["--workdir", run, "--out", out, "--model", "roberta_mlm", "--verify"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with capsys.disabled():
        print("export of the continued RoBERTa:",
              {k: figures[k] for k in ("tokenizer_ids_match", "max_abs_diff_logits", "max_abs_diff_hidden")})
    assert figures["ok"] and figures["architecture"] == "RobertaForMaskedLM"
    fill = transformers.pipeline("fill-mask", model=out)
    results = fill("Return a <mask> of the path.", top_k=3)
    assert len(results) == 3 and all("<mask>" not in r["sequence"] for r in results)


def test_pretokenize_cli_trains_a_bytelevel_bpe(docs, tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in docs[:300]:
            f.write(json.dumps({"text": d}) + "\n")
    data = str(tmp_path / "data")
    assert pretokenize.main(["--source", str(corpus), "--out", data, "--tokenizer", "bytelevel-bpe", "--cased",
                             "--vocab-size", "600", "--seq-len", "64", "--workers", "1"]) == 0
    manifest = manifest_lib.load(data)
    assert manifest.tokenizer.type == "bytelevel-bpe" and manifest.vocab_size == 600 and not manifest.lowercase
    assert (manifest.special_ids.cls, manifest.special_ids.pad, manifest.special_ids.sep,
            manifest.special_ids.mask) == (0, 1, 2, 4)
    from data_pipeline.tokenization import word_start_table  # pylint: disable=import-outside-toplevel
    starts = np.frombuffer(word_start_table(data, manifest), dtype=bool)
    assert starts[:5].all() and 0 < starts.sum() < 600
    # A WordPiece vocabulary given with --tokenizer bytelevel-bpe is refused in one line.
    wordpiece = train_tokenizer("wordpiece", docs[:300], 500, str(tmp_path / "wp"))
    assert pretokenize.main(["--source", str(corpus), "--out", str(tmp_path / "d2"), "--tokenizer", "bytelevel-bpe",
                             "--vocab", wordpiece]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --tokenizer bytelevel-bpe does not match {wordpiece} (a wordpiece tokenizer)")
