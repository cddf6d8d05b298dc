"""Test support shared by several test files."""

import os

import numpy as np

from data_pipeline import records
from data_pipeline.manifest import Shard
from data_pipeline.shards import shard_name


def write_shards(rows: np.ndarray, split: str, out_dir: str, num_shards: int, dtype: str, pad_id: int) -> list[Shard]:
    """An in-memory array of rows [n, seq_len] as `num_shards` contiguous shards in pretokenize's format (for
    tests that need a precise layout of rows); their manifest entries."""
    shards = []
    for i in range(num_shards):
        lo, hi = i * len(rows) // num_shards, (i + 1) * len(rows) // num_shards
        name = shard_name(split, i, num_shards)
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(records.frame_records([records.serialize_row(r, dtype) for r in rows[lo:hi]]))
        shards.append(Shard(file=name, rows=int(hi - lo), tokens=int(np.count_nonzero(rows[lo:hi] != pad_id)),
                            sha256=records.file_sha256(path)))
    return shards


def write_random_checkpoint(workdir: str, tok) -> None:
    """A checkpoint (step 1) of a random, perturbed small BertForMaskedLM on the tokenizer `tok` in `workdir`,
    with the workdir's copy of a dataset manifest naming `tok`'s special ids: enough to export."""
    # Imported here: the data tests that use this module's other helpers stay free of jax.
    import dataclasses  # pylint: disable=import-outside-toplevel

    from flax import nnx  # pylint: disable=import-outside-toplevel

    from bert_jax import hf_import  # pylint: disable=import-outside-toplevel
    from bert_jax.checkpointing import Checkpointer  # pylint: disable=import-outside-toplevel
    from bert_jax.models import BertForMaskedLM, EncoderConfig  # pylint: disable=import-outside-toplevel
    from bert_jax.workdir import CheckpointMeta  # pylint: disable=import-outside-toplevel
    from data_pipeline import manifest as manifest_lib  # pylint: disable=import-outside-toplevel

    cfg = EncoderConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    params = hf_import.init_params(lambda: BertForMaskedLM(cfg, nnx.Rngs(1)))
    rng = np.random.default_rng(0)

    def perturb(tree):
        return {k: perturb(v) if isinstance(v, dict) else (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
                for k, v in tree.items()}

    ids = manifest_lib.SpecialIds(pad=tok.pad_id, unk=tok.unk_id, cls=tok.cls_id, sep=tok.sep_id, mask=tok.mask_id)
    manifest = dataclasses.replace(manifest_lib.synthetic(64, tok.vocab_size, ids), lowercase=tok.lowercase,
                                   vocab_hash=tok.vocab_hash)
    manifest_lib.write_json(os.path.join(workdir, "data_manifest.json"), manifest.to_json())
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(1, {"params": perturb(params), "step": np.int32(1)}, CheckpointMeta(step=1, objective="mlm", model=cfg))
    ckpt.close()


def readme_commands(heading: str) -> list[tuple[str, list[str]]]:
    """The `python -m MODULE ARGS` commands of the first ```bash block under README's `heading` line, as written
    (continuation lines joined, comments dropped): [(module, argv)], to run with MODULE's main(argv)."""
    import re  # pylint: disable=import-outside-toplevel
    import shlex  # pylint: disable=import-outside-toplevel

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index(heading + "\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["python", "-m"]:
            commands.append((words[2], words[3:]))
    return commands


def readme_python(heading: str) -> str:
    """The first ```python block under README's `heading` line."""
    import re  # pylint: disable=import-outside-toplevel

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return re.search(r"```python\n(.*?)```", readme[readme.index(heading + "\n"):], re.S).group(1)
