"""Flax NNX models: the BERT encoder and its pretraining heads. Models return logits only."""

from bert_jax.models.config import EncoderConfig
from bert_jax.models.encoder import BertEncoder
from bert_jax.models.heads import BertForMaskedLM

__all__ = ["EncoderConfig", "BertEncoder", "BertForMaskedLM"]
