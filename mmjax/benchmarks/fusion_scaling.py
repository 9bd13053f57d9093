r"""What each fusion costs and how the cost grows: tokens per modality, modalities, width, depth,
batch, dtype.

    python -m mmjax.benchmarks.fusion_scaling --out=fusion_scaling          # quick grid, a 2-core CPU
    python -m mmjax.benchmarks.fusion_scaling --full --out=fusion_scaling   # an accelerator
    python -m mmjax.benchmarks.fusion_scaling --fusions=cross_attention,perceiver --tokens=16,64,256,1024

Each registered fusion (`mmjax.models.fusion.FUSIONS`, a user's own included) runs alone, on random
tokens of every modality ([B, T, D], all valid), around a base point (`--base`), one setting varied at
a time: tokens per modality, number of modalities, width, depth, batch, dtype and device count (data
parallel, the batch per device fixed: where real accelerators exist; fake CPU devices share one
machine's cores and do not count, so a CPU run has 1). A point records:
compile time; the train step (forward, a sum-of-squares loss, gradients of the parameters and the
tokens, as an encoder below would need) and the forward pass alone, timed interleaved after a
warm-up (median, 10th and 90th percentiles, `block_until_ready`); examples/s; FLOPs per example
counted from the shapes (`mmjax/benchmarks/flops.py`) and XLA's `cost_analysis` of the same
executable (the ratio is a column); achieved FLOP/s and MFU against the device's peak (a table of
accelerators below; on a CPU a measured matmul ceiling, so that CPU MFU means something); memory
(the executable's memory analysis; on GPU also the device's peak so far); and a failure (out of memory,
anything else) as the row's `error`, never a crash of the sweep.

Outputs in `--out`: `fusion_scaling.csv` (a row per point, with the device and the versions of jax
and jaxlib), `growth.csv` (per fusion and axis: the fitted growth exponents of FLOPs and time, the
theory's, and whether they agree), PNG plots (time, memory and FLOPs against tokens, log-log, the
exponent in the legend; FLOPs against modalities), `fusion_scaling.md` and `index.html`. With
`--sweep_csv=W/sweep.csv` (a fusion sweep's table) also `pareto.png`: test metric against GFLOPs per
example, and the fusions on the Pareto front.

The theory each fusion is checked against (`GROWTH`): full joint cross-attention and pairwise
cross-modal attention grow as the square of the tokens; the bottleneck transformer (MBT) too, since
each modality keeps its own self-attention (only its cross-modal exchange, through a few bottleneck
tokens, is linear); Perceiver latents make it linear; pooled fusions (concat, sum, mean, gated,
late, weighted late, tensor, low-rank) pool each modality once (linear, and a small share) and then
cost nothing more per token. In modalities: tensor fusion grows exponentially (until its size guard
caps the outer product), pairwise cross-attention, joint cross-attention and the gated units (whose
gate network reads every modality to gate every modality) quadratically, the rest linearly.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mmjax.models.build  # noqa: F401  (registers every fusion)
from mmjax.benchmarks import flops
from mmjax.config import lower_is_better
from mmjax.models.fusion import FUSIONS

# Dense peak FLOP/s of known accelerators from the vendors' data sheets: bf16, fp32 without tensor cores,
# and TF32 (tensor cores), which XLA uses for float32 matmuls on a GPU unless the precision is 'highest'.
PEAKS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12, "tf32": 494.7e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12, "tf32": 494.7e12},  # SXM; PCIe: 756e12 / 51e12 / 378e12
    "A100": {"bfloat16": 312e12, "float32": 19.5e12, "tf32": 156e12},
    "L4": {"bfloat16": 121e12, "float32": 30.3e12, "tf32": 60e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 4},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 4},
}

# (kind, exponent) of the FLOPs' growth in tokens per modality and in the number of modalities.
GROWTH = {
    "cross_attention": {"tokens": ("quadratic", 2.0), "modalities": ("quadratic", 2.0)},
    "pairwise_cross": {"tokens": ("quadratic", 2.0), "modalities": ("quadratic", 2.0)},
    "bottleneck": {"tokens": ("quadratic", 2.0), "modalities": ("linear", 1.0)},
    "perceiver": {"tokens": ("linear", 1.0), "modalities": ("linear", 1.0)},
    # (tensor_dim + 1)^M features, until the size guard (32,768 features) shrinks tensor_dim: growth
    # within a step of M is what is checked, not past the cap
    "tensor": {"tokens": ("pooled", None), "modalities": ("exponential", None)},
    # the gate network reads all M pooled embeddings and writes M x D gate logits: M^2 D^2 weights
    "gated": {"tokens": ("pooled", None), "modalities": ("quadratic", 2.0)},
}
POOLED = ("pooled", None)
LINEAR_MODALITIES = ("linear", 1.0)

QUICK = dict(tokens=(16, 32, 64, 128, 256), modalities=(2, 3, 4, 5), widths=(32, 64, 128), depths=(1, 2, 4),
             batches=(4, 16), dtypes=("float32", "bfloat16"))
FULL = dict(tokens=(16, 64, 256, 1024, 4096), modalities=(2, 3, 4, 6, 8), widths=(128, 256, 512, 1024),
            depths=(1, 2, 4, 8), batches=(8, 32, 128), dtypes=("float32", "bfloat16"))
QUICK_BASE = dict(tokens=64, modalities=3, width=64, depth=2, batch=8, dtype="float32")
FULL_BASE = dict(tokens=256, modalities=4, width=512, depth=2, batch=32, dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class Point:
    fusion: str
    axis: str  # the setting varied from the base ('base' for the base itself)
    tokens: int
    modalities: int
    width: int
    depth: int
    batch: int  # examples per device
    dtype: str
    devices: int = 1  # data parallel over this many devices: the batch is `batch` per device


def device_counts(fake_ok: bool = False) -> tuple[int, ...]:
    """The device counts to scale over: 1, 2, 4, ... up to the devices at hand, where they are real
    accelerators; on a CPU only 1 (fake CPU devices share the same cores: they do not scale), unless
    `fake_ok` (tests)."""
    n = jax.device_count()
    if jax.devices()[0].platform == "cpu" and not fake_ok:
        return (1,)
    return tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n)


def expected(fusion: str, axis: str) -> tuple[str, float | None]:
    table = GROWTH.get(fusion, {})
    return table.get(axis, POOLED if axis == "tokens" else LINEAR_MODALITIES)


def grid(fusions, base: dict, values: dict) -> list[Point]:
    """The base point and, one at a time, each setting's other values, for every fusion."""
    axes = {"tokens": "tokens", "modalities": "modalities", "width": "widths", "depth": "depths",
            "batch": "batches", "dtype": "dtypes", "devices": "device_counts"}
    values = {"device_counts": (1,), **values}
    points, seen = [], {fusion: set() for fusion in fusions}
    # setting by setting, every fusion at each value: a sweep cut short (--max_minutes) has measured
    # the same settings of every fusion, not every setting of the first fusions
    for axis, key in [("base", None), *axes.items()]:
        for v in [None] if axis == "base" else values[key]:
            for fusion in fusions:
                p = Point(fusion, axis, **{**base, **({} if axis == "base" else {axis: v})})
                if dataclasses.astuple(p)[2:] not in seen[fusion]:
                    seen[fusion].add(dataclasses.astuple(p)[2:])
                    points.append(p)
    return points


