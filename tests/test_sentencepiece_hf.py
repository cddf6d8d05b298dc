"""SentencePiece tokenizers exported as Hugging Face tokenizers (`Tokenizer.save_hf`, the tokenizer.json built by
`tokenizer_backends.sentencepiece_hf_backend`) and a SentencePiece run exported by tools.convert_to_hf.

For unigram and BPE, cased and uncased: `transformers.AutoTokenizer` (offline) on the written folder gives our ids
on ~10k real texts (paragraphs and lines of standard-library docstrings), without and with [CLS] ... [SEP], and
the special tokens' ids. Unigram alone may differ on exact ties of the Viterbi path score (the same pieces in
another order, e.g. "9" "999" "999" against "999" "999" "9"): sentencepiece sums the scores in float32, the
`tokenizers` crate in float64, so rounding breaks such ties differently. The test asserts that every difference
is such a tie and that they are rare, and prints the counts.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data_pipeline.sources import docstring_documents  # noqa: E402
from data_pipeline.tokenization import Tokenizer  # noqa: E402
from data_pipeline.tokenizer_training import train_tokenizer  # noqa: E402
from tests.helpers import write_random_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return docstring_documents(include_site_packages=False, max_documents=1200,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))


@pytest.fixture(scope="module")
def texts(docs):
    paragraphs = [p.strip() for d in docs for p in d.split("\n\n") if p.strip()]
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    return paragraphs + lines


@pytest.fixture(scope="module", params=[("sentencepiece-unigram", True), ("sentencepiece-unigram", False),
                                        ("sentencepiece-bpe", True), ("sentencepiece-bpe", False)],
                ids=["unigram-uncased", "unigram-cased", "bpe-uncased", "bpe-cased"])
def exported_tokenizer(request, docs, tmp_path_factory):
    kind, lowercase = request.param
    out = str(tmp_path_factory.mktemp(f"{kind}-{lowercase}"))
    tok = Tokenizer.load(train_tokenizer(kind, docs, 600, os.path.join(out, "ours"), lowercase=lowercase))
    hf_dir = os.path.join(out, "hf")
    assert sorted(tok.save_hf(hf_dir, 128)) == sorted(os.listdir(hf_dir)) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    return tok, transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)


def _score(tok, ids):
    return float(np.sum([tok._sp.get_score(i) for i in ids], dtype=np.float64))


def test_ids_match_transformers(exported_tokenizer, texts):
    tok, hf = exported_tokenizer
    assert hf.model_max_length == 128
    specials = {"pad": tok.pad_id, "unk": tok.unk_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id}
    assert specials == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert {k: getattr(hf, f"{k}_token_id") for k in specials} == specials
    assert [hf.convert_ids_to_tokens(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    ours = tok.encode_batch(texts)
    assert tok.encode_hf_batch(texts) == ours  # no special token's text in these texts
    theirs = [list(x) for x in hf(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    with_special = [list(x) for x in hf(texts, verbose=False)["input_ids"]]
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    ties = [i for i in differ if abs(_score(tok, ours[i]) - _score(tok, theirs[i])) < 1e-4
            and tok.decode(ours[i]) == tok.decode(theirs[i])]
    print(f"{tok.kind} lowercase={tok.lowercase}: {len(texts)} texts, {sum(map(len, ours))} tokens, "
          f"{len(texts) - len(differ)} equal, {len(differ)} differ ({len(ties)} of them score ties)")
    assert len(texts) > 5000 and sum(map(len, ours)) > 150_000
    assert ties == differ  # nothing but float32/float64 tie-breaking
    if tok.model_type == "bpe":
        assert not differ
    else:
        assert len(differ) <= len(texts) // 1000
    for i, (a, b) in enumerate(zip(theirs, with_special)):
        assert b == [2] + a + [3], i
    # A pair: [CLS] A [SEP] B [SEP] with token types 0 then 1.
    pair = hf("the first text", "and the second", verbose=False)
    a, b = tok.encode("the first text"), tok.encode("and the second")
    assert pair["input_ids"] == [2, *a, 3, *b, 3]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_special_token_text(exported_tokenizer):
    """The text of a special token is that token in the HF tokenizer (fill-mask needs it), and what
    `encode_hf_batch` says; our own `encode` reads it as text."""
    tok, hf = exported_tokenizer
    texts = ["Return a [MASK] of the path.", "[CLS]x[SEP] [PAD][UNK]", "[MASK]", "a  [MASK]  b "]
    expected = tok.encode_hf_batch(texts)
    assert [list(x) for x in hf(texts, add_special_tokens=False)["input_ids"]] == expected
    assert expected[0] == tok.encode("Return a ") + [4] + tok.encode(" of the path.")
    assert expected[1] == [2] + tok.encode("x") + [3, 0, 1] and expected[2] == [4]
    assert 4 not in tok.encode(texts[0])
    assert hf("Return a [MASK] of the path.")["input_ids"] == [2, *expected[0], 3]
    assert hf.decode(hf("Return the value of x.", add_special_tokens=False)["input_ids"]) == (
        "return the value of x." if tok.lowercase else "Return the value of x.")


def test_whitespace_and_unicode(exported_tokenizer):
    tok, hf = exported_tokenizer
    texts = ["", " ", "  a  b  ", "\ta\tb\n", "x\u3000y", "\ufb01 ligature", "\uff21\uff42\uff43 fullwidth",
             "e\u0301 and \u00e9", "\u65e5\u672c\u8a9e", "emoji \U0001F600\U0001F600 x", "\u00a0nbsp\u00a0",
             "a\r\nb", "\u0130stanbul \u00df \u03a3\u0391\u03a3", "x\x07y"]
    assert [list(x) for x in hf(texts, add_special_tokens=False)["input_ids"]] == tok.encode_batch(texts)


@pytest.mark.parametrize("kind", ["sentencepiece-unigram", "sentencepiece-bpe"])
def test_convert_cli_exports_a_sentencepiece_run(kind, docs, tmp_path):
    import json

    workdir = str(tmp_path / "w")
    tok = Tokenizer.load(train_tokenizer(kind, docs, 600, os.path.join(workdir, "tokenizer")))
    write_random_checkpoint(workdir, tok)
    out = str(tmp_path / "hf")
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "tools.convert_to_hf", "--workdir", workdir, "--out", out, "--verify"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    print(kind, {k: summary[k] for k in ("tokenizer_ids_match", "texts", "max_abs_diff_logits", "max_abs_diff_hidden")})
    assert summary["ok"] and summary["tokenizer_ids_match"] is True
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                       "tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 64
    assert config["mask_token"] == "[MASK]" and config["vocab_hash"] == tok.vocab_hash

    fill = transformers.pipeline("fill-mask", model=out)
    results = fill("Return a [MASK] of the path.", top_k=3)
    assert len(results) == 3 and all("[MASK]" not in r["sequence"] for r in results)
    assert all(0 <= r["token"] < tok.vocab_size for r in results)
