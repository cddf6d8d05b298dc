"""The FLOPs a training step needs: the one formula behind MFU in the training log, the benchmark and the planner.

Counted: the matrix multiplications (2 FLOPs per multiply-add), forward and backward (backward = 2 x forward,
so a training step is 3 x the forward). Not counted: elementwise work (GELU, LayerNorm, softmax, dropout),
the embedding gathers and the optimizer update; for BERT sizes they are a few percent of the total.

Per token and encoder layer (hidden h, MLP width f, sequence length S):
    q, k, v, output projections   8 h^2
    attention scores and context  4 S h
    MLP                           4 h f
Per gathered (masked) position, MLM head: dense 2 h e + vocabulary projection 2 e V (e: embedding width).
The vocabulary projection runs only at the `max_predictions` gathered positions of each row, which is all
the step computes (not at every position, as the Hugging Face trainers do). So does the last layer of an
MLM encoder (`model.last_layer` "predictions", the default): its keys and values (4 h^2 per token) cover
every position, its queries, output projection, attention and MLP (4 h^2 + 4 S h + 4 h f) the P positions.

DeBERTa (model.relative_attention; R = the relative embeddings that the distances within a row of S reach,
`layers.relative_rows`: at most 2 x the relative span, e.g. 255 of 512 for DeBERTa-v3 at S = 128; n = the number
of c2p/p2c terms) adds per layer the projection of the R relative embeddings through the layer's key (c2p)
and query (p2c) kernels, n 2 R h^2 whatever the batch, and per term the scores against them: c2p 2 R h per
query, p2c 2 R h per key (every position, also in the last layer of an MLM encoder, whose keys are all there). The gathers that pick each
pair's column are not matmuls. The projections are counted once per step: every data-parallel device (and
every micro-batch) computes them again, work that the model FLOPs (and so MFU) leave out, as remat's.
At seq 512 and a batch of 32 rows the relative terms add 19% (xsmall), 10% (base), 8% (large) to the
encoder's forward FLOPs; at one row 32%, 25%, 23%.
"""

import dataclasses

from bert_jax.models.config import EncoderConfig
from bert_jax.models.layers import relative_rows

FORMULA = ("train FLOPs = 3 x [B S ((L - 1) (8 h^2 + 4 S h + 4 h f) + 4 h^2 + 2 e h [e != h])"
           " + B P (4 h^2 + 4 S h + 4 h f) + B P (2 h e + 2 e V)]"
           " (the last layer's queries, attention and MLP at the P prediction positions; with"
           " model.last_layer=all: B S L (8 h^2 + 4 S h + 4 h f) instead; + ELECTRA: its discriminator's L"
           " layers at all positions and head B S (2 h^2 + 2 h))"
           "; + DeBERTa: L n 2 R h^2 + [c2p] 2 R h B (S (L - 1) + P) + [p2c] 2 R h B S L")


def encoder_forward_flops(cfg: EncoderConfig, batch: int, seq_len: int, predictions: int | None = None) -> int:
    """Forward matmul FLOPs of the embedding projection (if any) and the layers, for [batch, seq_len].
    predictions: the positions per row whose outputs are wanted (None: all); where `cfg.last_layer` is
    "predictions" the last layer computes only its keys and values at the other positions."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    per_token_layer = 8 * h * h + 4 * seq_len * h + 4 * h * f
    projection = 2 * cfg.embed_dim * h if cfg.embed_dim != h else 0
    full = batch * seq_len * (cfg.num_layers * per_token_layer + projection)
    full += relative_forward_flops(cfg, batch, seq_len, predictions)
    if predictions is None or cfg.last_layer == "all":
        return full
    key_value = 4 * h * h
    return full - batch * seq_len * (per_token_layer - key_value) + batch * predictions * (per_token_layer - key_value)


def relative_forward_flops(cfg: EncoderConfig, batch: int, seq_len: int, predictions: int | None = None) -> int:
    """DeBERTa's extra forward matmul FLOPs (see the module docstring); 0 without relative attention."""
    terms = cfg.pos_att_types
    if not terms:
        return 0
    lo, hi = relative_rows(cfg, seq_len)
    h, layers, r = cfg.hidden_size, cfg.num_layers, hi - lo
    last_queries = seq_len if predictions is None or cfg.last_layer == "all" else predictions
    total = layers * len(terms) * 2 * r * h * h
    if "c2p" in terms:
        total += 2 * r * h * batch * (seq_len * (layers - 1) + last_queries)
    if "p2c" in terms:
        total += 2 * r * h * batch * seq_len * layers
    return total


def mlm_head_forward_flops(cfg: EncoderConfig, batch: int, predictions: int) -> int:
    """Forward FLOPs of the MLM head at `predictions` gathered positions per row."""
    e = cfg.embed_dim
    return batch * predictions * (2 * cfg.hidden_size * e + 2 * e * cfg.vocab_size)


def train_step_flops(cfg: EncoderConfig, batch: int, seq_len: int, predictions: int,
                     generator: EncoderConfig | None = None) -> int:
    """FLOPs of one training step (forward + backward) on a global batch of [batch, seq_len].

    MLM: `cfg` is the model. ELECTRA (`generator` given): `cfg` is the discriminator; the generator runs
    the MLM head at the `predictions` positions, the discriminator its per-token head everywhere."""
    if generator is None:
        forward = (encoder_forward_flops(cfg, batch, seq_len, predictions)
                   + mlm_head_forward_flops(cfg, batch, predictions))
    else:
        h = cfg.hidden_size
        disc_head = batch * seq_len * (2 * h * h + 2 * h)
        forward = (encoder_forward_flops(generator, batch, seq_len, predictions)
                   + mlm_head_forward_flops(generator, batch, predictions)
                   + encoder_forward_flops(cfg, batch, seq_len) + disc_head)
    return 3 * forward


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    return flops_per_step / step_seconds / peak_flops_per_second


def describe(cfg: EncoderConfig) -> dict:
    """The sizes the formula uses, for printing next to it."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k in ("vocab_size", "hidden_size", "embedding_size", "num_layers", "intermediate_size")}