def _inputs(p: Point):
    """Tokens and masks of the global batch (`batch` x `devices` rows), sharded over the devices."""
    rng = np.random.default_rng(0)
    rows = p.batch * p.devices
    tokens = {f"m{i}": rng.normal(size=(rows, p.tokens, p.width)).astype(np.float32) for i in range(p.modalities)}
    masks = {k: np.ones((rows, p.tokens), bool) for k in tokens}
    return jax.device_put((tokens, masks), _shardings(p.devices)[1])


def _shardings(devices: int):
    """(replicated, split on the batch axis) over a mesh of the first `devices` devices."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def _functions(p: Point):
    module = FUSIONS.get(p.fusion)(width=p.width, num_heads=max(1, p.width // 32), depth=p.depth,
                                   dtype=jnp.dtype(p.dtype))

    def forward(params, tokens, masks):
        fused, fused_mask, _ = module.apply(params, tokens, masks)
        return fused

    def loss(params, tokens, masks):
        return jnp.sum(jnp.square(forward(params, tokens, masks).astype(jnp.float32)))

    train = jax.grad(loss, argnums=(0, 1))
    return module, forward, train


def _timed(fn, args, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return times


def _quantiles(times):
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[0], q[-1]


def memory(compiled) -> dict:
    """The compiled executable's memory analysis in bytes (temporaries, arguments, outputs, their total)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (backends differ in what they support)
        m = None
    if m is None:
        return {}
    get = lambda name: int(getattr(m, name, 0) or 0)
    return {"temp_bytes": get("temp_size_in_bytes"), "argument_bytes": get("argument_size_in_bytes"),
            "output_bytes": get("output_size_in_bytes"),
            "executable_bytes": get("temp_size_in_bytes") + get("argument_size_in_bytes")
            + get("output_size_in_bytes") - get("alias_size_in_bytes")}


