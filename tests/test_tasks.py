"""data_pipeline.tasks and the task's selection in data_pipeline.docstrings: the docstring_origin task on a few
standard-library packages, and its exclusion from the "docstrings" pretraining source."""

import dataclasses
import json
import os

import pytest

from data_pipeline import docstrings, sources, tasks
from data_pipeline.errors import DataError

# Small standard-library packages: fast to extract, and the same rules as the real ten-package task.
SMALL = docstrings.TaskSpec(packages=("asyncio", "email", "json"), cap=150, min_docs=20)


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("task"))
    cache = str(tmp_path_factory.mktemp("cache"))
    return tasks.write_task(out, SMALL, cache_dir=cache), out, cache


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_task_files_labels_balance_and_hash_splits(small_task):
    summary, out, _ = small_task
    labels = json.load(open(os.path.join(out, "labels.json"), encoding="utf-8"))
    assert labels == ["asyncio", "email", "json"]
    splits = {s: _read(os.path.join(out, f"{s}.jsonl")) for s in docstrings.TASK_SPLITS}
    texts = [ex["text"] for exs in splits.values() for ex in exs]
    assert len(texts) == len(set(texts))  # no text in two splits, or twice
    for split, exs in splits.items():
        for ex in exs:
            assert set(ex) == {"text", "label"} and ex["label"] in labels
            assert docstrings.split_name(ex["text"], SMALL) == split
    per_label = {lab: sum(ex["label"] == lab for exs in splits.values() for ex in exs) for lab in labels}
    assert per_label["asyncio"] == 150 and per_label["email"] == 150  # capped (both have > 150 here)
    assert 20 <= per_label["json"] < 150  # fewer than the cap: all of them
    assert len(splits["test"]) > 0 and len(splits["validation"]) > 0 and len(splits["train"]) > len(splits["test"])
    # Every example really is a docstring of the package it is labelled with.
    per_pkg = docstrings.package_docstrings(["json"])
    assert {ex["text"] for exs in splits.values() for ex in exs if ex["label"] == "json"} <= set(per_pkg["json"])


def test_too_few_docstrings_is_an_error_naming_the_package(tmp_path, capsys):
    spec = dataclasses.replace(SMALL, min_docs=100)
    with pytest.raises(DataError, match=r"fewer than 100 .*json \(\d+\)"):
        docstrings.build_task(spec)
    with pytest.raises(SystemExit):
        tasks.main(["nope", "--out", str(tmp_path)])
    assert "error: unknown task 'nope'" in capsys.readouterr().err


def test_a_missing_package_stops_the_task_but_not_the_held_out_texts(small_task, capsys):
    """Without one of the task's packages (as sklearn without scikit-learn) the task is a one-line error naming
    it, while the pretraining corpus still leaves out every text the task takes from the packages present."""
    _, out, _ = small_task
    spec = dataclasses.replace(SMALL, packages=SMALL.packages + ("no_such_package_here",))
    with pytest.raises(DataError, match=r"fewer than 20 .*: no_such_package_here \(0: is it installed\?\)$"):
        docstrings.build_task(spec)
    held = docstrings.heldout_texts(spec=spec)
    assert "note: the docstring_origin task cannot be built here" in capsys.readouterr().err
    assert held == {ex["text"] for s in docstrings.TASK_SPLITS for ex in _read(os.path.join(out, f"{s}.jsonl"))}


@pytest.mark.slow
def test_docstrings_source_leaves_out_the_task_documents(small_task, monkeypatch):
    """The "docstrings" pretraining source drops exactly the task's texts. The full corpus takes ~30 s to
    extract, so its cache is seeded with the standard-library corpus (through the real cache file)."""
    _, out, cache = small_task
    corpus = sources.docstring_documents(include_site_packages=False)
    key = docstrings.cache_key(True, ())
    with open(os.path.join(cache, f"docstrings-{key}.jsonl"), "w", encoding="utf-8") as f:
        for doc in corpus:
            f.write(json.dumps(doc) + "\n")
    monkeypatch.setitem(docstrings.TASKS, "docstring_origin", SMALL)
    held = {ex["text"] for s in docstrings.TASK_SPLITS for ex in _read(os.path.join(out, f"{s}.jsonl"))}
    assert held and held <= set(corpus)  # the task's texts are in the raw corpus ...
    got = list(sources.iter_documents("docstrings", cache_dir=cache))
    assert not held & set(got)  # ... and never in the pretraining source
    assert got == [d for d in corpus if d not in held]  # nothing else is lost, order kept
    assert list(sources.iter_documents("docstrings", cache_dir=cache, max_documents=5)) == got[:5]
