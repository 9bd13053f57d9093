"""FLOPs of a JAX function counted from its shapes: a walk over its jaxpr.

    counts = flops.count(fn, *args)   # {'matmul': ..., 'elementwise': ..., 'total': ...}

`matmul` counts dot_general and convolutions as 2 x multiply-adds (2 * prod(output) * contracted
size); `elementwise` one FLOP per output element of arithmetic ops, comparisons and conversions and
per input element of reductions, as XLA's HloCostAnalysis counts them; `transcendental` (exp, log,
tanh, sqrt, ...) apart, as XLA keeps them; data movement (reshape, transpose, broadcast, slice,
gather) costs nothing. `total` = matmul + elementwise, comparable with XLA's 'flops'. Sub-jaxprs are followed:
`scan` times its length, `cond` its costliest branch, a `while` loop once (its trip count is not
known from shapes; `loops` counts them). What the function computes, before XLA's own
simplifications: the analytic count that `fusion_scaling` checks against XLA's `cost_analysis`.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jcore

# One FLOP per output element, as XLA's HloCostAnalysis counts them (conversions included).
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign", "integer_pow", "square", "reciprocal",
    "select_n", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "floor", "ceil", "round",
    "is_finite", "nextafter", "add_any", "convert_element_type",
})
# Counted apart, as XLA does (its 'transcendentals'), one per output element.
_TRANSCENDENTAL = frozenset({"exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "erf",
                             "erfc", "erf_inv", "atan2", "pow", "sqrt", "rsqrt", "cbrt"})
# One FLOP per input element (XLA: one fewer per output element).
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
                         "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_KEYS = ("matmul", "elementwise", "transcendental", "loops")


def _size(aval) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def _dot_flops(eqn) -> int:
    lhs = eqn.invars[0].aval
    (contract, _), _ = eqn.params["dimension_numbers"]
    return 2 * _size(eqn.outvars[0].aval) * int(math.prod(lhs.shape[d] for d in contract))


def _conv_flops(eqn) -> int:
    rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
    out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2 * _size(out) * (_size(rhs) // out_features)


def _sub_jaxprs(eqn):
    """(jaxpr, times) of each sub-computation of `eqn` that runs."""
    p = eqn.params
    if eqn.primitive.name == "scan":
        return [(p["jaxpr"].jaxpr, int(p["length"]))]
    if eqn.primitive.name == "cond":
        return [("max", [b.jaxpr for b in p["branches"]])]
    if eqn.primitive.name == "while":
        return [(p["body_jaxpr"].jaxpr, 1), (p["cond_jaxpr"].jaxpr, 1)]
    subs = []
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in p:
            j = p[key]
            j = j() if callable(j) and not isinstance(j, (jcore.Jaxpr, jcore.ClosedJaxpr)) else j
            subs.append((getattr(j, "jaxpr", j), 1))
            break
    return subs


def _walk(jaxpr, counts: dict) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            counts["matmul"] += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            counts["matmul"] += _conv_flops(eqn)
        elif name in _ELEMENTWISE:
            counts["elementwise"] += _size(eqn.outvars[0].aval)
        elif name in _TRANSCENDENTAL:
            counts["transcendental"] += _size(eqn.outvars[0].aval)
        elif name in _REDUCTIONS:
            counts["elementwise"] += _size(eqn.invars[0].aval)
        if name == "while":
            counts["loops"] += 1
        for sub, times in _sub_jaxprs(eqn):
            if sub == "max":
                branches = []
                for b in times:
                    c = dict.fromkeys(_KEYS, 0)
                    _walk(b, c)
                    branches.append(c)
                best = max(branches, key=lambda c: c["matmul"] + c["elementwise"])
                for k in counts:
                    counts[k] += best[k]
                continue
            c = dict.fromkeys(_KEYS, 0)
            _walk(sub, c)
            for k in counts:
                counts[k] += times * c[k]


def count(fn, *args, **kwargs) -> dict:
    """{'matmul', 'elementwise', 'transcendental', 'total', 'loops'}: the FLOPs of `fn(*args, **kwargs)`
    from its jaxpr."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    counts = dict.fromkeys(_KEYS, 0)
    _walk(closed.jaxpr, counts)
    counts["total"] = counts["matmul"] + counts["elementwise"]
    return counts


def xla_flops(compiled) -> float | None:
    """XLA's own count (`cost_analysis()['flops']`) of a compiled function, or None where the backend
    gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (backends differ in what they support)
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    return float(analysis.get("flops", 0.0))
