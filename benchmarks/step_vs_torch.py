r"""The whole train step, mmjax against the same model in PyTorch eager (and against plain flax.linen
layers), on one fixed batch of the default experiment.

    pip install torch   # CPU wheel, for the PyTorch variants (without it only the JAX ones run)
    python benchmarks/step_vs_torch.py [--config=experiments/synthetic_patients.py] \
        [--config.model.width=128] [--steps=10 --rounds=10] [--out=step_vs_torch.json]

A step is what training does: forward in train mode (modality dropout on), the joint loss with the
auxiliary per-modality heads, backward, global-norm clipping, AdamW with the warmup-cosine
schedule and the decay mask. PyTorch runs `benchmarks/torch_model.py`, loaded with mmjax's
initial parameters; before timing, `--check` (on by default) asserts that, with modality dropout
off, both compute the same outputs, losses and gradients.

Variants are timed in turn, round by round, each step alone (so drift and bursts of noise on a
shared machine hit them alike); the median step time is reported with the 10th and 90th
percentiles:
- `mmjax`: the library as shipped;
- `flax_layers`: the same model as one would usually write it in flax: `flax.linen.Dense`,
  `LayerNorm` and `Conv`, attention with a heads axis and a softmax before the value matmul;
- `autodiff_layernorm`: mmjax's Dense with a LayerNorm differentiated by autodiff rather than
  mmjax's closed-form backward;
- `mmjax_accum2`: mmjax with `train.accum_steps=2`, the same update from two microbatches of half
  the rows (dropout masks drawn per microbatch): half the temporaries, which XLA:CPU gets afresh
  and the kernel zero-fills page by page every step (docs/performance.md, "System time");
- `torch_eager`: PyTorch, attention as matmuls and a softmax;
- `torch_eager_sdpa`: PyTorch with `F.scaled_dot_product_attention`.

PyTorch runs on the CPU; on a GPU machine the JAX variants run on the GPU, so compare JAX with
PyTorch only on a CPU machine. Not part of the library or of the tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmjax.models.build  # noqa: E402,F401  (imports every encoder and fusion module)
from mmjax.benchmarks import train_step as step_benchmark  # noqa: E402
from mmjax.experiment import Experiment  # noqa: E402
from mmjax.models import layers  # noqa: E402
from mmjax.training.optimizer import decay_mask, learning_rate_schedule  # noqa: E402

try:  # optional: without it only the JAX variants run (e.g. on a GPU machine without PyTorch)
    import torch

    from benchmarks import torch_model
except ImportError:
    torch = torch_model = None

_CONFIG = config_flags.DEFINE_config_file("config", os.path.normpath(step_benchmark._DEFAULT), "Experiment config.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round and variant.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Rounds; each times every variant once.")
_CHECK = flags.DEFINE_bool("check", True, "Assert equal outputs, losses and gradients first.")
_VARIANTS_FLAG = flags.DEFINE_list("variants", [], "Time only these variants (default: all).")
_OUT = flags.DEFINE_string("out", "", "Also write the results to this JSON file.")


class _AutodiffLayerNorm(nn.Module):
    """mmjax's LayerNorm forward, differentiated by autodiff."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        return layers._layer_norm_fwd(x, scale, bias, self.eps)[0]


def _textbook_attend(q, k, v, mask, num_heads, dtype):
    """Attention as usually written in JAX: heads as an axis, softmax, then the value matmul."""
    b, tq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], num_heads, d // num_heads)
    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)).astype(jnp.float32) / np.sqrt(d // num_heads)
    weights = jax.nn.softmax(jnp.where(mask[:, None], logits, layers._NEG), axis=-1)
    weights = weights * jnp.any(mask, axis=-1)[:, None, :, None]
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), split(v)).reshape(b, tq, d)
    return out, weights


def _flax_conv(features, kernel_size, stride=1, dtype=jnp.float32, name=None):
    return nn.Conv(features, (kernel_size,), strides=(stride,), dtype=dtype, name=name)


_VARIANTS = {
    "mmjax": {},
    "mmjax_accum2": {},  # mmjax's own layers, its step built with train.accum_steps=2
    "flax_layers": {"Dense": nn.Dense, "LayerNorm": functools.partial(nn.LayerNorm, epsilon=1e-6),
                    "Conv1D": _flax_conv, "_attend": _textbook_attend},
    "autodiff_layernorm": {"LayerNorm": _AutodiffLayerNorm},
}


_TORCH_VARIANTS = {"torch_eager": False, "torch_eager_sdpa": True}  # name: sdpa


@contextlib.contextmanager
def _layers(**replace):
    """Swaps the shared layers that mmjax's models look up at trace time."""
    modules = [mod for key, mod in sorted(sys.modules.items()) if key.startswith("mmjax.models.")]
    saved = [(mod, name, getattr(mod, name)) for mod in modules for name in replace if hasattr(mod, name)]
    try:
        for mod, name, _ in saved:
            setattr(mod, name, replace[name])
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _ms(seconds):
    return round(seconds * 1e3, 1)


