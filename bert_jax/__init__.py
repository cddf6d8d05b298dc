"""bert_jax: pretraining BERT-family encoders (MLM, ELECTRA) with JAX, Flax NNX, optax and orbax."""
