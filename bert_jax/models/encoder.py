"""The BERT encoder: embeddings (word + position + token type, LayerNorm) and a stack of layers.

`Embeddings` and `LayerStack` (an optional embedding projection + the layers) are separate modules so that
ELECTRA's two towers can share one embedding block; `BertEncoder` is both in one module, which keeps
BERT's parameter paths (`encoder/embeddings/...`, `encoder/layers/...`) that bert_jax/models/hf_mapping.py names.

The layers are created stacked (one parameter array with a leading `layers` axis, via nnx.vmap) and applied
with nnx.scan: compile time does not grow with depth, and remat is one switch on the scanned body.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bert_jax.models.config import EncoderConfig
from bert_jax.sharding import constrain_activations
from bert_jax.models.layers import Dense, EncoderLayer, LayerNorm, dropout_for, gather_positions, param
from bert_jax.models.layers import RelativeInputs, relative_inputs

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Embeddings(nnx.Module):
    """Word, position and token-type embeddings, summed, then LayerNorm and dropout: [B, S] -> [B, S, E]
    with E = cfg.embed_dim (the hidden size unless `embedding_size` says otherwise)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(cfg.initializer_range)
        h = cfg.embed_dim
        self.word = param(rngs, init, (cfg.vocab_size, h), ("vocab", "embed"))
        # DeBERTa may have neither (position_biased_input False, type_vocab_size 0).
        self.position = (param(rngs, init, (cfg.max_position_embeddings, h), (None, "embed"))
                         if cfg.position_biased_input else None)
        self.token_type = (param(rngs, init, (cfg.type_vocab_size, h), (None, "embed"))
                           if cfg.type_vocab_size > 0 else None)
        self.norm = LayerNorm(h, cfg, rngs)
        self.cfg = cfg

    def __call__(self, input_ids, token_type_ids, key, position_ids=None, word=None):
        """position_ids [B, S] (e.g. restarting at each packed document); None: 0..S-1 in every row. Both read
        the table from row `cfg.position_offset` on (RoBERTa's). `word` [V, E]: the word embeddings to use in
        place of our own (DeBERTa-v3's shared embeddings)."""
        seq_len, offset = input_ids.shape[1], self.cfg.position_offset
        x = jnp.take(self.word[...] if word is None else word, input_ids, axis=0)
        if self.position is not None:
            x = x + (self.position[...][None, offset:offset + seq_len] if position_ids is None
                     else jnp.take(self.position[...], position_ids + offset, axis=0))
        if self.token_type is not None:
            x = x + jnp.take(self.token_type[...], token_type_ids, axis=0)
        x = self.norm(x.astype(self.cfg.compute_dtype))
        return dropout_for(self.cfg)(x, self.cfg.hidden_dropout, key)


class LayerStack(nnx.Module):
    """Embedded inputs [B, S, E] -> hidden states [B, S, H]: a projection E -> H where the widths differ
    (as Hugging Face's `embeddings_project`), then the stacked layers."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        # ("embed", "mlp") rather than ("embed", "embed"): one mesh axis cannot shard two dimensions.
        self.embeddings_project = (Dense(cfg.embed_dim, cfg.hidden_size, ("embed", "mlp"), cfg, rngs)
                                   if cfg.embed_dim != cfg.hidden_size else None)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return EncoderLayer(cfg, rngs)

        self.layers = make_layers(rngs)
        self.cfg = cfg
        # DeBERTa: the relative position embeddings and their LayerNorm, shared by all layers (outside the scan).
        rel_embeddings = rel_norm = None
        if cfg.relative_attention:
            init = nnx.initializers.truncated_normal(cfg.initializer_range)
            rel_embeddings = param(rngs, init, (2 * cfg.relative_span, cfg.hidden_size), (None, "embed"))
            if cfg.norm_rel_ebd == "layer_norm":
                rel_norm = LayerNorm(cfg.hidden_size, cfg, rngs)
        self.rel_embeddings, self.rel_norm = nnx.data(rel_embeddings), nnx.data(rel_norm)

    def relative(self, seq_len: int, positions=None) -> RelativeInputs | None:
        """DeBERTa's relative inputs for queries at every index (positions None) or at `positions` [B, P];
        None without relative attention."""
        if self.rel_embeddings is None:
            return None
        emb = self.rel_embeddings[...].astype(self.cfg.compute_dtype)
        if self.rel_norm is not None:
            emb = self.rel_norm(emb)
        query_index = jnp.arange(seq_len, dtype=jnp.int32)[None] if positions is None else positions
        return relative_inputs(self.cfg, emb, query_index.astype(jnp.int32), seq_len)

    def layer_keys(self, layers_key):
        return None if layers_key is None else jax.random.split(layers_key, self.cfg.num_layers)

    def run_layers(self, x, attention_mask, layer_keys, segment_ids=None, positions=None):
        """x [B, S, E], attention_mask [B, S], layer_keys [num_layers, 2] or None -> [B, S, H].
        segment_ids [B, S] (optional): a token attends only to tokens of its own segment (packed documents).

        positions [B, P] (optional): return the hidden states at these positions only, [B, P, H]. Where the
        config's `last_layer` is "predictions", the last layer then runs its queries, output projection and
        MLP at those P rows only (its keys and values still cover every position): the same values, and
        for MLM at P = 15% of S it drops ~70% of that layer's FLOPs. "all" runs it everywhere and gathers."""
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)
        bias = attention_bias(attention_mask, segment_ids)
        rel = self.relative(x.shape[1])
        if positions is None or self.cfg.last_layer == "all":
            h = self._scan(self.layers, x, bias, layer_keys, rel)
            return h if positions is None else gather_positions(h, positions)
        first, last = split_last_layer(self.layers)
        if self.cfg.num_layers > 1:
            x = self._scan(first, x, bias, None if layer_keys is None else layer_keys[:-1], rel)
        return last(x, bias, None if layer_keys is None else layer_keys[-1], positions,
                    self.relative(x.shape[1], positions))

    def _scan(self, layers, x, bias, layer_keys, rel=None):
        """The stacked `layers` applied in turn (nnx.scan, remat per the config): [B, S, H] -> [B, S, H]."""
        deterministic = layer_keys is None

        def body(layer, h, key):
            return constrain_activations(layer(h, bias, None if deterministic else key, rel=rel))

        if self.cfg.remat != "none":
            body = nnx.remat(body, policy=_REMAT_POLICIES[self.cfg.remat])
        length = jax.tree.leaves(nnx.state(layers))[0].shape[0]
        scan = nnx.scan(
            body,
            in_axes=(0, nnx.Carry, None if deterministic else 0),
            out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: "layers"},
            unroll=min(self.cfg.scan_unroll, length),
        )
        return scan(layers, x, layer_keys)