def peak_flops(dtype: str, device=None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) of `device` for `dtype`: the data sheet of a known
    accelerator, else a measured matmul ceiling (a CPU's, so that its MFU means something)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peaks in PEAKS.items():
        if name.lower() in kind.lower():
            precision = str(jax.config.jax_default_matmul_precision or "").lower()
            if dtype == "float32" and "tf32" in peaks and precision not in ("highest", "float32"):
                return peaks["tf32"], f"data sheet: {name}, TF32 (XLA's float32 matmuls on a GPU)"
            return peaks[dtype], f"data sheet: {name}"
    return matmul_ceiling(dtype), "measured matmul ceiling"


_CEILINGS: dict = {}


def matmul_ceiling(dtype: str, n: int = 1024, repeats: int = 7) -> float:
    """The best FLOP/s of an n x n matmul in `dtype` on the default device (median of `repeats`)."""
    if dtype not in _CEILINGS:
        a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
        f = jax.jit(lambda x, y: x @ y)
        jax.block_until_ready(f(a, a))
        _CEILINGS[dtype] = 2 * n**3 / statistics.median(_timed(f, (a, a), repeats))
    return _CEILINGS[dtype]


def measure(p: Point, repeats: int = 5, warmup: int = 2) -> dict:
    """One point's row: costs and times, or the `error` that stopped it."""
    row = dataclasses.asdict(p)
    try:
        module, forward, train = _functions(p)
        tokens, masks = _inputs(p)
        params = jax.device_put(jax.jit(module.init)(jax.random.PRNGKey(0), tokens, masks), _shardings(p.devices)[0])
        functions = {"train": train, "forward": forward}
        counted = {what: flops.count(fn, params, tokens, masks) for what, fn in functions.items()}
        t = time.perf_counter()
        compiled = {what: jax.jit(fn).lower(params, tokens, masks).compile() for what, fn in functions.items()}
        row["compile_s"] = round(time.perf_counter() - t, 3)
        xla = flops.xla_flops(compiled["train"])
        args = (params, tokens, masks)
        for fn in compiled.values():
            _timed(fn, args, warmup)
        times = {"train": [], "forward": []}
        for _ in range(repeats):  # interleaved: drift and noise hit both alike
            for what, fn in compiled.items():
                times[what] += _timed(fn, args, 1)
        for what, ts in times.items():
            median, p10, p90 = _quantiles(ts)
            row.update({f"{what}_ms": round(median * 1e3, 4), f"{what}_ms_p10": round(p10 * 1e3, 4),
                        f"{what}_ms_p90": round(p90 * 1e3, 4)})
        train_s = statistics.median(times["train"])
        peak, source = peak_flops(p.dtype)
        peak *= p.devices
        rows = p.batch * p.devices  # the global batch
        # XLA's count is of one device's program (its share of the batch)
        xla = None if xla is None else xla * p.devices
        row.update({
            "examples_per_s": round(rows / train_s, 2),
            "train_flops_per_example": counted["train"]["total"] / rows,
            "train_matmul_flops_per_example": counted["train"]["matmul"] / rows,
            "forward_flops_per_example": counted["forward"]["total"] / rows,
            "xla_train_flops_per_example": None if xla is None else xla / rows,
            "analytic_over_xla": None if not xla else round(counted["train"]["total"] / xla, 4),
            "achieved_tflops": round(counted["train"]["total"] / train_s / 1e12, 6),
            "peak_tflops": round(peak / 1e12, 4), "peak_source": source,
            "mfu": round(counted["train"]["matmul"] / train_s / peak, 6),
            "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
            **memory(compiled["train"]),
        })
        stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
        if stats and "peak_bytes_in_use" in stats:  # the process's peak so far (JAX cannot reset it)
            row["device_peak_bytes_so_far"] = int(stats["peak_bytes_in_use"])
        row["error"] = ""
    except Exception as e:  # noqa: BLE001  (an out-of-memory or any failure is the row's value)
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return row


def fit_exponent(xs, ys) -> tuple[float | None, float | None]:
    """(least-squares slope of log y on log x over all points, slope of the last two points)."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pts) < 2:
        return None, None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    slope = float(np.polyfit(lx, ly, 1)[0])
    last = float((ly[-1] - ly[-2]) / (lx[-1] - lx[-2]))
    return round(slope, 3), round(last, 3)


def polynomial_shares(xs, ys) -> tuple[float, float] | None:
    """The FLOPs of a fusion are a polynomial in tokens (or modalities): fitted as a + b x + c x^2 over
    >= 3 points, the shares of the x and x^2 terms in the largest point's count. None: too few points."""
    if len(xs) < 3:
        return None
    c, b, _ = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 2)
    top, y = float(max(xs)), float(ys[int(np.argmax(xs))])
    return round(float(b * top / y), 4), round(float(c * top * top / y), 4)


