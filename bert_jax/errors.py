"""The error a config value raises before anything is compiled; kept free of jax so that command lines
(`bert_jax.training`, `tools.plan`) can name it before they decide how jax starts."""


class ConfigError(ValueError):
    """A config value that cannot work; raised before any compilation, printed as one line by the CLIs."""