def split_last_layer(layers: EncoderLayer) -> tuple[EncoderLayer, EncoderLayer]:
    """Stacked layers (leading `layers` axis on every parameter) -> (the stack of all but the last one, the
    last one as a plain layer). Views of the same parameters: gradients flow back into the stack."""
    graphdef, state = nnx.split(layers)
    return (nnx.merge(graphdef, jax.tree.map(lambda a: a[:-1], state)),
            nnx.merge(graphdef, jax.tree.map(lambda a: a[-1], state)))


def attention_bias(attention_mask, segment_ids=None):
    """Additive attention bias, 0 where a key may be attended and -1e9 elsewhere (padding; with segment ids,
    also every key of another segment): [B, 1, 1, S] without segment ids, [B, 1, S, S] with them."""
    allowed = attention_mask[:, None, None, :] > 0
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jnp.where(allowed, 0.0, -1e9).astype(jnp.float32)


def document_features(input_ids, cls_id: int):
    """Packed rows [B, S] (data_pipeline.packing: every document piece is `[CLS] ... [SEP]`) -> (segment ids,
    positions), both [B, S] int32: segment = number of [CLS] so far, position = index - start of the segment.
    Derived on device (a cumsum and a cummax): no host work and no extra bytes per batch."""
    is_cls = input_ids == cls_id
    segments = jnp.cumsum(is_cls, axis=1, dtype=jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    start = jax.lax.cummax(jnp.where(is_cls, idx, 0), axis=1)
    return segments, idx - start


def padded_positions(attention_mask):
    """[B, S] -> the positions RoBERTa gives (before its offset): the real tokens count 0, 1, ... and padding is
    -1 (Hugging Face's `create_position_ids_from_input_ids`, which reads the padding row padding_idx there)."""
    mask = (attention_mask > 0).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


def split_dropout_key(dropout_key):
    """-> (embeddings key, layers key), both None when `dropout_key` is None (evaluation)."""
    if dropout_key is None:
        return None, None
    emb_key, layers_key = jax.random.split(dropout_key)
    return emb_key, layers_key


class BertEncoder(LayerStack):
    """input_ids, attention_mask, token_type_ids [B, S] int -> hidden states [B, S, hidden]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, rngs)  # created first: the parameter initialisation order of BERT
        super().__init__(cfg, rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids, *, dropout_key=None, segment_ids=None,
                 position_ids=None, positions=None):
        """Returns [B, S, hidden]; `dropout_key` None runs deterministically (evaluation). segment_ids and
        position_ids [B, S] (optional) keep packed documents apart (see `document_features`). positions
        [B, P] (optional): only the hidden states there, [B, P, hidden] (see `LayerStack.run_layers`)."""
        emb_key, layers_key = split_dropout_key(dropout_key)
        if self.cfg.position_offset and position_ids is None:
            position_ids = padded_positions(attention_mask)
        x = self.embeddings(input_ids, token_type_ids, emb_key, position_ids)
        return self.run_layers(x, attention_mask, self.layer_keys(layers_key), segment_ids, positions)
