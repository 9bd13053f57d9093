"""The fusion scaling benchmark (`mmjax/benchmarks/fusion_scaling.py`): FLOPs counted from the shapes
agree with XLA's count for every fusion; a tiny grid runs end to end, writes every column and file,
and finds each fusion's growth where its theory puts it."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.benchmarks import flops, fusion_scaling
from mmjax.models.fusion import FUSIONS


def test_counted_flops_of_simple_functions_are_exact():
    x, w = jnp.ones((3, 5, 7)), jnp.ones((7, 11))
    assert flops.count(lambda x, w: x @ w, x, w)["matmul"] == 2 * 3 * 5 * 11 * 7
    counted = flops.count(lambda x: jnp.sum(jnp.exp(x) * 2.0), x)
    assert (counted["elementwise"], counted["transcendental"]) == (2 * x.size, x.size)  # mul + reduce; exp apart
    scanned = flops.count(lambda w: jax.lax.scan(lambda c, _: (c @ w[:, :7], None), jnp.ones((2, 7)), None,
                                                 length=4)[0], jnp.ones((7, 7)))
    assert scanned["matmul"] == 4 * 2 * 2 * 7 * 7  # the body times the scan's length


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_counted_flops_agree_with_xla_for_every_fusion(fusion):
    """Forward and train step (gradients of parameters and tokens), within 15% of `cost_analysis`."""
    p = fusion_scaling.Point(fusion, "base", tokens=16, modalities=3, width=32, depth=2, batch=2, dtype="float32")
    module, forward, train = fusion_scaling._functions(p)
    tokens, masks = fusion_scaling._inputs(p)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), tokens, masks)
    for fn in (forward, train):
        counted = flops.count(fn, params, tokens, masks)["total"]
        xla = flops.xla_flops(jax.jit(fn).lower(params, tokens, masks).compile())
        assert xla and counted == pytest.approx(xla, rel=0.15), (fusion, counted, xla)


def test_a_tiny_grid_runs_end_to_end_and_finds_each_growth(tmp_path, capsys):
    fusions = ("cross_attention", "perceiver", "tensor")
    code = fusion_scaling.main([f"--out={tmp_path}", f"--fusions={','.join(fusions)}", "--tokens=8,32",
                                "--modalities=2,4", "--widths=16", "--depths=1", "--batches=2", "--dtypes=float32",
                                "--base=tokens=16,modalities=3,width=16,depth=1,batch=2", "--repeats=2",
                                "--warmup=1"])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "fusion_scaling.csv")))
    assert len(rows) == 3 * 5 and not any(r["error"] for r in rows)  # base, 2 token and 2 modality points each
    for column in ("compile_s", "train_ms", "train_ms_p10", "train_ms_p90", "forward_ms", "examples_per_s",
                   "train_flops_per_example", "xla_train_flops_per_example", "analytic_over_xla", "achieved_tflops",
                   "peak_tflops", "mfu", "executable_bytes", "parameters"):
        values = [float(r[column]) for r in rows]
        assert all(np.isfinite(values)) and all(v > 0 for v in values), column
    assert {r["jax"] for r in rows} == {jax.__version__} and all(r["jaxlib"] and r["device"] for r in rows)
    for r in rows:
        assert 0.85 <= float(r["analytic_over_xla"]) <= 1.15, r
        assert float(r["train_ms_p10"]) <= float(r["train_ms"]) <= float(r["train_ms_p90"])
    base = {r["fusion"]: r for r in rows if r["axis"] == "base"}
    assert float(base["cross_attention"]["train_flops_per_example"]) > float(base["tensor"]["train_flops_per_example"])

    grown = {(g["fusion"], g["axis"]): g for g in csv.DictReader(open(tmp_path / "growth.csv"))}
    expected = {("cross_attention", "tokens"): "quadratic", ("cross_attention", "modalities"): "quadratic",
                ("perceiver", "tokens"): "linear", ("perceiver", "modalities"): "linear",
                ("tensor", "tokens"): "pooled", ("tensor", "modalities"): "exponential"}
    for key, kind in expected.items():
        assert (grown[key]["theory"], grown[key]["measured"], grown[key]["agrees"]) == (kind, kind, "True"), key
    for name in ("fusion_scaling.md", "index.html", "run.json", "train_ms_vs_tokens.png",
                 "executable_bytes_vs_tokens.png", "train_flops_per_example_vs_tokens.png",
                 "train_flops_per_example_vs_modalities.png"):
        assert (tmp_path / name).stat().st_size > 100, name
    assert json.loads((tmp_path / "run.json").read_text())["failed"] == 0
    assert "Growth unlike the theory" not in capsys.readouterr().out


def test_a_failing_point_is_a_row_not_a_crash():
    row = fusion_scaling.measure(fusion_scaling.Point("cross_attention", "base", tokens=8, modalities=2, width=16,
                                                      depth=1, batch=2, dtype="float5"))  # an out-of-memory alike
    assert row["error"].startswith("TypeError") and "float5" in row["error"] and "train_ms" not in row


def test_the_measured_kind_of_known_polynomials():
    xs = [16, 32, 64]
    assert fusion_scaling.measured_kind("tokens", xs, [1000 + 5 * x * x for x in xs], 2, 8) == "quadratic"
    assert fusion_scaling.measured_kind("tokens", xs, [1000 + 500 * x for x in xs], 2, 8) == "linear"
    assert fusion_scaling.measured_kind("tokens", xs, [1000 + 3 * 2 * 8 * x for x in xs], 2, 8) == "pooled"
    ms = [2, 3, 4]
    assert fusion_scaling.measured_kind("modalities", ms, [17.0**m for m in ms], 2, 8) == "exponential"
    assert fusion_scaling.measured_kind("modalities", ms, [10 + 7 * m for m in ms], 2, 8) == "linear"


def test_the_pareto_front_of_a_sweep_table(tmp_path):
    table = tmp_path / "sweep.csv"
    table.write_text("fusion,macro_auroc_mean,macro_auroc_std,per_seed,parameters,gflops_per_example\n"
                     "concat,0.80,0.01,,1,0.010\nsum,0.78,0.01,,1,0.008\ncross_attention,0.85,0.02,,1,0.500\n"
                     "tensor,0.79,0.01,,1,0.020\nperceiver,0.84,0.01,,1,0.900\n")
    image, md = fusion_scaling.pareto(str(table), str(tmp_path))
    front = [line.split("|")[1].strip() for line in md.splitlines() if line.endswith("| yes |")]
    assert front == ["sum", "concat", "cross_attention"]  # tensor: dearer and worse than concat; perceiver too
    assert (tmp_path / image).stat().st_size > 1000


def test_the_device_axis_shards_the_batch_and_counts_only_real_devices(tmp_path):
    """Fake CPU devices share the machine's cores: the default device axis on a CPU is 1 alone. Asked
    for explicitly (as on an accelerator), a point on 2 devices splits a global batch of 2 x the batch
    over them: per-example FLOPs as on one device, XLA's per-device count scaled to the whole, and a row
    in the Markdown's device table."""
    assert jax.device_count() == 8 and fusion_scaling.device_counts() == (1,)
    assert fusion_scaling.device_counts(fake_ok=True) == (1, 2, 4, 8)
    code = fusion_scaling.main([f"--out={tmp_path}", "--fusions=concat", "--tokens=8", "--modalities=2",
                                "--widths=16", "--depths=1", "--batches=2", "--dtypes=float32", "--devices=1,2",
                                "--base=tokens=8,modalities=2,width=16,depth=1,batch=2", "--repeats=2", "--warmup=1"])
    assert code == 0
    rows = {r["axis"]: r for r in csv.DictReader(open(tmp_path / "fusion_scaling.csv"))}
    assert set(rows) == {"base", "devices"} and not rows["devices"]["error"]
    one, two = rows["base"], rows["devices"]
    assert (one["devices"], two["devices"]) == ("1", "2")
    # (the parameters' share, fixed per step, is spread over twice the rows: 0.1% here)
    assert float(two["train_flops_per_example"]) == pytest.approx(float(one["train_flops_per_example"]), rel=0.01)
    assert 0.85 <= float(two["analytic_over_xla"]) <= 1.15
    assert float(two["peak_tflops"]) == pytest.approx(2 * float(one["peak_tflops"]), rel=1e-3)
    assert "| concat | 2 |" in (tmp_path / "fusion_scaling.md").read_text()
    with pytest.raises(SystemExit):
        fusion_scaling.main([f"--out={tmp_path}", "--devices=1,16"])


def test_a_time_limit_writes_what_was_measured(tmp_path, capsys):
    """`--max_minutes` stops taking points and still writes every output from the rows measured."""
    code = fusion_scaling.main([f"--out={tmp_path}", "--fusions=concat,mean", "--tokens=8,16", "--modalities=2",
                                "--widths=16", "--depths=1", "--batches=2", "--dtypes=float32", "--repeats=1",
                                "--base=tokens=8,modalities=2,width=16,depth=1,batch=2", "--warmup=1",
                                "--max_minutes=1e-9"])
    assert code == 0 and "--max_minutes=1e-09 reached: 3 of 4 points not measured" in capsys.readouterr().out
    assert len(list(csv.DictReader(open(tmp_path / "fusion_scaling.csv")))) == 1
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["points"], run["planned"]) == (1, 4) and (tmp_path / "index.html").exists()
