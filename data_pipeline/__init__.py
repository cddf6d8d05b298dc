"""bert_jax data pipeline: raw text -> tokens -> packed rows -> TFRecord shards + manifest -> tf.data batches.

Modules (import them directly; this package module stays light so that importing it never pulls in
TensorFlow or the tokenizers library):

- `sources`            raw text by name: text/JSONL files and globs, TFDS datasets, the docstring corpus
- `docstrings`         the installed-docstring corpus (extraction, cache) and the task texts it holds out
- `splitting`          train/validation assignment by a stable hash of the text
- `tokenization`       the `Tokenizer` interface: WordPiece and SentencePiece, train or load; vocab hash
- `tokenizer_backends` the `tokenizers` / `sentencepiece` machinery behind it (imported late)
- `packing`            pure numpy: documents -> fixed-length `[CLS] ... [SEP]` rows
- `records`            the shard record format (TFRecord framing, tf.train.Example), without TensorFlow
- `manifest`           the dataset manifest: the typed contract between pretokenize and every reader
- `encoding`           parallel, order-preserving tokenization for pretokenize
- `shards`             parts, final shards and progress.json while a dataset is built
- `pretokenize`        CLI: sources -> tokenizer + shards + manifest.json
- `dataset`            tf.data reader over the shards (the only place TensorFlow is used for reading)
- `validate`           CLI: check shards against the manifest
- `tasks`              CLI: downstream task files (docstring_origin)

Import direction inside the package is one-way (no cycles). This package never imports jax, flax or torch.
"""

from data_pipeline.errors import DataError

__all__ = ["DataError"]
