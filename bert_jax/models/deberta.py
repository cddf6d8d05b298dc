"""DeBERTa-v3 (He et al., 2023): ELECTRA's replaced-token detection on the DeBERTa backbone, with
gradient-disentangled embedding sharing (GDES).

Both towers are our one encoder configured for disentangled attention (EncoderConfig.relative_attention).
Unlike ELECTRA, each tower has its own embedding block; only the word embeddings are shared, and only one way:
the discriminator embeds with stop_gradient(E_generator) + E_delta, where E_delta is its own `word` parameter
(zero at the start). The discriminator's loss thus moves E_delta only, and the generator's embeddings learn
from the MLM loss alone, which is the paper's remedy for the tug-of-war of ELECTRA's shared embeddings.

Parameter tree of `DebertaRtdForPretraining`:

    generator/{encoder/{embeddings, layers, rel_embeddings, rel_norm}, mlm_head}
    discriminator/{encoder/{embeddings (word = E_delta), layers, rel_embeddings, rel_norm}, head}

`DebertaGenerator` and `DebertaDiscriminator` are the towers stand-alone (the same paths, less the other
tower), for export: DebertaV2ForMaskedLM, and DebertaV2Model with E_generator + E_delta folded into its word
embeddings (`fold_shared_embeddings`), as the released v3 discriminators are.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bert_jax.models.config import EncoderConfig
from bert_jax.models.electra import DiscriminatorHead
from bert_jax.models.encoder import BertEncoder, split_dropout_key
from bert_jax.models.heads import MlmHead, check_bert_config


def check_deberta_towers(disc: EncoderConfig, gen: EncoderConfig) -> None:
    """Raises ValueError when the towers cannot share word embeddings or are not DeBERTa encoders."""
    for field in ("vocab_size", "hidden_size"):
        if getattr(disc, field) != getattr(gen, field):
            raise ValueError(f"DeBERTa-v3's generator shares the discriminator's word embeddings: its {field} "
                             f"{getattr(gen, field)} must equal {getattr(disc, field)} (objective.generator_fraction=1)")
    for name, cfg in (("discriminator (model)", disc), ("generator", gen)):
        if not cfg.relative_attention:
            raise ValueError(f"objective deberta_rtd needs model.relative_attention=True (the {name} has none)")
        check_bert_config(cfg)


class GeneratorTower(nnx.Module):
    """A DeBERTa MLM model: encoder + MLM head tied to its own word embeddings (E_generator)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.encoder = BertEncoder(cfg, rngs)
        self.mlm_head = MlmHead(cfg, rngs)

    def logits(self, h):
        return self.mlm_head(h, self.encoder.embeddings.word[...])


class DiscriminatorTower(nnx.Module):
    """A DeBERTa encoder whose `embeddings/word` is E_delta (zero at the start), and the per-token head."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.encoder = BertEncoder(cfg, rngs)
        word = self.encoder.embeddings.word
        word[...] = jnp.zeros_like(word[...])
        self.head = DiscriminatorHead(cfg, rngs)


def _encode(encoder: BertEncoder, input_ids, attention_mask, token_type_ids, dropout_key, segment_ids=None,
            position_ids=None, positions=None, word=None):
    """The encoder's forward with `word` (if given) in place of its own word embeddings."""
    emb_key, layers_key = split_dropout_key(dropout_key)
    x = encoder.embeddings(input_ids, token_type_ids, emb_key, position_ids, word=word)
    return encoder.run_layers(x, attention_mask, encoder.layer_keys(layers_key), segment_ids, positions)


class DebertaRtdForPretraining(nnx.Module):
    """Generator + discriminator with gradient-disentangled embedding sharing (see the module docstring).
    The same interface as ElectraForPretraining, so that objectives.ElectraObjective trains it."""

    def __init__(self, disc_cfg: EncoderConfig, gen_cfg: EncoderConfig, rngs: nnx.Rngs):
        check_deberta_towers(disc_cfg, gen_cfg)
        self.generator = GeneratorTower(gen_cfg, rngs)
        self.discriminator = DiscriminatorTower(disc_cfg, rngs)

    def discriminator_word(self) -> jax.Array:
        """stop_gradient(E_generator) + E_delta: the discriminator's word embeddings."""
        return (jax.lax.stop_gradient(self.generator.encoder.embeddings.word[...])
                + self.discriminator.encoder.embeddings.word[...])

    def generator_logits(self, input_ids, attention_mask, token_type_ids, positions, *, dropout_key=None,
                         segment_ids=None, position_ids=None):
        """Masked input_ids [B, S], positions [B, P] -> vocabulary logits [B, P, V] (float32)."""
        h = _encode(self.generator.encoder, input_ids, attention_mask, token_type_ids, dropout_key, segment_ids,
                    position_ids, positions)
        return self.generator.logits(h)

    def discriminator_logits(self, input_ids, attention_mask, token_type_ids, *, dropout_key=None,
                             segment_ids=None, position_ids=None):
        """Corrupted input_ids [B, S] -> "replaced" logits [B, S] (float32)."""
        h = _encode(self.discriminator.encoder, input_ids, attention_mask, token_type_ids, dropout_key,
                    segment_ids, position_ids, word=self.discriminator_word())
        return self.discriminator.head(h)


class DebertaGenerator(nnx.Module):
    """The generator stand-alone (paths generator/*): Hugging Face's DebertaV2ForMaskedLM."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.generator = GeneratorTower(cfg, rngs)

    def hidden_and_logits(self, input_ids, attention_mask, token_type_ids):
        """(last hidden states [B, S, H], vocabulary logits [B, S, V]), deterministic."""
        h = _encode(self.generator.encoder, input_ids, attention_mask, token_type_ids, None)
        return h, self.generator.logits(h)


class DebertaDiscriminator(nnx.Module):
    """The discriminator stand-alone (paths discriminator/*) with its word embeddings folded
    (`fold_shared_embeddings`): Hugging Face's DebertaV2Model, plus our RTD head."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.discriminator = DiscriminatorTower(cfg, rngs)

    def hidden_and_logits(self, input_ids, attention_mask, token_type_ids):
        """(last hidden states [B, S, H], "replaced" logits [B, S]), deterministic."""
        h = _encode(self.discriminator.encoder, input_ids, attention_mask, token_type_ids, None)
        return h, self.discriminator.head(h)


def fold_shared_embeddings(params: dict) -> dict:
    """A DeBERTa-v3 RTD params tree -> the same with the discriminator's word embeddings E_generator + E_delta
    (what it embeds with), for exporting the discriminator on its own. Other entries are shared, not copied."""
    disc = params["discriminator"]
    emb = disc["encoder"]["embeddings"]
    word = params["generator"]["encoder"]["embeddings"]["word"] + emb["word"]
    return {**params, "discriminator": {**disc, "encoder": {**disc["encoder"],
                                                            "embeddings": {**emb, "word": word}}}}
