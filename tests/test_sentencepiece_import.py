"""A Hugging Face BERT folder whose tokenizer is SentencePiece-based (a tokenizer.json with a Unigram or BPE model
and no vocab.txt, as transformers writes ALBERT-style tokenizers and as our SentencePiece exports are) imports
with tools.import_from_hf, continues pretraining on text pretokenized with its own tokenizer (`--vocab W/tokenizer`,
read by `data_pipeline.tokenization.JsonTokenizer`), and exports again with --verify.

The folder is built here: a SentencePiece model trained on standard-library docstrings, written as a Hugging Face
tokenizer (`Tokenizer.save_hf`), beside a random transformers BertForMaskedLM of that vocabulary."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bert_jax import checkpointing, trainer  # noqa: E402
from configs import bert as bert_configs  # noqa: E402
from data_pipeline import manifest as manifest_lib  # noqa: E402
from data_pipeline import pretokenize  # noqa: E402
from data_pipeline.errors import DataError  # noqa: E402
from data_pipeline.sources import docstring_documents  # noqa: E402
from data_pipeline.tokenization import JsonTokenizer, Tokenizer  # noqa: E402
from data_pipeline.tokenizer_training import train_tokenizer  # noqa: E402
from tools import convert_to_hf, import_from_hf  # noqa: E402


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return docstring_documents(include_site_packages=False, max_documents=1200,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))


def _hf_folder(tok, out: str) -> str:
    """`tok` as a Hugging Face tokenizer and a random BertForMaskedLM (perturbed LayerNorms and biases) over it."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=3, intermediate_size=96, max_position_embeddings=64,
                                     pad_token_id=tok.pad_id)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    tok.save_hf(out, 64)
    return out


@pytest.mark.parametrize("kind,lowercase", [("sentencepiece-unigram", True), ("sentencepiece-bpe", False)],
                         ids=["unigram-uncased", "bpe-cased"])
def test_imported_tokenizer_gives_our_sentencepiece_ids(kind, lowercase, docs, tmp_path):
    """The tokenizer.json of the folder, loaded by Tokenizer.load, gives the SentencePiece model's ids (up to the
    float32/float64 score ties of unigram, see tests/test_sentencepiece_hf.py) and the same special ids."""
    sp = Tokenizer.load(train_tokenizer(kind, docs, 600, str(tmp_path / "sp"), lowercase=lowercase))
    sp.save_hf(str(tmp_path / "hf"), 64)
    tok = Tokenizer.load(str(tmp_path / "hf"))
    assert isinstance(tok, JsonTokenizer) and tok.kind == f"json-{sp.model_type}" and tok.lowercase == lowercase
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.vocab_size) == (
        sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id, sp.mask_id, sp.vocab_size)
    assert set(sp.special_ids) <= set(tok.special_ids)
    np.testing.assert_array_equal(tok.word_start_mask(), sp.word_start_mask())
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    ours, theirs = sp.encode_batch(lines), tok.encode_batch(lines)
    differ = sum(a != b for a, b in zip(ours, theirs))
    print(f"{kind} lowercase={lowercase}: {len(lines)} lines, {sum(map(len, ours))} tokens, {differ} differ")
    assert len(lines) > 5000 and differ <= (0 if sp.model_type == "bpe" else len(lines) // 1000)
    # The other case than the tokenizer's is refused, naming the file; the configs' own flag is what counts.
    case = ("uncased", "cased") if lowercase else ("cased", "uncased")
    with pytest.raises(DataError, match=f"tokenizer.json: the tokenizer is {case[0]}, but a {case[1]}"):
        Tokenizer.load(str(tmp_path / "hf"), lowercase=not lowercase)
    os.remove(tmp_path / "hf" / "tokenizer_config.json")  # no flag: the normaliser's case folding decides
    assert Tokenizer.load(str(tmp_path / "hf")).lowercase == lowercase


@pytest.mark.slow
def test_sentencepiece_bert_folder_imports_trains_and_exports(docs, tmp_path, capsys):
    sp = Tokenizer.load(train_tokenizer("sentencepiece-unigram", docs, 600, str(tmp_path / "sp")))
    src = _hf_folder(sp, str(tmp_path / "src"))
    assert "vocab.txt" not in os.listdir(src) and "spm.model" not in os.listdir(src)

    imported = str(tmp_path / "imported")
    assert import_from_hf.main(["--hf", src, "--out", imported]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "tokenizer.json" in summary["tokenizer_files"] and not summary["mlm_head_initialised"]
    tok = Tokenizer.load(os.path.join(imported, "tokenizer"))
    _, meta = checkpointing.load_params(imported)
    assert meta.vocab_hash == tok.vocab_hash

    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in docs[:400]:
            f.write(json.dumps({"text": d}) + "\n")
    data = str(tmp_path / "data")
    assert pretokenize.main(["--source", str(corpus), "--out", data, "--vocab", os.path.join(imported, "tokenizer"),
                             "--seq-len", "64", "--validation-fraction", "0.1", "--workers", "1"]) == 0
    manifest = manifest_lib.load(data)
    assert manifest.tokenizer.type == "json-unigram" and manifest.vocab_hash == tok.vocab_hash
    assert (manifest.special_ids.pad, manifest.special_ids.mask) == (sp.pad_id, sp.mask_id)

    c = bert_configs.get_config("tiny")
    with c.unlocked():
        c.data.dir, c.data.seq_len, c.init_from = data, 64, imported
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every, c.train.eval_batches = 2, 8, 1, 2, 1
        c.optim.learning_rate, c.optim.warmup_steps = 1e-4, 0
        c.objective.whole_word_masking = True  # the "▁" word starts of the tokenizer.json
    run = str(tmp_path / "run")
    last = trainer.train_and_evaluate(c, run)
    assert np.isfinite(last["eval/loss"])
    end, meta = checkpointing.load_params(run)
    assert meta.step == 2 and meta.model.hidden_size == 48

    out = str(tmp_path / "out")
    assert convert_to_hf.main(["--workdir", run, "--out", out, "--verify"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with capsys.disabled():
        print("export of the continued run:",
              {k: figures[k] for k in ("tokenizer_ids_match", "max_abs_diff_logits", "max_abs_diff_hidden")})
    assert figures["ok"] and figures["tokenizer_ids_match"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = [" ".join(d.split()) for d in docs[:200]]
    assert [list(x) for x in hf_tok(texts, add_special_tokens=False)["input_ids"]] == sp.encode_batch(texts)
