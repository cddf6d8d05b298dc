"""Shared pieces of the recipe configs: the model size table and the config skeleton.

Every recipe file (`bert.py`, `electra.py`) starts from `base_config()` and picks a row of `SIZES`,
so that the keys, their types and their comments live in one place. Every key can be overridden on the
command line (`--config.train.steps=100`); ml_collections refuses unknown keys and wrong types.
"""

import ml_collections

# name: (layers, hidden, heads, intermediate). mini/small/medium follow Turc et al. (2019) "well-read
# students" sizes, base/large are the BERT paper's; tiny is a CPU demo size.
SIZES = {
        "tiny": (2, 128, 2, 512),
        "mini": (4, 256, 4, 1024),
        "small": (4, 512, 8, 2048),
        "medium": (8, 512, 8, 2048),
        "base": (12, 768, 12, 3072),
        "large": (24, 1024, 16, 4096),
}


def model_config(size: str) -> ml_collections.ConfigDict:
    """The `model` section for one row of SIZES."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    layers, hidden, heads, mlp = SIZES[size]
    m = ml_collections.ConfigDict()
    m.size = size  # informative only: the numbers below are what the model uses
    m.num_layers = layers
    m.hidden_size = hidden
    # Width of the (word, position, token type) embeddings; -1: hidden_size. ELECTRA may make it smaller
    # (a projection per tower then maps it to the hidden size); BERT (objective mlm) needs -1 or hidden_size.
    m.embedding_size = -1
    m.num_heads = heads
    m.intermediate_size = mlp
    m.vocab_size = -1  # -1: take it from the data manifest; any other value must equal the manifest's
    m.max_position_embeddings = 512
    m.type_vocab_size = 2
    m.hidden_dropout = 0.1
    m.attention_dropout = 0.1
    m.layer_norm_eps = 1e-12
    m.initializer_range = 0.02
    m.dtype = "float32"  # compute dtype of activations ("float32" or "bfloat16"); parameters stay float32
    m.remat = "none"  # rematerialisation of each layer in the backward pass: none | full | dots
    return m


def base_config() -> ml_collections.ConfigDict:
    """All sections with defaults; recipes change what differs."""
    c = ml_collections.ConfigDict()
    c.model = model_config("tiny")
    # A fresh run (no checkpoint in the workdir yet) starts from these parameters: another run's workdir or a
    # folder written by `python -m tools.import_from_hf`. Optimizer state and step start anew.
    c.init_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # folder written by `python -m data_pipeline.pretokenize` (holds manifest.json)
    c.data.seq_len = 128  # must equal the manifest's seq_len
    c.data.shuffle_buffer = 10_000  # rows held for shuffling on each host
    c.data.seed = 0  # shuffling order of the training rows

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "mlm"  # mlm | electra (replaced-token detection, configs/electra.py)
    c.objective.mask_rate = 0.15  # fraction of the maskable (non-special, non-padding) tokens chosen
    c.objective.max_predictions = 20  # cap of chosen positions per row; the vocab projection runs on these only
    c.objective.mask_token_rate = 0.8  # of the chosen: replaced by [MASK]
    c.objective.random_token_rate = 0.1  # of the chosen: replaced by a random token (the rest stay unchanged)
    # ELECTRA only (objective.name = "electra"); `model` describes the discriminator.
    c.objective.generator_fraction = 0.25  # generator width (hidden, heads, intermediate) / discriminator's
    c.objective.generator_layers = -1  # generator depth; -1: the discriminator's
    c.objective.disc_weight = 50.0  # total loss = generator MLM loss + disc_weight x discriminator loss
    c.objective.sampling_temperature = 1.0  # replacements are drawn from softmax(generator logits / T)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | lamb
    c.optim.learning_rate = 1e-4  # peak learning rate
    c.optim.warmup_steps = 1000  # linear warmup from 0 to the peak
    c.optim.schedule = "linear"  # decay after warmup: linear | cosine | constant
    c.optim.end_lr_ratio = 0.0  # learning rate at the last step, as a fraction of the peak
    c.optim.weight_decay = 0.01  # decoupled; never applied to biases and LayerNorm parameters
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.clip_norm = 1.0  # global gradient-norm clipping; 0 disables it
    c.optim.grad_accum_steps = 1  # micro-batches per step; the update equals the one of the whole batch

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps in all (a resumed run continues up to this number)
    c.train.batch_size = 32  # global batch size in rows (all hosts together)
    c.train.log_every = 50  # steps between training log lines / metrics.jsonl records
    c.train.eval_every = 500  # steps between evaluations (and always at the last step); 0 disables
    c.train.eval_batches = 20  # validation batches per evaluation (fixed rows and fixed masks every time)
    c.train.seed = 0  # parameter initialisation, masking and dropout randomness
    # A step whose loss or gradients are not finite leaves parameters and optimizer state untouched (counted
    # as train/skipped); this many skips in a row stop the run (0: never stop).
    c.train.max_nan_skips = 20

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 takes the devices that the other axes leave
    c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis (ZeRO-3 style)
    c.mesh.tensor = 1  # tensor-parallel axis (attention heads, MLP, vocab)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500  # steps between checkpoints (and always at the last step); 0: only at the end
    c.checkpoint.max_to_keep = 3  # newest checkpoints kept
    c.checkpoint.keep_every = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    c.checkpoint.async_save = True  # training continues while a checkpoint is written
    return c
