"""Test set-up: 8 fake CPU devices (before jax is imported anywhere), quiet TensorFlow, the slow marker."""

import os
import sys

# 8 fake devices; optimisation level 0 compiles ~2.5x faster, and tests are dominated by compile time.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


import pytest  # noqa: E402  (after the environment above is set)


@pytest.fixture(scope="session")
def docstring_shards(tmp_path_factory):
    """A small pretokenized corpus through the real pipeline: 3000 standard-library docstrings as a JSONL
    file -> WordPiece (1000) -> shards of 64-token rows; shared by the end-to-end training tests."""
    import json  # pylint: disable=import-outside-toplevel

    from data_pipeline import pretokenize, sources  # pylint: disable=import-outside-toplevel

    out = str(tmp_path_factory.mktemp("data") / "shards")
    corpus = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for d in sources.docstring_documents(include_site_packages=False, max_documents=3000):
            f.write(json.dumps({"text": d}) + "\n")
    pretokenize.pretokenize(str(corpus), out, vocab_size=1000, seq_len=64, validation_fraction=0.05)
    return out
