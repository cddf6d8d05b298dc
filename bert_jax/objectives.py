"""Pretraining objectives: corruption of the batch, the model call and the losses.

An objective returns its loss already divided by denominators computed on the WHOLE batch (`normalizers`),
so that the loss of a batch is the sum of the losses of its micro-batches: gradient accumulation and
data-parallel averaging are then exact. Metrics come back as (numerator, denominator) sums.
"""

import dataclasses

import jax
from flax import nnx

from bert_jax import losses, masking


@dataclasses.dataclass(frozen=True)
class MlmObjective:
    """BERT's masked-language-model objective over the chosen positions."""

    spec: masking.MaskingSpec

    def corrupt(self, rng: jax.Array, batch: dict) -> masking.MaskedBatch:
        return masking.mask_tokens(rng, batch["input_ids"], self.spec)

    def normalizers(self, batch: dict, masked: masking.MaskedBatch) -> dict:
        del batch
        return {"mlm": jax.numpy.maximum(masked.weights.sum(), 1.0)}

    def loss(self, model: nnx.Module, batch: dict, masked: masking.MaskedBatch, dropout_key, norms: dict):
        """-> (loss normalised by the whole batch, {metric: (numerator, denominator)})."""
        logits = model(masked.input_ids, batch["attention_mask"], batch["token_type_ids"], masked.positions,
                       dropout_key=dropout_key)
        nll, n = losses.weighted_cross_entropy(logits, masked.labels, masked.weights)
        correct, _ = losses.weighted_accuracy(logits, masked.labels, masked.weights)
        return nll / norms["mlm"], {"mlm_loss": (nll, n), "mlm_accuracy": (correct, n)}
