"""The model's typed configuration: a frozen dataclass built from the `model` config section."""

import dataclasses

import jax.numpy as jnp


KERNELS = ("hash_dropout", "layernorm", "gelu", "adamw")


def parse_kernels(value: str) -> tuple[str, ...]:
    """model.kernels' string ("layernorm+gelu", commas also accepted; "" or "none": no kernels) -> names."""
    names = [k.strip() for k in str(value).replace(",", "+").split("+")]
    return tuple(sorted({k for k in names if k and k != "none"}))


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes and settings of a BERT encoder; field names follow Hugging Face's BertConfig where they can."""

    vocab_size: int
    hidden_size: int = 768
    # Width of the embedding block (ELECTRA's `embedding_size`); None: the hidden size. Where it differs, a
    # linear projection maps the embeddings to the hidden size (ELECTRA only; BertForMaskedLM refuses it).
    embedding_size: int | None = None
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    dtype: str = "float32"  # activation/compute dtype; parameters are always float32
    remat: str = "none"  # none | full | dots
    # einsum: our two batched matmuls (attention dropout supported); dot_product: jax.nn.dot_product_attention
    # as XLA writes it; cudnn: the same through cuDNN's fused kernel (GPU, bfloat16, attention_dropout 0 only).
    # Neither has dropout: dot_product runs where attention dropout is off (evaluation, or attention_dropout=0),
    # einsum elsewhere; cudnn refuses a dropout rate rather than silently training on the einsum path.
    attention: str = "einsum"
    # predictions: where only some positions' outputs are wanted (the MLM heads), the last layer runs its
    # queries, output projection and MLP at those positions only (same values, fewer FLOPs); all: everywhere.
    last_layer: str = "predictions"
    # Layers per iteration of the scan over the stack (lax.scan's unroll): 1 is a loop (compile time does not
    # grow with depth); >= num_layers unrolls it, so XLA keeps each layer's saved activations as their own
    # buffers instead of copying them in and out of stacked [L, ...] ones.
    scan_unroll: int = 1
    # The MLP's activation (and the heads' where Hugging Face uses the config's): gelu is the exact (erf) GELU
    # of Hugging Face's BertConfig; gelu_tanh its tanh approximation, which Google's original BERT and ELECTRA
    # code computes (Hugging Face's gelu_new / gelu_pytorch_tanh).
    hidden_act: str = "gelu"
    # Pallas kernels for GPU training (bert_jax/kernels; empty: the plain XLA path). Any of: hash_dropout
    # (every dropout mask from a counter-based hash instead of threefry bits, in XLA), layernorm (residual +
    # dropout + LayerNorm fused, forward and backward), gelu (the MLP's bias + GELU fused), adamw (the
    # optimizer's update in one kernel over the flattened parameters). The kernels draw hash dropout masks.
    kernels: tuple[str, ...] = ()
    # RoBERTa's learned positions start after the padding id: position i of a sequence reads row
    # position_offset + i of the table (Hugging Face's padding_idx + 1 = 2), and padding tokens read row
    # position_offset - 1. max_position_embeddings counts every row (RoBERTa: 514 for 512 tokens). 0: BERT.
    position_offset: int = 0
    # DeBERTa (He et al., 2021), with Hugging Face's DebertaV2Config names: disentangled attention adds to each
    # query-key score the content-to-position (c2p) and position-to-content (p2c) terms over the relative
    # distance, bucketed logarithmically beyond position_buckets / 2 (<= 0: no buckets, clipped at
    # max_relative_positions; -1 there: max_position_embeddings). The relative position embeddings (2 x the
    # span) and their LayerNorm (norm_rel_ebd "layer_norm") are shared by all layers; the layers' own query and
    # key projections map them (share_att_key, as every released v2/v3 model). The scores are scaled by
    # 1/sqrt(head_dim x the number of terms). position_biased_input False: no absolute positions at the input.
    relative_attention: bool = False
    position_buckets: int = -1
    max_relative_positions: int = -1
    pos_att_type: str = "p2c|c2p"
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    position_biased_input: bool = True

    def __post_init__(self):
        object.__setattr__(self, "kernels", tuple(self.kernels))  # a list when read back from JSON
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if self.embedding_size is not None and self.embedding_size < 1:
            raise ValueError(f"model.embedding_size={self.embedding_size} must be >= 1 (or -1: the hidden size)")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"model.remat={self.remat!r}: choose none, full or dots")
        if self.attention not in ("einsum", "dot_product", "cudnn"):
            raise ValueError(f"model.attention={self.attention!r}: choose einsum, dot_product or cudnn")
        if self.last_layer not in ("predictions", "all"):
            raise ValueError(f"model.last_layer={self.last_layer!r}: choose predictions or all")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype={self.dtype!r}: choose float32 or bfloat16")
        if self.hidden_act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"model.hidden_act={self.hidden_act!r}: choose gelu or gelu_tanh")
        unknown = sorted(set(self.kernels) - set(KERNELS))
        if unknown:
            raise ValueError(f"model.kernels: unknown {unknown}; choose from {list(KERNELS)} joined by '+'")
        if not 0 <= self.position_offset < self.max_position_embeddings:
            raise ValueError(f"model.position_offset={self.position_offset} must be >= 0 and below "
                             f"model.max_position_embeddings={self.max_position_embeddings}")
        if self.scan_unroll < 1:
            raise ValueError(f"model.scan_unroll={self.scan_unroll} must be >= 1")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ValueError(f"model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN's fused attention "
                             f"has no float32 kernel), not {self.dtype!r}")
        if self.attention == "cudnn" and self.attention_dropout > 0:
            raise ValueError(f"model.attention='cudnn' has no attention dropout: set model.attention_dropout=0 "
                             f"(not {self.attention_dropout}), or training would run the einsum path")
        self._check_relative()

    def _check_relative(self):
        """The DeBERTa fields: what Hugging Face's DebertaV2Model computes and we do too."""
        bad = set(self.pos_att_types) - {"c2p", "p2c"}
        if bad:
            raise ValueError(f"model.pos_att_type={self.pos_att_type!r}: terms are c2p and/or p2c joined by '|'")
        if self.norm_rel_ebd not in ("layer_norm", "none"):
            raise ValueError(f"model.norm_rel_ebd={self.norm_rel_ebd!r}: choose layer_norm or none")
        if self.relative_attention and not self.share_att_key:
            raise ValueError("model.share_att_key=False (separate position projections) is not supported: "
                             "every released DeBERTa-v2/v3 model shares them")
        if self.type_vocab_size < 0:
            raise ValueError(f"model.type_vocab_size={self.type_vocab_size} must be >= 0 (0: no token types)")

    @classmethod
    def from_section(cls, m, vocab_size: int) -> "EncoderConfig":
        """From the `model` section of a config (configs/common.py's keys; embedding_size -1: the hidden size)."""
        return cls(
            vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
            embedding_size=None if m.embedding_size == -1 else m.embedding_size,
            intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings,
            type_vocab_size=m.type_vocab_size, hidden_dropout=m.hidden_dropout,
            attention_dropout=m.attention_dropout, layer_norm_eps=m.layer_norm_eps,
            initializer_range=m.initializer_range, dtype=m.dtype, remat=m.remat, attention=m.attention,
            last_layer=m.last_layer, scan_unroll=m.scan_unroll, hidden_act=m.hidden_act,
            kernels=parse_kernels(m.get("kernels", "")), position_offset=m.get("position_offset", 0),
            **{f: m.get(f, default) for f, default in _RELATIVE_DEFAULTS.items()})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """The longest sequence the positions allow (max_position_embeddings less RoBERTa's offset)."""
        return self.max_position_embeddings - self.position_offset

    @property
    def embed_dim(self) -> int:
        """The width of the embedding block."""
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @property
    def pos_att_types(self) -> tuple[str, ...]:
        """The disentangled terms, e.g. ("p2c", "c2p"); () without relative attention."""
        if not self.relative_attention:
            return ()
        return tuple(t.strip() for t in self.pos_att_type.lower().split("|") if t.strip())

    @property
    def relative_span(self) -> int:
        """Half the number of relative position embeddings: the bucket count, else max_relative_positions."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions > 0 else self.max_position_embeddings

    @property
    def max_relative(self) -> int:
        """max_relative_positions, resolved (-1: max_position_embeddings)."""
        return self.max_relative_positions if self.max_relative_positions > 0 else self.max_position_embeddings

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


# The DeBERTa fields of the `model` section and their defaults (a section written before them reads as BERT).
_RELATIVE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EncoderConfig)
                      if f.name in ("relative_attention", "position_buckets", "max_relative_positions",
                                    "pos_att_type", "share_att_key", "norm_rel_ebd", "position_biased_input")}
