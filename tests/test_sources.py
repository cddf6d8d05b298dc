"""Tests for data_pipeline.sources and data_pipeline.docstrings (the docstring corpus),
data_pipeline.splitting (split_of), and the text/JSONL file readers."""

import gzip
import inspect
import json
import os

import pytest

from data_pipeline import DataError, docstrings, sources
from data_pipeline.sources import docstring_documents, file_documents, iter_documents
from data_pipeline.splitting import split_of


@pytest.fixture(scope="module")
def stdlib_docs(tmp_path_factory):
    # Built here (a fresh session cache), then reused from the cache by the other test files.
    return docstring_documents(include_site_packages=False,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "docstrings"))


def test_stdlib_corpus_is_clean_and_deterministic(stdlib_docs):
    import json.decoder as json_decoder

    assert len(stdlib_docs) > 3000
    assert len(set(stdlib_docs)) == len(stdlib_docs)  # exact dedup
    assert all(len(d) >= 20 for d in stdlib_docs)
    assert all(d == inspect.cleandoc(d) for d in stdlib_docs[:500])
    # A module docstring and a method docstring of a known file are present, in source order.
    module_doc = inspect.cleandoc(json_decoder.__doc__)
    method_doc = inspect.cleandoc(json_decoder.JSONDecoder.decode.__doc__)
    assert stdlib_docs.index(module_doc) < stdlib_docs.index(method_doc)


