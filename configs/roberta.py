"""RoBERTa recipes (Liu et al., 2019): `--config configs/roberta.py:SIZE`, SIZE one of tiny (the CPU demo), base,
large; `SIZE,gpu` adds the GPU preset as in configs/bert.py (less the tanh GELU, see below).

RoBERTa is BERT's encoder trained differently, so this is configs/bert.py's model with other settings, no second
model: MLM only (no next-sentence prediction: objective mlm), masks drawn anew at every step (our masking is
always dynamic: on device, per batch), full 512-token rows of packed documents, a byte-level BPE vocabulary
(pretokenize with `--tokenizer bytelevel-bpe --cased`: RoBERTa's special tokens <s> <pad> </s> <unk> <mask>, pad
id 1), no token types (type_vocab_size 1), positions starting after the padding id as Hugging Face's RoBERTa
reads them (position_offset 2, 514 position rows for 512 tokens), LayerNorm epsilon 1e-5. The optimisation is the
paper's Table 9: peak learning rate 6e-4 (base) / 4e-4 (large), warmup 24k / 30k steps, then linear decay over
500k steps, batch 8k sequences, Adam b1 0.9, b2 0.98, eps 1e-6, weight decay 0.01, no gradient clipping,
dropout 0.1. A batch of 8k rows of 512 tokens needs `--config.optim.grad_accum_steps` on most machines (the
update equals the whole batch's).

Exports with `python -m tools.convert_to_hf --workdir W --out DIR --model roberta_mlm --verify` as a
RobertaForMaskedLM folder. Its MLM head computes the exact GELU whatever the config says, so these recipes keep
`hidden_act = "gelu"` (the `gpu` preset's tanh form would not export).
"""

from configs import common

# size -> (peak learning rate, warmup steps), the RoBERTa paper's Table 9.
TABLE_9 = {"base": (6e-4, 24_000), "large": (4e-4, 30_000)}


def roberta_model(c) -> None:
    """The model settings that make the encoder a RoBERTa (Hugging Face's RobertaConfig values)."""
    c.model.type_vocab_size = 1  # no token types (no sentence pairs in pretraining)
    c.model.max_position_embeddings = 514  # 512 tokens after the two rows before the first position
    c.model.position_offset = 2  # padding id 1 + 1: where Hugging Face's RoBERTa reads position 0
    c.model.layer_norm_eps = 1e-5
    c.model.hidden_act = "gelu"  # RobertaForMaskedLM's head is always the exact GELU


def get_config(arg: str = "tiny"):
    arg, preset = common.split_recipe_arg(arg)
    if arg not in ("tiny", *TABLE_9):
        raise ValueError(f"unknown RoBERTa size {arg!r}; choose tiny, base or large")
    c = common.base_config()
    c.model = common.model_config(arg)
    c.objective.name = "mlm"
    c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay = 0.9, 0.98, 1e-6, 0.01
    c.optim.schedule = "linear"
    if arg == "tiny":
        # configs/bert.py's CPU demo (no dropout, a hot learning rate, seq 128), with RoBERTa's model.
        c.model.hidden_dropout = 0.0
        c.model.attention_dropout = 0.0
        c.data.seq_len = 128
        c.train.batch_size = 64
        c.train.steps = 1200
        c.train.log_every = 50
        c.train.eval_every = 200
        c.optim.learning_rate = 2e-3
        c.optim.warmup_steps = 100
        c.checkpoint.every = 400
    else:
        c.data.seq_len = 512
        c.objective.max_predictions = 80  # 15% of 512 is 77
        c.train.batch_size = 8192
        c.train.steps = 500_000
        c.optim.learning_rate, c.optim.warmup_steps = TABLE_9[arg]
        c.optim.clip_norm = 0.0  # the paper clips no gradients
        c.train.eval_every = 10_000
        c.checkpoint.every = 10_000
    common.apply_preset(c, preset)
    roberta_model(c)  # after the preset: it must not switch the GELU to the tanh form
    c.lock()
    return c
