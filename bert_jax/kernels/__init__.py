"""Pallas kernels for GPU training, each behind `model.kernels` (docs/BENCHMARKS.md has their A/Bs).

hash_dropout.py  dropout masks from a counter-based hash (XLA and the kernels draw the same bits)
layernorm.py     residual + dropout + LayerNorm, one pass forward, one backward
gelu.py          bias + GELU (+ dropout) on the MLP's first matmul output
adamw.py         the AdamW update with weight decay and clipping over the flattened parameters
common.py        tiles, the seed block, pallas_call defaults, sharding (shard_map over the batch axes)

On a GPU they compile through Triton; elsewhere they run in Pallas' interpret mode (the CPU tests).
"""