# Below this share a polynomial term is taken as absent; at or above QUADRATIC_SHARE, as present.
ABSENT_SHARE, QUADRATIC_SHARE = 0.01, 0.05
# Train FLOPs per added token and feature of each modality below which the per-token part is pooling
# (a masked mean and its gradient: a few FLOPs per value), not a computation on every token.
POOLING_FLOPS = 20.0


def measured_kind(axis: str, xs, ys, modalities: int, width: int) -> str | None:
    """How the FLOPs grow, from the points: 'quadratic', 'linear', 'pooled' (tokens: linear with only
    pooling's few FLOPs per value), 'exponential' (modalities: faster than a cubic over a step, log-log
    slope > 3), or None (too few points)."""
    steps = [math.log(b / a) / math.log(x1 / x0) for (x0, a), (x1, b) in zip(zip(xs, ys), zip(xs[1:], ys[1:]))
             if a > 0 and b > 0 and x1 > x0]
    if axis == "modalities" and steps and max(steps) > 3.0:
        return "exponential"
    shares = polynomial_shares(xs, ys)
    if shares is None:
        return None
    linear, quadratic = shares
    if quadratic >= QUADRATIC_SHARE:
        return "quadratic"
    if abs(quadratic) > ABSENT_SHARE:
        return "between linear and quadratic"
    if axis == "tokens":
        per_value = linear * ys[int(np.argmax(xs))] / max(xs) / (modalities * width)
        return "pooled" if per_value < POOLING_FLOPS else "linear"
    return "linear"


def growth(rows: list[dict]) -> list[dict]:
    """Per fusion and axis (tokens, modalities): the fitted exponents of FLOPs and train time, the theory's."""
    out = []
    for fusion in sorted({r["fusion"] for r in rows}):
        for axis in ("tokens", "modalities"):
            pts = sorted((r for r in rows if r["fusion"] == fusion and r["axis"] in (axis, "base") and not r["error"]),
                         key=lambda r: r[axis])
            pts = [r for r in pts if all(r[k] == pts[0][k] for k in ("width", "depth", "batch", "dtype", "devices"))]
            xs = [r[axis] for r in pts]
            fl = [r["train_flops_per_example"] for r in pts]
            slope, last = fit_exponent(xs, fl)
            t_slope, t_last = fit_exponent(xs, [r["train_ms"] for r in pts])
            kind, _ = expected(fusion, axis)
            measured = measured_kind(axis, xs, fl, pts[0]["modalities"] if pts else 0, pts[0]["width"] if pts else 0)
            shares = polynomial_shares(xs, fl) or (None, None)
            out.append({"fusion": fusion, "axis": axis, "points": len(pts), "theory": kind, "measured": measured,
                        "agrees": None if measured is None else measured == kind,
                        "linear_share": shares[0], "quadratic_share": shares[1],
                        "flops_exponent": slope, "flops_exponent_last": last, "time_exponent": t_slope,
                        "time_exponent_last": t_last})
    return out


