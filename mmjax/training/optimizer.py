"""AdamW with linear warmup and cosine decay, global-norm clipping, no decay on norms and biases."""

from __future__ import annotations

import jax
import optax

_NO_DECAY = ("bias", "scale", "feature_bias", "task_log_vars")


def decay_mask(params):
    """True for parameters that get weight decay: kernels and embeddings, not norms or biases."""

    def keep(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return leaf.ndim > 1 and not name.endswith(_NO_DECAY)

    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(cfg, num_steps: int):
    warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_factor)


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
    """`cfg`: learning_rate, warmup_steps, end_lr_factor, weight_decay, b1, b2, clip_norm."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
