"""The BERT encoder: embeddings (word + position + token type, LayerNorm) and a stack of layers.

The layers are created stacked (one parameter array with a leading `layers` axis, via nnx.vmap) and applied
with nnx.scan: compile time does not grow with depth, and remat is one switch on the scanned body.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bert_jax.models.config import EncoderConfig
from bert_jax.models.layers import EncoderLayer, LayerNorm, dropout, param

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Embeddings(nnx.Module):
    """Word, position and token-type embeddings, summed, then LayerNorm and dropout."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(cfg.initializer_range)
        h = cfg.hidden_size
        self.word = param(rngs, init, (cfg.vocab_size, h), ("vocab", "embed"))
        self.position = param(rngs, init, (cfg.max_position_embeddings, h), (None, "embed"))
        self.token_type = param(rngs, init, (cfg.type_vocab_size, h), (None, "embed"))
        self.norm = LayerNorm(h, cfg, rngs)
        self.cfg = cfg

    def __call__(self, input_ids, token_type_ids, key):
        seq_len = input_ids.shape[1]
        x = (jnp.take(self.word[...], input_ids, axis=0)
             + self.position[...][None, :seq_len]
             + jnp.take(self.token_type[...], token_type_ids, axis=0))
        x = self.norm(x.astype(self.cfg.compute_dtype))
        return dropout(x, self.cfg.hidden_dropout, key)


class BertEncoder(nnx.Module):
    """input_ids, attention_mask, token_type_ids [B, S] int -> hidden states [B, S, hidden]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return EncoderLayer(cfg, rngs)

        self.layers = make_layers(rngs)
        self.cfg = cfg

    def __call__(self, input_ids, attention_mask, token_type_ids, *, dropout_key=None):
        """Returns [B, S, hidden]; `dropout_key` None runs deterministically (evaluation)."""
        cfg = self.cfg
        if dropout_key is not None:
            emb_key, layers_key = jax.random.split(dropout_key)
            layer_keys = jax.random.split(layers_key, cfg.num_layers)
        else:
            emb_key, layer_keys = None, None
        x = self.embeddings(input_ids, token_type_ids, emb_key)
        # Additive attention bias: 0 where a key may be attended, a large negative number at padding.
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
        return self.run_layers(x, bias, layer_keys)

    def run_layers(self, x, bias, layer_keys):
        deterministic = layer_keys is None

        def body(layer, h, key):
            return layer(h, bias, None if deterministic else key)

        if self.cfg.remat != "none":
            body = nnx.remat(body, policy=_REMAT_POLICIES[self.cfg.remat])
        scan = nnx.scan(
            body,
            in_axes=(0, nnx.Carry, None if deterministic else 0),
            out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        return scan(self.layers, x, layer_keys)