def _write_csv(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def plots(rows: list[dict], out: str) -> list[str]:
    """log-log plots of time, memory and FLOPs against tokens, and FLOPs against modalities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = [("tokens", "train_ms", "train step (ms)"), ("tokens", "executable_bytes", "executable memory (bytes)"),
              ("tokens", "train_flops_per_example", "train FLOPs per example"),
              ("modalities", "train_flops_per_example", "train FLOPs per example")]
    for axis, key, label in panels:
        fig, ax = plt.subplots(figsize=(7, 5))
        for fusion in sorted({r["fusion"] for r in rows}):
            pts = sorted((r for r in rows if r["fusion"] == fusion and r["axis"] in (axis, "base") and not r["error"]
                          and r.get(key)), key=lambda r: r[axis])
            if len(pts) < 2:
                continue
            slope, _ = fit_exponent([r[axis] for r in pts], [r[key] for r in pts])
            ax.plot([r[axis] for r in pts], [r[key] for r in pts], marker="o", label=f"{fusion} (x^{slope:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens per modality" if axis == "tokens" else "modalities")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        name = f"{key}_vs_{axis}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def pareto(sweep_csv: str, out: str) -> tuple[str, str]:
    """The sweep's accuracy against its cost: test metric (mean, std as error bars) against GFLOPs per
    example, log x, the Pareto front (no fusion both cheaper and better) drawn and listed. Returns
    (the PNG's name, a Markdown table). `sweep_csv`: `WORKDIR/sweep.csv` of `mmjax.training.sweep`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    with open(sweep_csv) as f:
        rows = list(csv.DictReader(f))
    mean_key = next((k for k in rows[0] if k.endswith("_mean")), None) if rows else None
    if mean_key is None or "gflops_per_example" not in rows[0]:
        raise ValueError(f"{sweep_csv}: not a sweep table (needs a '<metric>_mean' and a 'gflops_per_example' column)")
    metric = mean_key[:-len("_mean")]
    pts = sorted(({"fusion": r["fusion"], "gflops": float(r["gflops_per_example"]), "mean": float(r[mean_key]),
                   "std": float(r.get(f"{metric}_std") or 0.0)} for r in rows), key=lambda r: (r["gflops"], -r["mean"]))
    lower = lower_is_better(metric)
    front, best = [], None
    for r in pts:  # by cost: a fusion is on the front when it beats every cheaper one
        if best is None or (r["mean"] < best if lower else r["mean"] > best):
            front.append(r)
            best = r["mean"]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.errorbar([r["gflops"] for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts], fmt="o",
                color="tab:blue", ecolor="lightgray", capsize=3)
    # labels of fusions close on the plot (cost within 5%, metric within a tenth of the range) go one below
    # the other, ordered by metric
    span = (max(r["mean"] for r in pts) - min(r["mean"] for r in pts)) or 1.0
    groups: list[list[dict]] = []
    for r in sorted(pts, key=lambda r: (r["gflops"], -r["mean"])):
        near = next((g for g in groups if r["gflops"] <= g[0]["gflops"] * 1.05
                     and abs(r["mean"] - g[-1]["mean"]) <= 0.1 * span), None)
        (near.append(r) if near is not None else groups.append([r]))
    for g in groups:
        for k, c in enumerate(sorted(g, key=lambda c: -c["mean"])):
            ax.annotate(c["fusion"], (c["gflops"], c["mean"]), fontsize=7, textcoords="offset points",
                        xytext=(6, 3 - 9 * k) if len(g) > 1 else (3, 3))
    ax.plot([r["gflops"] for r in front], [r["mean"] for r in front], color="tab:red", label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("GFLOPs per example (train step)")
    ax.set_ylabel(f"test {metric}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pareto.png"), dpi=110)
    plt.close(fig)
    lines = [f"## Accuracy per FLOP: {sweep_csv}", "", f"| fusion | GFLOPs / example | test {metric} | on the front |",
             "|---|---|---|---|"]
    names = {r["fusion"] for r in front}
    lines += [f"| {r['fusion']} | {r['gflops']:.4f} | {r['mean']:.3f} ± {r['std']:.3f} | "
              f"{'yes' if r['fusion'] in names else ''} |" for r in pts]
    return "pareto.png", "\n".join(lines) + "\n"


def markdown(rows: list[dict], grown: list[dict], info: dict) -> str:
    base = [r for r in rows if r["axis"] == "base"]
    lines = [f"# Fusion scaling: {info['device']} ({info['date']}, jax {info['jax']})", "",
             "## The base point: " + ", ".join(f"{k} {v}" for k, v in info["base"].items()), "",
             "| fusion | train ms | forward ms | examples/s | MFLOPs/example (train) | analytic / XLA | MFU | "
             "memory MiB | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(base, key=lambda r: r.get("train_flops_per_example") or 0):
        if r["error"]:
            lines.append(f"| {r['fusion']} | {r['error']} |||||||")
            continue
        lines.append(f"| {r['fusion']} | {r['train_ms']:.3f} | {r['forward_ms']:.3f} | {r['examples_per_s']:.0f} | "
                     f"{r['train_flops_per_example'] / 1e6:.3f} | {r['analytic_over_xla']} | {r['mfu']:.3f} | "
                     f"{r.get('executable_bytes', 0) / 2**20:.2f} | {r['compile_s']:.2f} |")
    lines += ["", "## Growth of the FLOPs (and the time) against theory", "",
              "The FLOPs are fitted as a + b x + c x^2; the shares are those of the x and x^2 terms at the largest",
              "point. The exponents are log-log slopes (a fit over the points; the last step), FLOPs and time.", "",
              "| fusion | axis | theory | measured | x, x^2 shares | FLOPs exponent | time exponent | agrees |",
              "|---|---|---|---|---|---|---|---|"]
    for g in grown:
        mark = {True: "yes", False: "**NO**", None: "-"}[g["agrees"]]
        lines.append(f"| {g['fusion']} | {g['axis']} | {g['theory']} | {g['measured']} | {g['linear_share']}, "
                     f"{g['quadratic_share']} | {g['flops_exponent']}; {g['flops_exponent_last']} | "
                     f"{g['time_exponent']}; {g['time_exponent_last']} | {mark} |")
    scaled = [r for r in rows if r["axis"] == "devices" and not r["error"]]
    if scaled:
        lines += ["", "## Data parallel over devices (the batch per device fixed)", "",
                  "| fusion | devices | examples/s | efficiency (examples/s over devices x one device's) |",
                  "|---|---|---|---|"]
        one = {r["fusion"]: r["examples_per_s"] for r in rows if r["axis"] == "base" and not r["error"]}
        for r in sorted(scaled, key=lambda r: (r["fusion"], r["devices"])):
            eff = r["examples_per_s"] / (r["devices"] * one[r["fusion"]]) if r["fusion"] in one else float("nan")
            lines.append(f"| {r['fusion']} | {r['devices']} | {r['examples_per_s']:.0f} | {eff:.2f} |")
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", f"{len(failed)} points failed: " + "; ".join(f"{r['fusion']} {r['axis']}={r[r['axis']]}: "
                                                                   f"{r['error']}" for r in failed[:10])]
    return "\n".join(lines) + "\n"


def html(md: str, images: list[str], out: str) -> str:
    """One page: the tables (as preformatted Markdown) and the plots, embedded."""
    import html as h

    figs = "".join(f'<figure><img src="data:image/png;base64,'
                   f'{base64.b64encode(open(os.path.join(out, name), "rb").read()).decode()}" width="640">'
                   f"<figcaption>{h.escape(name)}</figcaption></figure>" for name in images)
    page = (f"<!doctype html><meta charset='utf-8'><title>Fusion scaling</title>"
            f"<style>body{{font-family:sans-serif;max-width:1400px;margin:auto}} figure{{display:inline-block}}"
            f"</style><pre>{h.escape(md)}</pre>{figs}")
    path = os.path.join(out, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="fusion_scaling", help="the folder of the CSV, plots and pages")
    parser.add_argument("--full", action="store_true", help="the accelerator grid (default: a quick CPU grid)")
    parser.add_argument("--fusions", default="", help="comma-separated (default: every registered fusion)")
    for key in ("tokens", "modalities", "widths", "depths", "batches"):
        parser.add_argument(f"--{key}", default="", help=f"comma-separated {key} (default: the grid's)")
    parser.add_argument("--dtypes", default="", help="comma-separated: float32, bfloat16")
    parser.add_argument("--devices", default="", help="comma-separated device counts, data parallel with the batch "
                        "per device (default: 1, 2, 4, ... up to the accelerators at hand; 1 on a CPU, whose fake "
                        "devices share its cores)")
    parser.add_argument("--base", default="", help="the base point, e.g. tokens=64,modalities=3,width=64")
    parser.add_argument("--sweep_csv", default="", help="a fusion sweep's sweep.csv: also plot its test metric "
                        "against GFLOPs per example, with the Pareto front (pareto.png)")
    parser.add_argument("--max_minutes", type=float, default=0.0, help="stop taking new points after this "
                        "long and write what was measured (0: no limit); the CSV is also rewritten after every point")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    a = parser.parse_args(argv)
    values, base = dict(FULL if a.full else QUICK), dict(FULL_BASE if a.full else QUICK_BASE)
    for key in ("tokens", "modalities", "widths", "depths", "batches"):
        if getattr(a, key):
            values[key] = _ints(getattr(a, key))
    if a.dtypes:
        values["dtypes"] = tuple(a.dtypes.split(","))
    values["device_counts"] = _ints(a.devices) if a.devices else device_counts()
    if max(values["device_counts"]) > jax.device_count():
        parser.error(f"--devices: {max(values['device_counts'])} devices asked, {jax.device_count()} at hand")
    for item in filter(None, a.base.split(",")):
        k, _, v = item.partition("=")
        if k not in base:
            parser.error(f"--base: unknown setting {k!r}; choose from {sorted(base)}")
        base[k] = v if k == "dtype" else int(v)
    fusions = a.fusions.split(",") if a.fusions else FUSIONS.names()
    unknown = sorted(set(fusions) - set(FUSIONS.names()))
    if unknown:
        parser.error(f"--fusions: unknown {unknown}; registered: {FUSIONS.names()}")
    os.makedirs(a.out, exist_ok=True)
    import jaxlib

    device = jax.devices()[0]
    info = {"device": getattr(device, "device_kind", str(device)), "platform": device.platform,
            "devices": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "date": time.strftime("%Y-%m-%d"), "base": base}
    points = grid(fusions, base, values)
    print(f"{len(points)} points ({len(fusions)} fusions) on {info['device']}", flush=True)
    rows, start = [], time.perf_counter()
    for i, p in enumerate(points):
        if a.max_minutes and i and time.perf_counter() - start > 60 * a.max_minutes:  # at least one point
            print(f"--max_minutes={a.max_minutes} reached: {len(points) - i} of {len(points)} points not measured",
                  flush=True)
            break
        row = {**measure(p, a.repeats, a.warmup), "device": info["device"], "jax": info["jax"],
               "jaxlib": info["jaxlib"]}
        rows.append(row)
        _write_csv(os.path.join(a.out, "fusion_scaling.csv"), rows)  # what was measured survives a kill
        elapsed = time.perf_counter() - start
        what = row["error"] or (f"train {row['train_ms']:.2f} ms, {row['train_flops_per_example'] / 1e6:.2f} "
                                f"MFLOPs/example, analytic/XLA {row['analytic_over_xla']}")
        print(f"[{i + 1}/{len(points)}] {p.fusion} {p.axis}={getattr(p, p.axis, '')}: {what}  "
              f"(ETA {elapsed / (i + 1) * (len(points) - i - 1):.0f} s)", flush=True)
    grown = growth(rows)
    _write_csv(os.path.join(a.out, "fusion_scaling.csv"), rows)
    _write_csv(os.path.join(a.out, "growth.csv"), grown)
    try:
        images = plots(rows, a.out)
    except ImportError as e:  # a bare accelerator image may lack matplotlib: the tables still come
        print(f"No plots ({e}): pip install matplotlib", flush=True)
        images = []
    md = markdown(rows, grown, info)
    if a.sweep_csv:
        image, table = pareto(a.sweep_csv, a.out)
        images.append(image)
        md += "\n" + table
    with open(os.path.join(a.out, "fusion_scaling.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, "run.json"), "w") as f:
        json.dump({**info, "points": len(rows), "planned": len(points), "failed": sum(bool(r["error"]) for r in rows),
                   "seconds": round(time.perf_counter() - start, 1)}, f, indent=1)
    html(md, images, a.out)
    print(md)
    disagree = [g for g in grown if g["agrees"] is False]
    if disagree:
        print("Growth unlike the theory: " + "; ".join(f"{g['fusion']} in {g['axis']} (theory {g['theory']}, "
                                                       f"measured {g['measured']})" for g in disagree))
    print(f"Written to {a.out}: fusion_scaling.csv, growth.csv, fusion_scaling.md, index.html, "
          f"{', '.join(images)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