def torch_step_fn(s, net, names):
    """One PyTorch training step on a fixed batch: forward, loss, backward, clip, AdamW. `names`:
    what `load_flax_params` returned when it loaded mmjax's initial parameters into `net`."""
    cfg = s.config.optimizer
    decays = {torch_model.torch_name(p): bool(d)
              for p, d in jax.tree_util.tree_flatten_with_path(decay_mask(s.state.params))[0]}
    named = dict(net.named_parameters())
    groups = [{"params": [named[n] for n in names if decays[n]], "weight_decay": cfg.weight_decay},
              {"params": [named[n] for n in names if not decays[n]], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.b1, cfg.b2), eps=1e-8)
    schedule = learning_rate_schedule(cfg, s.config.train.num_steps)
    lrs = np.asarray(schedule(np.arange(s.config.train.num_steps))).tolist()
    tb = torch_model.to_torch(s.host_batch)
    weights, aux_w = s.loss_weights, s.config.loss.modality_heads_weight
    step = [0]

    def run():
        for g in opt.param_groups:
            g["lr"] = lrs[step[0] % len(lrs)]
        opt.zero_grad(set_to_none=True)
        loss, _ = torch_model.joint_loss(net(tb, train=True), tb, s.tasks, weights, aux_w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_norm)
        opt.step()
        step[0] += 1
        return loss

    return run


def jax_step_fn(s, replace, train_step=None):
    """The compiled mmjax train step (`s`'s, or `train_step`) with `replace`d layers, on its own copy of
    the state."""
    train_step = train_step or s.train_step
    with _layers(**replace), step_benchmark.compilation_cache_off():
        # A new function object: jit caches traces by function, and this one must be traced anew
        # with the swapped layers.
        fn = jax.jit(lambda state, batch: train_step(state, batch), donate_argnums=0)
        t = time.perf_counter()
        compiled = fn.lower(s.state, s.batch).compile()
        compile_s = time.perf_counter() - t
    box = [jax.tree.map(jnp.copy, s.state)]

    def run():
        box[0], m = compiled(box[0], s.batch)
        return m["loss"]

    return run, compile_s


def main(argv):
    del argv
    config = _CONFIG.value
    chosen = set(_VARIANTS_FLAG.value or [*_VARIANTS, *(_TORCH_VARIANTS if torch else ())])
    unknown = chosen - {*_VARIANTS, *_TORCH_VARIANTS}
    if unknown or "mmjax" not in chosen:
        raise app.UsageError(f"--variants: unknown {sorted(unknown)}; 'mmjax' must be one of them")
    if _STEPS.value * _ROUNDS.value < 2:
        raise app.UsageError("time at least 2 steps per variant (--steps x --rounds)")
    if torch is None and chosen & set(_TORCH_VARIANTS):
        raise app.UsageError("the torch variants need PyTorch: pip install torch")
    s = step_benchmark.setup(config)
    result = {"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "jax": jax.__version__,
              "width": config.model.width, "batch_size": config.train.batch_size,
              "parameters": int(sum(x.size for x in jax.tree.leaves(s.state.params)))}
    if torch is not None:
        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        result.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), torch_device="cpu")
    nets = {name: torch_model.MultimodalModel(s.model, s.host_batch, sdpa=sdpa)
            for name, sdpa in _TORCH_VARIANTS.items() if name in chosen}
    loaded = {}
    for name, net in nets.items():
        loaded[name] = torch_model.load_flax_params(net, s.state.params)
        if _CHECK.value:
            result[f"check_{name}"] = torch_model.check_equivalence(s, net)
            print(f"{name}: same outputs, losses and gradients as mmjax", result[f"check_{name}"], flush=True)

    runs, compile_s = {}, {}
    for name, replace in _VARIANTS.items():
        if name not in chosen:
            continue
        train_step = None
        if name == "mmjax_accum2":
            accum = config.copy_and_resolve_references()
            accum.train.accum_steps = 2
            train_step = Experiment.from_config(accum).train_step()
        runs[name], compile_s[name] = jax_step_fn(s, replace, train_step)
    for name, net in nets.items():
        runs[name] = torch_step_fn(s, net, loaded[name])
    result["compile_s"] = {k: round(v, 2) for k, v in compile_s.items()}

    for run in runs.values():  # warm-up
        for _ in range(3):
            loss = run()
        _sync(loss)
    times = {name: [] for name in runs}
    for r in range(_ROUNDS.value):
        for name, run in runs.items():
            for _ in range(_STEPS.value):  # each step timed alone, so a burst of noise hits few steps
                t = time.perf_counter()
                _sync(run())
                times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{_ROUNDS.value}: " + ", ".join(
            f"{k} {statistics.median(v[-_STEPS.value:]) * 1e3:.1f} ms" for k, v in times.items()), flush=True)
    result["steps_timed"] = _ROUNDS.value * _STEPS.value
    result["step_ms_median"] = {k: _ms(statistics.median(v)) for k, v in times.items()}
    result["step_ms_p10_p90"] = {k: [_ms(q[0]), _ms(q[-1])] for k, v in times.items()
                                 for q in [statistics.quantiles(v, n=10)]}
    if nets:
        best_torch = min(result["step_ms_median"][k] for k in nets)
        result["mmjax_over_torch_best"] = round(result["step_ms_median"]["mmjax"] / best_torch, 3)
        for name in ("flax_layers", "mmjax_accum2"):
            if name in times:
                result[f"{name}_over_torch_best"] = round(result["step_ms_median"][name] / best_torch, 3)
    print(json.dumps(result))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=1)


def _sync(loss):
    if isinstance(loss, jax.Array):
        jax.block_until_ready(loss)
    else:
        loss.item()


if __name__ == "__main__":
    app.run(main)
