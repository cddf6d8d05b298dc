"""Pretraining heads. The MLM head projects onto the vocabulary only at the chosen positions."""

import jax
import jax.numpy as jnp
from flax import nnx

from bert_jax.models.config import EncoderConfig
from bert_jax.models.encoder import BertEncoder
from bert_jax.models.layers import Dense, LayerNorm, add_bias, gelu, matmul, param


class MlmHead(nnx.Module):
    """BERT's MLM head: dense + GELU + LayerNorm, then the decoder tied to the word embeddings, plus a bias.
    The dense maps hidden -> embedding width (equal for BERT; ELECTRA's generator_predictions where not).
    `hidden_act`: the GELU's form, by default the config's (BERT's head); ELECTRA's generator head is always
    the exact one, as in Hugging Face."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs, hidden_act: str | None = None):
        self.transform = Dense(cfg.hidden_size, cfg.embed_dim, ("embed", "mlp"), cfg, rngs)
        self.norm = LayerNorm(cfg.embed_dim, cfg, rngs, name="mlp")
        self.bias = param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",))
        self.hidden_act = hidden_act or cfg.hidden_act

    def __call__(self, h: jax.Array, word_embeddings: jax.Array) -> jax.Array:
        """h [..., H], word_embeddings [V, E] -> logits [..., V] in float32."""
        h = self.norm(gelu(self.transform(h), self.hidden_act))
        logits = matmul(h, word_embeddings.astype(h.dtype).T)
        return add_bias(logits.astype(jnp.float32), self.bias[...])


def check_bert_config(cfg: EncoderConfig) -> None:
    """Raises ValueError for what BERT cannot be: an embedding width other than the hidden size (Hugging
    Face's BertConfig has no embedding_size, so such a model could not be exported)."""
    if cfg.embed_dim != cfg.hidden_size:
        raise ValueError(f"model.embedding_size={cfg.embedding_size} differs from model.hidden_size="
                         f"{cfg.hidden_size}: BERT (objective mlm) needs them equal (or -1)")


class BertForMaskedLM(nnx.Module):
    """Encoder + MLM head. Returns the vocabulary logits at `masked_positions` only: [B, P, V]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        check_bert_config(cfg)
        self.encoder = BertEncoder(cfg, rngs)
        self.mlm_head = MlmHead(cfg, rngs)
        self.cfg = cfg

    def __call__(self, input_ids, attention_mask, token_type_ids, masked_positions, *, dropout_key=None,
                 segment_ids=None, position_ids=None):
        h = self.encoder(input_ids, attention_mask, token_type_ids, dropout_key=dropout_key,
                         segment_ids=segment_ids, position_ids=position_ids, positions=masked_positions)
        return self.mlm_head(h, self.encoder.embeddings.word[...])

    def hidden_and_logits(self, input_ids, attention_mask, token_type_ids, *, segment_ids=None, position_ids=None):
        """(last hidden states [B, S, H], logits [B, S, V]), deterministic: what an HF export must match."""
        h = self.encoder(input_ids, attention_mask, token_type_ids, segment_ids=segment_ids,
                         position_ids=position_ids)
        return h, self.mlm_head(h, self.encoder.embeddings.word[...])
