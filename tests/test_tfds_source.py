"""TFDS sources through the real pretokenize entry point, on tensorflow-datasets' own mock data (no download)."""


import numpy as np
import pytest

from data_pipeline import DataError, pretokenize, validate
from data_pipeline import manifest as manifest_lib
from data_pipeline.dataset import as_numpy, make_dataset
from data_pipeline.packing import pack_documents
from data_pipeline.sources import iter_documents
from data_pipeline.splitting import split_of
from data_pipeline.tokenization import Tokenizer

tfds = pytest.importorskip("tensorflow_datasets")


def mock(n):
    return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def test_tfds_documents_stream_the_text_feature():
    with mock(7):
        expected = [ex["text"].decode() for ex in tfds.as_numpy(tfds.load("c4/en", split="validation"))]
        docs = list(iter_documents("tfds:c4/en", tfds_split="validation"))
        assert docs == expected and len(docs) == 7 and all(isinstance(d, str) for d in docs)
        assert list(iter_documents("tfds:c4/en", tfds_split="validation", max_documents=3)) == docs[:3]
        # Another string feature by name; a missing feature is one clear line.
        urls = list(iter_documents("tfds:c4/en", text_field="url", tfds_split="validation"))
        assert len(urls) == 7 and urls != docs
        with pytest.raises(DataError, match=r"tfds:c4/en\[validation\]: no feature 'body' \(features: \[.*'text'"):
            list(iter_documents("tfds:c4/en", text_field="body", tfds_split="validation"))


def test_missing_tfds_dataset_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        list(iter_documents("tfds:wikipedia/20230601.en", tfds_data_dir=str(tmp_path)))
    assert str(e.value).startswith("tfds:wikipedia/20230601.en[train]: cannot load the prepared dataset")
    assert "\n" not in str(e.value)


def test_pretokenize_cli_on_mock_wikipedia(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--source", "tfds:wikipedia/20230601.en", "--tfds-split", "train", "--tfds-data-dir", str(tmp_path),
            "--out", str(out), "--vocab-size", "200", "--seq-len", "32", "--validation-fraction", "0.2",
            "--workers", "2"]
    with mock(60):
        assert pretokenize.main(args) == 0
        texts = [ex["text"].decode() for ex in tfds.as_numpy(tfds.load("wikipedia/20230601.en", split="train"))]
    manifest = manifest_lib.load(str(out))
    assert manifest.source == "tfds:wikipedia/20230601.en"
    assert manifest.args["tfds_split"] == "train" and manifest.args["tfds_data_dir"] == str(tmp_path)
    tok = Tokenizer.load(str(out / "tokenizer"))
    for split, info in manifest.splits.items():
        docs = [t for t in texts if t.strip() and split_of(t, 0.2) == split]
        assert info.documents == len(docs) > 5
        expected = list(pack_documents(tok.encode_batch(docs), 32, tok.cls_id, tok.sep_id, tok.pad_id))
        # The shards read back in file order by the reader training uses.
        ds = make_dataset(str(out), split, 16, shuffle=False, repeat=False, drop_remainder=False)
        got = [r for b in as_numpy(ds) for r in b["input_ids"]]
        assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert validate.check(str(out)) == []
    assert "train:" in capsys.readouterr().out
