"""The optimizer: learning-rate schedule, AdamW (or LAMB) with a weight-decay mask, global-norm clipping.

Gradient accumulation is not an optax wrapper here: the train step sums micro-batch gradients itself and
applies one update, so a step is always one update and the schedule counts updates.
"""

import dataclasses

import jax
import optax

from bert_jax.kernels.adamw import fused_adamw


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "linear"
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}: choose one of {sorted(_OPTIMIZERS)}")
        if self.schedule not in _DECAYS:
            raise ValueError(f"optim.schedule={self.schedule!r}: choose one of {sorted(_DECAYS)}")
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate} must be > 0")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must lie in [0, train.steps]")


_DECAYS = {
    "linear": lambda peak, end, n: optax.linear_schedule(peak, end, n),
    "cosine": lambda peak, end, n: optax.cosine_decay_schedule(peak, n, alpha=end / peak),
    "constant": lambda peak, end, n: optax.constant_schedule(peak),
}

_OPTIMIZERS = {"adamw": optax.adamw, "lamb": optax.lamb}


def learning_rate_schedule(c: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak over warmup_steps, then the chosen decay to end_lr_ratio * peak."""
    decay_steps = max(1, c.total_steps - c.warmup_steps)
    decay = _DECAYS[c.schedule](c.learning_rate, c.learning_rate * c.end_lr_ratio, decay_steps)
    if c.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
    return optax.join_schedules([warmup, decay], [c.warmup_steps])


def decay_mask(params):
    """True where weight decay applies: every parameter except biases and LayerNorm scales/offsets."""

    def decays(path, _):
        names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
        return names[-1] not in ("bias", "scale") and not any("norm" in str(n) for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c: OptimConfig, fused: bool = False) -> optax.GradientTransformation:
    """AdamW or LAMB with the decay mask, after global-norm clipping; fused: AdamW and the clipping as one
    Pallas kernel over the flattened parameters (model.kernels=adamw; bert_jax/kernels/adamw.py)."""
    schedule = learning_rate_schedule(c)
    if fused:
        return fused_adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask,
                           clip_norm=c.clip_norm)
    opt = _OPTIMIZERS[c.name](schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                              mask=decay_mask)
    if c.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(c.clip_norm), opt)
    return opt
