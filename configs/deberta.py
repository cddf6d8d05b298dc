"""DeBERTa-v3 recipes (He et al., 2021/2023): `--config configs/deberta.py:SIZE`.

SIZE is one of tiny (the CPU demo), xsmall (12 x 384), small (6 x 768), base (12 x 768), large (24 x 1024);
`SIZE,gpu` adds the GPU preset (see configs/bert.py; the relative-position terms then go into cuDNN's fused
attention as its bias).

The backbone is our encoder with DeBERTa's disentangled attention (model.relative_attention): 256 log buckets
over 512 relative positions, relative embeddings with a LayerNorm shared by all layers, position projections
shared with the content ones, no absolute positions and no token types, LayerNorm eps 1e-7, as the released
v3 checkpoints. The objective is DeBERTa-v3's replaced-token detection (`deberta_rtd`, models/deberta.py): a
generator as wide as the discriminator and half as deep, the discriminator's word embeddings the generator's
behind a stop-gradient plus a learned difference (gradient-disentangled embedding sharing), discriminator
weight 50, BERT's 80/10/10 masking of 15%. `--config.objective.name=mlm` trains DeBERTa's MLM on the same
backbone instead. Optimisation follows the paper's pre-training setting (AdamW, b1 0.9, b2 0.999, eps 1e-6,
weight decay 0.01, 10k warmup steps, linear decay, gradient clipping 1, batch 2048 at seq 512; learning rate
5e-4 for base and the smaller sizes and 3e-4 for large). The paper trains with a 128k SentencePiece
vocabulary: pretokenize the data with a SentencePiece tokenizer (`data_pipeline.pretokenize`); a WordPiece
dataset trains the same way.
"""

from configs import common

# size: (layers, hidden, heads, intermediate)
SIZES = {
    "tiny": (2, 128, 2, 512),
    "xsmall": (12, 384, 6, 1536),
    "small": (6, 768, 12, 3072),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}


def deberta_model(size: str):
    """The `model` section of one row of SIZES with DeBERTa-v3's attention."""
    layers, hidden, heads, mlp = SIZES[size]
    m = common.model_config("tiny")
    m.size = f"deberta-{size}"
    m.num_layers, m.hidden_size, m.num_heads, m.intermediate_size = layers, hidden, heads, mlp
    m.relative_attention = True
    m.position_buckets = 256
    m.max_relative_positions = -1  # max_position_embeddings
    m.pos_att_type = "p2c|c2p"
    m.share_att_key = True
    m.norm_rel_ebd = "layer_norm"
    m.position_biased_input = False
    m.type_vocab_size = 0
    m.layer_norm_eps = 1e-7
    m.max_position_embeddings = 512
    return m


def get_config(arg: str = "tiny"):
    arg, preset = common.split_recipe_arg(arg)
    if arg not in SIZES:
        raise ValueError(f"unknown DeBERTa size {arg!r}; choose one of {sorted(SIZES)}")
    c = common.base_config()
    c.model = deberta_model(arg)
    o = c.objective
    o.name = "deberta_rtd"
    o.generator_fraction = 1.0  # as wide as the discriminator (GDES shares the word embeddings)
    o.generator_layers = max(1, c.model.num_layers // 2)
    o.disc_weight = 50.0
    o.sampling_temperature = 1.0
    o.mask_rate = 0.15
    o.mask_token_rate = 0.8
    o.random_token_rate = 0.1
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    if arg == "tiny":
        # A minute or two on a 2-core CPU: short relative span, no dropout, a hot learning rate, and a hotter
        # generator sample (T=2: easier replacements for so young a generator; `tools.downstream --deberta`
        # trains at the tiny ELECTRA recipe's T=1 and optimizer instead).
        c.model.position_buckets = 32
        c.model.max_relative_positions = 128
        c.model.hidden_dropout = 0.0
        c.model.attention_dropout = 0.0
        c.data.seq_len = 128
        c.train.batch_size = 32
        c.train.steps = 200
        c.train.log_every = 25
        c.train.eval_every = 100
        c.train.eval_batches = 10
        c.optim.learning_rate = 2e-3
        c.optim.warmup_steps = 20
        o.sampling_temperature = 2.0
        c.checkpoint.every = 100
    else:
        c.data.seq_len = 512
        c.train.batch_size = 2048
        c.train.steps = 125_000
        c.optim.learning_rate = 3e-4 if arg == "large" else 5e-4
        c.optim.warmup_steps = 10_000
        c.train.eval_every = 5_000
        c.checkpoint.every = 5_000
    o.max_predictions = int((o.mask_rate + 0.005) * c.data.seq_len)
    common.apply_preset(c, preset)
    c.lock()
    return c
