"""ELECTRA replaced-token-detection recipes (Clark et al., 2020): `--config configs/electra.py:SIZE`.

SIZE is one of tiny (the CPU demo), small, base, large; `SIZE,gpu` adds the GPU preset (see configs/bert.py).
`model` describes the discriminator; the generator is `objective.generator_fraction` of its width (hidden,
heads, intermediate) and shares its embeddings.
The numbers follow the paper's Table 6/7: ELECTRA-Small (embedding 128, hidden 256, generator 1/4, lr 5e-4,
batch 128, seq 128, 1M steps), Base (768, generator 1/3, lr 2e-4, batch 256, seq 512, 766k steps) and
Large (1024, generator 1/4, mask rate 0.25, lr 2e-4, batch 2048, seq 512, 400k steps); 10k warmup steps,
linear decay, discriminator weight 50. Of the chosen positions 85% become [MASK] and 15% stay unchanged
(no random tokens), as the released ELECTRA code masks.
"""

from configs import common

# size: (layers, hidden, heads, intermediate, embedding size, generator fraction)
SIZES = {
    "tiny": (2, 128, 2, 512, 64, 1 / 2),
    "small": (12, 256, 4, 1024, 128, 1 / 4),
    "base": (12, 768, 12, 3072, 768, 1 / 3),
    "large": (24, 1024, 16, 4096, 1024, 1 / 4),
}


def _max_predictions(mask_rate: float, seq_len: int) -> int:
    # As the released code: a little above mask_rate * seq_len, so no row runs out of prediction slots.
    return int((mask_rate + 0.005) * seq_len)


def get_config(arg: str = "tiny"):
    arg, preset = common.split_recipe_arg(arg)
    if arg not in SIZES:
        raise ValueError(f"unknown ELECTRA size {arg!r}; choose one of {sorted(SIZES)}")
    layers, hidden, heads, mlp, embedding, fraction = SIZES[arg]
    c = common.base_config()
    c.model = common.model_config("tiny")
    c.model.size = f"electra-{arg}"
    c.model.num_layers = layers
    c.model.hidden_size = hidden
    c.model.num_heads = heads
    c.model.intermediate_size = mlp
    c.model.embedding_size = embedding

    o = c.objective
    o.name = "electra"
    o.generator_fraction = fraction
    o.generator_layers = -1
    o.disc_weight = 50.0
    o.sampling_temperature = 1.0
    o.mask_rate = 0.25 if arg == "large" else 0.15
    o.mask_token_rate = 0.85
    o.random_token_rate = 0.0
    c.optim.warmup_steps = 10_000
    c.optim.weight_decay = 0.01
    if arg == "tiny":
        # A minute or two on a 2-core CPU: no dropout (too few steps to overfit); the optimizer is the tiny
        # MLM recipe's (common.TINY_OPTIM: lr and b2 from the sweep in docs/RESULTS.md), and the replacements
        # are sampled at the paper's temperature 1 (set above).
        c.model.hidden_dropout = 0.0
        c.model.attention_dropout = 0.0
        c.data.seq_len = 128
        c.train.batch_size = 32
        c.train.steps = 200
        c.train.log_every = 25
        c.train.eval_every = 100
        c.train.eval_batches = 10
        common.apply_tiny_optim(c)
        c.checkpoint.every = 100
    elif arg == "small":
        c.data.seq_len = 128
        c.train.batch_size = 128
        c.train.steps = 1_000_000
        c.optim.learning_rate = 5e-4
    else:  # base, large
        c.data.seq_len = 512
        c.model.max_position_embeddings = 512
        c.train.batch_size = 256 if arg == "base" else 2048
        c.train.steps = 766_000 if arg == "base" else 400_000
        c.optim.learning_rate = 2e-4
    o.max_predictions = _max_predictions(o.mask_rate, c.data.seq_len)
    if arg != "tiny":
        c.train.eval_every = 10_000
        c.checkpoint.every = 10_000
    common.apply_preset(c, preset)
    c.lock()
    return c