def test_stdlib_test_directories_are_skipped():
    files = docstrings.python_files(docstrings.roots(False)[0])
    assert os.path.join("json", "decoder.py") in files
    assert files == sorted(files)
    parts = {p for f in files for p in f.split(os.sep)[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}


def _write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


@pytest.fixture
def fake_roots(tmp_path, monkeypatch):
    """A fake stdlib and site-packages, so the extraction rules can be checked exactly."""
    std, site = tmp_path / "std", tmp_path / "site"
    _write(std / "alpha.py", '"""Alpha module docstring, long enough."""\n'
                             'class A:\n    """Class A docstring, long enough to keep."""\n'
                             '    def f(self):\n        """short"""\n'
                             'try:\n    import x\nexcept ImportError:\n'
                             '    def g():\n        """Fallback g docstring inside an except block."""\n')
    _write(std / "tests" / "test_alpha.py", '"""A test module docstring that must be skipped."""\n')
    _write(std / "broken.py", '"""A docstring in a file that does not parse."""\ndef (:\n')
    _write(std / "latin.py", '# -*- coding: latin-1 -*-\n"""Caf\xe9 docstring in a latin-1 source file."""\n',
           encoding="latin-1")
    _write(site / "pkg" / "__init__.py", '"""Package docstring of pkg, long enough."""\n'
                                         'def h():\n    """Alpha module docstring, long enough."""\n')
    _write(site / "other.py", '"""Docstring of the other module, long enough."""\n')
    monkeypatch.setattr(docstrings, "roots", lambda include: [str(std), str(site)] if include else [str(std)])
    return std, site


def test_extraction_rules_on_fake_roots(fake_roots):
    docs = docstring_documents(include_site_packages=True)
    assert docs == [
        "Alpha module docstring, long enough.",
        "Class A docstring, long enough to keep.",
        "Fallback g docstring inside an except block.",
        "Caf\xe9 docstring in a latin-1 source file.",
        "Docstring of the other module, long enough.",  # other.py sorts before pkg/
        "Package docstring of pkg, long enough.",  # h's docstring duplicates alpha's: dropped
    ]
    assert docstring_documents(include_site_packages=False)[-1].startswith("Caf")
    assert docstring_documents(include_site_packages=True, max_documents=2) == docs[:2]
    held_out = docstring_documents(include_site_packages=True, exclude_packages=["pkg", "alpha"])
    assert "Package docstring of pkg, long enough." not in held_out
    assert "Class A docstring, long enough to keep." not in held_out
    assert "Docstring of the other module, long enough." in held_out


def test_cache_is_written_and_reused(fake_roots, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = docstring_documents(cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 1

    def fail(*args):
        raise AssertionError("the corpus was rebuilt instead of read from the cache")

    monkeypatch.setattr(docstrings, "python_files", fail)  # building the corpus lists the roots' files
    assert docstring_documents(cache_dir=str(cache)) == first
    assert docstring_documents(cache_dir=str(cache), max_documents=2) == first[:2]
    with pytest.raises(AssertionError):  # other arguments -> other cache key
        docstring_documents(cache_dir=str(cache), exclude_packages=["pkg"])


def test_split_of_is_stable_and_proportional():
    assert split_of("hello world", 0.5) == "validation"  # sha1 prefix of this text is 0.1667...
    assert split_of("hello world", 0.1) == "train"
    texts = [f"document number {i}" for i in range(20000)]
    share = sum(split_of(t, 0.1) == "validation" for t in texts) / len(texts)
    assert 0.09 < share < 0.11
    assert all(split_of(t, 0.0) == "train" for t in texts[:100])
    assert all(split_of(t, 1.0) == "validation" for t in texts[:100])
    with pytest.raises(DataError):
        split_of("x", 1.5)


def test_txt_blocks_lines_and_gzip(tmp_path):
    text = "first doc line 1\nline 2\n\n\n  \nsecond doc\n\nthird\n"
    (tmp_path / "a.txt").write_text(text)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write(text)
    expected = ["first doc line 1\nline 2", "second doc", "third"]
    assert list(file_documents(str(tmp_path / "a.txt"))) == expected
    assert list(file_documents(str(tmp_path / "b.txt.gz"))) == expected
    assert list(file_documents(str(tmp_path / "a.txt"), txt_mode="line")) == [
        "first doc line 1", "line 2", "second doc", "third"]


def test_jsonl_and_json_gz(tmp_path):
    rows = [{"text": "one", "id": 1}, {"text": "two"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        f.write(json.dumps({"body": "three"}) + "\n")
    assert list(file_documents(str(tmp_path / "a.jsonl"))) == ["one", "two"]
    assert list(file_documents(str(tmp_path / "b.json.gz"), text_field="body")) == ["three"]


def test_folder_and_glob_are_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("from b")
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "c.jsonl").write_text('{"text": "from c"}\n')
    assert list(file_documents(str(tmp_path))) == ["from a", "from c", "from b"]
    assert list(file_documents(str(tmp_path / "**" / "*.txt"))) == ["from a", "from b"]
    assert list(iter_documents(str(tmp_path), max_documents=2)) == ["from a", "from c"]


@pytest.mark.parametrize("content, fragment", [
    ('{"text": "ok"}\n{"title": "no text"}\n', ":2: no field 'text'"),
    ('{"text": "ok"}\nnot json\n', ":2: invalid JSON"),
    ('{"text": 5}\n', ":1: field 'text' is int"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        list(file_documents(str(path)))
    assert str(path) + fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_nothing_matches_and_bad_bytes(tmp_path):
    pattern = str(tmp_path / "nothing-*.txt")
    with pytest.raises(DataError, match="nothing-"):
        list(file_documents(pattern))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="bin.txt: not UTF-8"):
        list(file_documents(str(tmp_path / "bin.txt")))


def test_source_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n\nworld\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    assert sources.source_bytes(str(tmp_path)) == 13 + 14
    assert sources.source_bytes(str(tmp_path / "*.txt")) == 13
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("zipped")
    assert sources.source_bytes(str(tmp_path)) is None  # gzip: unknown uncompressed size
    assert sources.source_bytes("docstrings") is None and sources.source_bytes("tfds:c4/en") is None
    with pytest.raises(DataError, match="no input files match"):
        sources.source_bytes(str(tmp_path / "none*.txt"))
