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


# The optimizer of the tiny recipes, MLM (bert.py) and ELECTRA (electra.py) alike, so that tools.downstream
# compares objectives, not settings. lr and b2 come from the sweep in docs/RESULTS.md
# (`python -m tools.downstream --sweep`: each objective at 1/4 of the budget over lr x b2; the setting with the
# lowest mean of held-out loss / that objective's best); change them here, in one line.
TINY_OPTIM = dict(learning_rate=2e-3, b2=0.999, eps=1e-6, weight_decay=0.01)
TINY_WARMUP_FRACTION = 1 / 12  # of the steps: linear warmup, then linear decay to 0


def tiny_warmup_steps(steps: int) -> int:
    """The tiny recipes' warmup for a run of `steps` steps (also tools.downstream's, whatever its budget)."""
    return max(1, steps // round(1 / TINY_WARMUP_FRACTION))


def apply_tiny_optim(c: ml_collections.ConfigDict) -> None:
    """TINY_OPTIM and the warmup rule, for the run's `train.steps` (set them first)."""
    for key, value in TINY_OPTIM.items():
        c.optim[key] = value
    c.optim.warmup_steps = tiny_warmup_steps(c.train.steps)  # a twelfth of the run


def model_config(size: str) -> ml_collections.ConfigDict:
    """The `model` section for one row of SIZES."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    layers, hidden, heads, mlp = SIZES[size]
    m = ml_collections.ConfigDict()
    m.size = size  # informative only: the numbers below are what the model uses
    m.num_layers = layers  # transformer layers (stacked and scanned: compile time does not grow with depth)
    m.hidden_size = hidden  # width of the residual stream
    # Width of the (word, position, token type) embeddings; -1: hidden_size. ELECTRA may make it smaller
    # (a projection per tower then maps it to the hidden size); BERT (objective mlm) needs -1 or hidden_size.
    m.embedding_size = -1
    m.num_heads = heads  # attention heads; must divide hidden_size
    m.intermediate_size = mlp  # width of each layer's MLP (GELU)
    # the MLP's activation (and the heads', where Hugging Face uses the config's): gelu (the exact erf GELU,
    # Hugging Face's BERT default) or gelu_tanh (its tanh approximation, as in Google's original BERT and
    # ELECTRA code; exported as Hugging Face's gelu_pytorch_tanh)
    m.hidden_act = "gelu"
    m.vocab_size = -1  # -1: take it from the data manifest; any other value must equal the manifest's
    m.max_position_embeddings = 512  # learned positions; data.seq_len may not exceed it
    m.type_vocab_size = 2  # token-type (segment) embeddings, as BERT's; kept for Hugging Face compatibility
    # RoBERTa: positions read the table from this row on (its padding id + 1 = 2; padding reads the row before);
    # data.seq_len may then not exceed max_position_embeddings - position_offset. 0: BERT's positions.
    m.position_offset = 0
    m.hidden_dropout = 0.1  # dropout on embeddings and each sub-layer's output
    m.attention_dropout = 0.1  # dropout on the attention probabilities
    m.layer_norm_eps = 1e-12  # BERT's value (Hugging Face configs carry the same)
    m.initializer_range = 0.02  # std of the truncated-normal initialisation of weights and embeddings
    m.dtype = "float32"  # compute dtype of activations ("float32" or "bfloat16"); parameters stay float32
    # Rematerialisation of each layer in the backward pass: none | full | dots (keep the matmul outputs,
    # recompute the elementwise rest). dots is also the fastest on XLA:CPU: 1.28x and 1.14x as fast as none
    # for mini (tools.benchmark --ab remat=none,dots; less memory traffic), and it needs less memory.
    m.remat = "dots"
    # einsum (fastest on CPU) | dot_product: jax.nn.dot_product_attention as XLA writes it (no dropout: with
    # attention dropout > 0 training steps still take the einsum path) | cudnn: the same through cuDNN's fused
    # kernel (GPU, bfloat16 and attention_dropout=0 only; the `SIZE,gpu` preset sets all three)
    m.attention = "einsum"
    # predictions: the MLM heads read the last layer at the masked positions only, so that layer runs its
    # queries, output projection and MLP there only (keys/values everywhere; same values, ~70% fewer of its
    # FLOPs; tools.benchmark --ab last_layer=all,predictions) | all: the whole last layer, then gather
    m.last_layer = "predictions"
    # layers per iteration of the scan over the layer stack: 1 (a loop; compile time independent of depth) or
    # up to num_layers (unrolled: no copies of saved activations in and out of stacked buffers)
    m.scan_unroll = 1
    # Pallas GPU kernels, '+'-joined (bert_jax/kernels): hash_dropout, layernorm, gelu, adamw; "": plain XLA
    m.kernels = ""
    # DeBERTa's disentangled attention (configs/deberta.py; Hugging Face's DebertaV2Config names): c2p/p2c terms
    # over relative distances, log-bucketed beyond position_buckets / 2 (<= 0: none); relative embeddings
    # shared by all layers (2 x position_buckets, or 2 x max_relative_positions, -1: max_position_embeddings),
    # normalised by a LayerNorm where norm_rel_ebd = "layer_norm"; position_biased_input False drops the
    # absolute position embeddings; share_att_key: positions go through the layers' query/key projections.
    m.relative_attention = False  # DeBERTa's c2p/p2c terms on (the fields below matter only then)
    m.position_buckets = -1  # log buckets beyond position_buckets / 2; <= 0: none (distances clipped)
    m.max_relative_positions = -1  # the span of relative distances; -1: max_position_embeddings
    m.pos_att_type = "p2c|c2p"  # which relative terms the scores add
    m.share_att_key = True  # positions go through the layers' own query/key projections
    m.norm_rel_ebd = "layer_norm"  # a LayerNorm on the shared relative embeddings ("none": without)
    m.position_biased_input = True  # absolute position embeddings at the input (DeBERTa-v3: False)
    return m


def split_recipe_arg(arg: str) -> tuple[str, str]:
    """A recipe file's argument, `SIZE` or `SIZE,gpu` -> (size, preset: "" or "gpu")."""
    size, _, preset = arg.partition(",")
    if preset not in ("", "gpu"):
        raise ValueError(f"unknown preset {preset!r} in the config argument {arg!r}; use SIZE or SIZE,gpu")
    return size, preset


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> None:
    """`gpu`: the settings measured fastest on one H100 (docs/BENCHMARKS.md): bf16 compute (f32 master weights
    and optimizer state), cuDNN's fused attention (BERT-base 1.11x the einsum path with attention dropout;
    it has no dropout, so attention dropout 0, hidden dropout stays), the layer scan unrolled (1.14x), GELU's
    tanh approximation (1.06x; exported as Hugging Face's gelu_pytorch_tanh), and the Pallas kernels that
    measured faster on an H200 (hash dropout masks, fused residual + dropout + LayerNorm, fused bias + GELU:
    1.16x on base, 1.12x on large; the fused AdamW measured slower and stays off)."""
    if preset == "gpu":
        c.model.dtype = "bfloat16"  # compute; parameters and Adam moments stay float32
        c.model.attention = "cudnn"  # cuDNN's fused attention kernel
        c.model.attention_dropout = 0.0  # the fused kernel has no dropout
        c.model.scan_unroll = c.model.num_layers  # no copies in and out of the scan's stacked buffers
        c.model.hidden_act = "gelu_tanh"  # cheaper than the erf form in the memory-bound MLP fusions
        c.model.kernels = "hash_dropout+layernorm+gelu"  # bert_jax/kernels, each A/B'd on the GPU


def _default_rules() -> dict:
    from bert_jax.axis_rules import rules_to_strings  # pylint: disable=import-outside-toplevel
    return rules_to_strings()


def base_config() -> ml_collections.ConfigDict:
    """All sections with defaults; recipes change what differs."""
    c = ml_collections.ConfigDict()
    c.model = model_config("tiny")  # recipes replace it with their size's section
    # A fresh run (no checkpoint in the workdir yet) starts from these parameters: another run's workdir or a
    # folder written by `python -m tools.import_from_hf`. Optimizer state and step start anew.
    c.init_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # folder written by `python -m data_pipeline.pretokenize` (holds manifest.json)
    c.data.seq_len = 128  # must equal the manifest's seq_len
    c.data.shuffle_buffer = 10_000  # rows held for shuffling on each host
    c.data.seed = 0  # shuffling order of the training rows
    # Shards read together (interleaved, then shuffled): more mixes more of the corpus into each batch; a
    # resume re-reads at most this many shards (1: at most one shard).
    c.data.window_shards = 1
    c.data.skip_corrupt_shards = False  # a corrupt/truncated shard: False stops with an error naming it
    # Packed documents attend only within themselves, positions restart at each (segments from the [CLS]
    # that starts every packed piece); False: a row is one sequence (a [B,1,1,S] padding bias, a bit cheaper).
    c.data.document_attention = True

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "mlm"  # mlm | electra (replaced-token detection, configs/electra.py)
    c.objective.mask_rate = 0.15  # fraction of the maskable (non-special, non-padding) tokens chosen
    c.objective.whole_word_masking = False  # choose whole words (all their pieces); 80/10/10 drawn per word
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
    c.optim.b1 = 0.9  # Adam first-moment decay
    c.optim.b2 = 0.999  # Adam second-moment decay (RoBERTa: 0.98, steadier at high learning rates)
    c.optim.eps = 1e-6  # Adam denominator epsilon (BERT's 1e-6)
    c.optim.clip_norm = 1.0  # global gradient-norm clipping; 0 disables it
    c.optim.grad_accum_steps = 1  # micro-batches per step; the update equals the one of the whole batch

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps in all (a resumed run continues up to this number)
    c.train.batch_size = 32  # global batch size in rows (all hosts together)
    c.train.log_every = 50  # steps between training log lines / metrics.jsonl records
    c.train.eval_every = 500  # steps between evaluations (and always at the last step); 0 disables
    c.train.eval_batches = 20  # validation batches per evaluation (fixed rows and fixed masks every time)
    c.train.seed = 0  # parameter initialisation, masking and dropout randomness
    # Peak TFLOP/s of one device for the MFU in the log: -1 looks the device kind up in
    # bert_jax.metrics.PEAK_TFLOPS (bf16 dense peaks of GPUs/TPUs; CPUs are not listed), 0 hides MFU.
    c.train.peak_tflops_per_device = -1.0
    # "FIRST,LAST": a jax.profiler trace of training steps FIRST..LAST in W/profile (TensorBoard / Perfetto);
    # "" profiles nothing. Keep it a few steps after compilation, e.g. "10,12".
    c.train.profile_steps = ""
    # A step whose loss or gradients are not finite leaves parameters and optimizer state untouched (counted
    # as train/skipped); this many skips in a row stop the run (0: never stop).
    c.train.max_nan_skips = 20

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 takes the devices that the other axes leave
    c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis (ZeRO-3 style)
    c.mesh.tensor = 1  # tensor-parallel axis (attention heads, MLP, vocab)
    # Logical axis -> mesh axes ("fsdp", "data,fsdp", "" = replicated), e.g. --config.mesh.rules.vocab="" keeps
    # the vocabulary whole. The defaults are bert_jax.sharding.DEFAULT_RULES; see docs/MULTIHOST.md.
    c.mesh.rules = ml_collections.ConfigDict(_default_rules())

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500  # steps between checkpoints (and always at the last step); 0: only at the end
    c.checkpoint.max_to_keep = 3  # newest checkpoints kept
    c.checkpoint.keep_every = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    c.checkpoint.async_save = True  # training continues while a checkpoint is written
    return c
