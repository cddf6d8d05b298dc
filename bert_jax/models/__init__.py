"""Flax NNX models: the BERT encoder and its pretraining heads, and ELECTRA. Models return logits only.

`MODEL_CLASSES` is the one registry from a model kind to its class: the kinds a checkpoint exports to Hugging
Face (`hf_mapping.MODELS` has one table per kind), run on their own by conversion and the benchmark.
"""

from bert_jax.models.config import EncoderConfig
from bert_jax.models.deberta import DebertaDiscriminator, DebertaGenerator, DebertaRtdForPretraining
from bert_jax.models.electra import ElectraDiscriminator, ElectraForPretraining, ElectraGenerator, generator_config
from bert_jax.models.encoder import BertEncoder
from bert_jax.models.heads import BertForMaskedLM

# kind -> class (constructed as cls(cfg, rngs)): BERT's MLM model, and ELECTRA's towers each with the shared
# embeddings (their parameter paths are those of the pretraining tree, less the other tower).
MODEL_CLASSES = {"mlm": BertForMaskedLM, "discriminator": ElectraDiscriminator, "generator": ElectraGenerator,
                 # RoBERTa: an MLM run whose positions start after the padding id (EncoderConfig.position_offset).
                 "roberta_mlm": BertForMaskedLM,
                 # DeBERTa: an MLM run is BertForMaskedLM's tree on a relative-attention encoder.
                 "deberta_mlm": BertForMaskedLM, "deberta_generator": DebertaGenerator,
                 "deberta_discriminator": DebertaDiscriminator}

__all__ = ["EncoderConfig", "BertEncoder", "BertForMaskedLM", "ElectraForPretraining", "ElectraGenerator",
           "ElectraDiscriminator", "generator_config", "MODEL_CLASSES",
           "DebertaRtdForPretraining", "DebertaGenerator", "DebertaDiscriminator"]
