"""ELECTRA (Clark et al., 2020): a small MLM generator and a discriminator that share one embedding block.

Parameter tree of `ElectraForPretraining`:

    embeddings/{word, position, token_type, norm}           shared, at the embedding width E
    generator/{embeddings_project?, layers, mlm_head}       the generator tower (MLM head tied to `word`)
    discriminator/{embeddings_project?, layers, head}       the discriminator tower (one logit per token)

`embeddings_project` (E -> tower width) exists exactly where a tower's hidden size differs from E, as in
Hugging Face's ElectraModel. `ElectraGenerator` and `ElectraDiscriminator` are the same towers stand-alone
(embeddings + one tower, the same paths), for export checks against ElectraForMaskedLM/ElectraForPreTraining.
Models return logits only; sampling and losses live in bert_jax.objectives.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bert_jax.models.config import EncoderConfig
from bert_jax.models.encoder import Embeddings, LayerStack, split_dropout_key
from bert_jax.models.heads import MlmHead
from bert_jax.models.layers import Dense, gelu


def generator_config(disc: EncoderConfig, fraction: float, num_layers: int = -1) -> EncoderConfig:
    """The generator's config: `fraction` of the discriminator's width (hidden, heads, intermediate), the
    same embedding block (vocabulary, positions, token types, embedding width), `num_layers` layers (-1: as
    many as the discriminator). Heads are at least 1 and always divide the hidden size."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"objective.generator_fraction={fraction} must lie in (0, 1]")
    if num_layers == 0 or num_layers < -1:
        raise ValueError(f"objective.generator_layers={num_layers} must be >= 1 (or -1: the discriminator's)")
    hidden = max(1, round(disc.hidden_size * fraction))
    heads = max(1, min(hidden, round(disc.num_heads * fraction)))
    while hidden % heads:  # the nearest smaller head count that divides the width
        heads -= 1
    return dataclasses.replace(
        disc, hidden_size=hidden, num_heads=heads,
        intermediate_size=max(1, round(disc.intermediate_size * fraction)),
        num_layers=disc.num_layers if num_layers == -1 else num_layers,
        # The shared block is as wide as the discriminator's embeddings, whatever the generator's width.
        embedding_size=disc.embed_dim)


def check_towers(disc: EncoderConfig, gen: EncoderConfig) -> None:
    """Raises ValueError when the two towers cannot share one embedding block."""
    for field in ("vocab_size", "max_position_embeddings", "type_vocab_size", "embed_dim"):
        if getattr(disc, field) != getattr(gen, field):
            raise ValueError(f"generator and discriminator must share the embeddings: {field} "
                             f"{getattr(gen, field)} != {getattr(disc, field)}")


class DiscriminatorHead(nnx.Module):
    """Hugging Face's discriminator_predictions: dense H -> H, GELU, dense H -> 1: [..., H] -> [...]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = Dense(cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), cfg, rngs)
        self.prediction = Dense(cfg.hidden_size, 1, ("mlp", None), cfg, rngs)
        self.hidden_act = cfg.hidden_act

    def __call__(self, h: jax.Array) -> jax.Array:
        h = gelu(self.dense(h), self.hidden_act)
        return self.prediction(h)[..., 0].astype(jnp.float32)


class GeneratorTower(LayerStack):
    """The generator's layers and its MLM head (decoder tied to the shared word embeddings)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.mlm_head = MlmHead(cfg, rngs, hidden_act="gelu")  # Hugging Face's generator head: exact GELU


class DiscriminatorTower(LayerStack):
    """The discriminator's layers and its per-token replaced/original head."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.head = DiscriminatorHead(cfg, rngs)


def _encode(embeddings: Embeddings, tower: LayerStack, input_ids, attention_mask, token_type_ids, dropout_key,
            segment_ids=None, position_ids=None, positions=None):
    emb_key, layers_key = split_dropout_key(dropout_key)
    x = embeddings(input_ids, token_type_ids, emb_key, position_ids)
    return tower.run_layers(x, attention_mask, tower.layer_keys(layers_key), segment_ids, positions)


class ElectraForPretraining(nnx.Module):
    """Generator + discriminator over one shared embedding block (see the module docstring for the tree)."""

    def __init__(self, disc_cfg: EncoderConfig, gen_cfg: EncoderConfig, rngs: nnx.Rngs):
        check_towers(disc_cfg, gen_cfg)
        self.embeddings = Embeddings(disc_cfg, rngs)
        self.generator = GeneratorTower(gen_cfg, rngs)
        self.discriminator = DiscriminatorTower(disc_cfg, rngs)

    def generator_logits(self, input_ids, attention_mask, token_type_ids, positions, *, dropout_key=None,
                         segment_ids=None, position_ids=None):
        """Masked input_ids [B, S], positions [B, P] -> vocabulary logits [B, P, V] (float32).
        segment_ids / position_ids [B, S] (optional): packed documents, see encoder.document_features."""
        h = _encode(self.embeddings, self.generator, input_ids, attention_mask, token_type_ids, dropout_key,
                    segment_ids, position_ids, positions)
        return self.generator.mlm_head(h, self.embeddings.word[...])

    def discriminator_logits(self, input_ids, attention_mask, token_type_ids, *, dropout_key=None,
                             segment_ids=None, position_ids=None):
        """Corrupted input_ids [B, S] -> "replaced" logits [B, S] (float32)."""
        h = _encode(self.embeddings, self.discriminator, input_ids, attention_mask, token_type_ids, dropout_key,
                    segment_ids, position_ids)
        return self.discriminator.head(h)


class ElectraGenerator(nnx.Module):
    """Stand-alone generator (embeddings + generator tower): Hugging Face's ElectraForMaskedLM."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, rngs)
        self.generator = GeneratorTower(cfg, rngs)

    def hidden_and_logits(self, input_ids, attention_mask, token_type_ids):
        """(last hidden states [B, S, H], vocabulary logits [B, S, V]), deterministic."""
        h = _encode(self.embeddings, self.generator, input_ids, attention_mask, token_type_ids, None)
        return h, self.generator.mlm_head(h, self.embeddings.word[...])


class ElectraDiscriminator(nnx.Module):
    """Stand-alone discriminator (embeddings + discriminator tower): Hugging Face's ElectraForPreTraining."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, rngs)
        self.discriminator = DiscriminatorTower(cfg, rngs)

    def hidden_and_logits(self, input_ids, attention_mask, token_type_ids):
        """(last hidden states [B, S, H], "replaced" logits [B, S]), deterministic."""
        h = _encode(self.embeddings, self.discriminator, input_ids, attention_mask, token_type_ids, None)
        return h, self.discriminator.head(h)


def discriminator_as_mlm(electra_params: dict, mlm_head: dict) -> dict:
    """ElectraForPretraining parameters -> BertForMaskedLM's: the shared embeddings and the discriminator's
    layers become the encoder, `mlm_head` (a fresh one) goes on top; the generator and the discriminator's
    head are left out. Continued MLM pretraining from a discriminator (`init_from` an ELECTRA workdir)."""
    disc = electra_params["discriminator"]
    encoder = {"embeddings": electra_params["embeddings"], "layers": disc["layers"]}
    if "embeddings_project" in disc:
        raise ValueError("the discriminator projects its embeddings (embedding_size != hidden_size); BERT's "
                         "MLM model has no such projection")
    return {"encoder": encoder, "mlm_head": mlm_head}
