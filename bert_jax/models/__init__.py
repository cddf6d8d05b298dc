"""Flax NNX models: the BERT encoder and its pretraining heads, and ELECTRA. Models return logits only."""

from bert_jax.models.config import EncoderConfig
from bert_jax.models.electra import ElectraDiscriminator, ElectraForPretraining, ElectraGenerator, generator_config
from bert_jax.models.encoder import BertEncoder
from bert_jax.models.heads import BertForMaskedLM

__all__ = ["EncoderConfig", "BertEncoder", "BertForMaskedLM", "ElectraForPretraining", "ElectraGenerator",
           "ElectraDiscriminator", "generator_config"]
