"""BERT masked-language-model recipes: `--config configs/bert.py:SIZE`.

SIZE is one of tiny (the CPU demo), mini, small, medium, base, large. The optimisation settings of
base/large follow the BERT paper's phase-1 recipe (lr 1e-4, 10k warmup, linear decay, batch 256, seq 128).
`SIZE,gpu` adds the GPU preset (`common.apply_preset`: bf16, cuDNN attention without attention dropout, the
layer scan unrolled, the tanh GELU), e.g. `--config configs/bert.py:base,gpu`.
"""

from configs import common


def get_config(arg: str = "tiny"):
    arg, preset = common.split_recipe_arg(arg)
    c = common.base_config()
    c.model = common.model_config(arg)
    if arg == "tiny":
        # ~10 minutes on a 2-core CPU: no dropout (too few steps to overfit); the optimizer is the tiny
        # ELECTRA recipe's (common.TINY_OPTIM: lr and b2 from the sweep in docs/RESULTS.md).
        c.model.hidden_dropout = 0.0
        c.model.attention_dropout = 0.0
        c.data.seq_len = 128
        c.train.batch_size = 64
        c.train.steps = 1200
        c.train.log_every = 50
        c.train.eval_every = 200
        common.apply_tiny_optim(c)
        c.checkpoint.every = 400
    elif arg in ("mini", "small", "medium"):
        c.train.batch_size = 128
        c.train.steps = 100_000
        c.optim.learning_rate = 5e-4
        c.optim.warmup_steps = 5_000
        c.train.eval_every = 2_000
        c.checkpoint.every = 5_000
    else:  # base, large
        c.train.batch_size = 256
        c.train.steps = 1_000_000
        c.optim.learning_rate = 1e-4
        c.optim.warmup_steps = 10_000
        c.train.eval_every = 10_000
        c.checkpoint.every = 10_000
    common.apply_preset(c, preset)
    c.lock()
    return c
