"""bert_jax data pipeline: raw text -> WordPiece tokens -> packed rows -> TFRecord shards -> tf.data batches.

Modules (import them directly; this package module stays light so that importing it never pulls in
TensorFlow or the tokenizers library):

- `sources`       raw text iterators: text/JSONL files and globs, the installed-docstring corpus
- `tokenization`  train or load a WordPiece vocabulary; special-token ids; vocab hash
- `packing`       pure numpy: documents -> fixed-length `[CLS] ... [SEP]` rows
- `pretokenize`   CLI: sources -> tokenizer + shards + manifest.json
- `dataset`       tf.data reader over the shards (the only place TensorFlow is used for reading)
- `validate`      CLI: check shards against the manifest

This package never imports jax, flax or torch.
"""

from data_pipeline.errors import DataError

__all__ = ["DataError"]
