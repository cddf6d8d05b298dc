"""Pretraining objectives: corruption of the batch, the model call and the losses.

An objective returns its loss already divided by denominators computed on the WHOLE batch (`normalizers`),
so that the loss of a batch is the sum of the losses of its micro-batches: gradient accumulation and
data-parallel averaging are then exact. Metrics come back as (numerator, denominator) sums.

The interface, used by bert_jax.train_step for any objective:
  corrupt(rng, batch) -> corrupted inputs (a pytree with a leading batch axis on every leaf: micro-batches
      split it). ALL randomness of the objective is drawn here, so eval (no dropout) gets it too.
  normalizers(batch, corrupted) -> {name: whole-batch denominator}
  loss(model, batch, corrupted, dropout_key, norms) -> (loss, {metric: (numerator, denominator)})
  total_loss({metric: value}) -> the loss of a whole evaluation from its finished metrics.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from bert_jax import losses, masking
from bert_jax.models.encoder import document_features


def document_inputs(input_ids: jax.Array, cls_id: int | None) -> dict:
    """The model's keyword inputs that keep packed documents apart: {} when `cls_id` is None (one sequence
    per row), else segment_ids / position_ids [B, S] derived on device from the [CLS] of each document."""
    if cls_id is None:
        return {}
    segment_ids, position_ids = document_features(input_ids, cls_id)
    return {"segment_ids": segment_ids, "position_ids": position_ids}


@dataclasses.dataclass(frozen=True)
class MlmObjective:
    """BERT's masked-language-model objective over the chosen positions. `document_cls_id` (the [CLS] id, or
    None to turn it off): attention stays within each packed document and positions restart at each one."""

    spec: masking.MaskingSpec
    document_cls_id: int | None = None

    def corrupt(self, rng: jax.Array, batch: dict) -> masking.MaskedBatch:
        return masking.mask_tokens(rng, batch["input_ids"], self.spec)

    def normalizers(self, batch: dict, masked: masking.MaskedBatch) -> dict:
        del batch
        return {"mlm": jax.numpy.maximum(masked.weights.sum(), 1.0)}

    def loss(self, model: nnx.Module, batch: dict, masked: masking.MaskedBatch, dropout_key, norms: dict):
        """-> (loss normalised by the whole batch, {metric: (numerator, denominator)})."""
        logits = model(masked.input_ids, batch["attention_mask"], batch["token_type_ids"], masked.positions,
                       dropout_key=dropout_key, **document_inputs(batch["input_ids"], self.document_cls_id))
        nll, n = losses.weighted_cross_entropy(logits, masked.labels, masked.weights)
        correct, _ = losses.weighted_accuracy(logits, masked.labels, masked.weights)
        return nll / norms["mlm"], {"mlm_loss": (nll, n), "mlm_accuracy": (correct, n)}

    def total_loss(self, values: dict) -> float:
        return values["mlm_loss"]


@flax.struct.dataclass
class ElectraInputs:
    """The MLM-masked batch for the generator, and one sampling key per row ([B, 2] uint32): a row draws
    its replacements from its own key, so micro-batching and sharding do not change the draws."""

    masked: masking.MaskedBatch
    sample_keys: jax.Array


@dataclasses.dataclass(frozen=True)
class ElectraObjective:
    """Replaced-token detection: generator MLM loss + disc_weight x discriminator sigmoid loss (per token)."""

    spec: masking.MaskingSpec
    disc_weight: float = 50.0
    temperature: float = 1.0
    document_cls_id: int | None = None  # as MlmObjective's, for both towers

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"objective.sampling_temperature={self.temperature} must be > 0")
        if self.disc_weight < 0:
            raise ValueError(f"objective.disc_weight={self.disc_weight} must be >= 0")

    def corrupt(self, rng: jax.Array, batch: dict) -> ElectraInputs:
        mask_rng, sample_rng = jax.random.split(rng)
        ids = batch["input_ids"]
        return ElectraInputs(masked=masking.mask_tokens(mask_rng, ids, self.spec),
                             sample_keys=jax.random.split(sample_rng, ids.shape[0]))

    def normalizers(self, batch: dict, inputs: ElectraInputs) -> dict:
        return {"mlm": jnp.maximum(inputs.masked.weights.sum(), 1.0),
                "disc": jnp.maximum(batch["attention_mask"].astype(jnp.float32).sum(), 1.0)}

    def loss(self, model: nnx.Module, batch: dict, inputs: ElectraInputs, dropout_key, norms: dict):
        """-> (gen_loss + disc_weight * disc_loss, each normalised by the whole batch; metric sums)."""
        masked = inputs.masked
        gen_key, disc_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        mask, types = batch["attention_mask"], batch["token_type_ids"]
        # From the original ids: corruption never writes or removes a [CLS], so both towers see the same documents.
        docs = document_inputs(batch["input_ids"], self.document_cls_id)
        gen_logits = model.generator_logits(masked.input_ids, mask, types, masked.positions, dropout_key=gen_key,
                                            **docs)
        nll, n = losses.weighted_cross_entropy(gen_logits, masked.labels, masked.weights)
        gen_correct, _ = losses.weighted_accuracy(gen_logits, masked.labels, masked.weights)

        # The draws are integers behind a stop_gradient: the discriminator loss never reaches the generator
        # (its towers' parameters); the shared embeddings get gradients from both losses.
        sampled = masking.sample_tokens(inputs.sample_keys, gen_logits, self.spec, self.temperature)
        disc_ids, labels = masking.replace_tokens(batch["input_ids"], masked.positions, masked.weights, sampled)
        disc_ids = jax.lax.stop_gradient(disc_ids)
        disc_logits = model.discriminator_logits(disc_ids, mask, types, dropout_key=disc_key, **docs)
        tokens = mask.astype(jnp.float32)  # every non-padding token, special tokens included
        disc_nll, n_tok = losses.weighted_sigmoid_cross_entropy(disc_logits, labels, tokens)

        loss = nll / norms["mlm"] + self.disc_weight * disc_nll / norms["disc"]
        predicted = (disc_logits > 0).astype(jnp.float32) * tokens
        actual = labels * tokens
        true_pos = (predicted * actual).sum()
        return loss, {
            "gen_mlm_loss": (nll, n),
            "gen_mlm_accuracy": (gen_correct, n),
            "disc_loss": (disc_nll, n_tok),
            "disc_accuracy": (((predicted == actual) * tokens).sum(), n_tok),
            "disc_precision": (true_pos, predicted.sum()),
            "disc_recall": (true_pos, actual.sum()),
            "replaced_fraction": (actual.sum(), n_tok),
        }

    def total_loss(self, values: dict) -> float:
        return values["gen_mlm_loss"] + self.disc_weight * values["disc_loss"]
