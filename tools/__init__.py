"""Command-line tools around bert_jax: the demo, conversion, benchmarks, plots."""
