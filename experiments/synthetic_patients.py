r"""Default experiment: multimodal diagnosis on the embedded `synthetic_patients` dataset.

    python launch.py --workdir=workdirs/xattn                                  # this file, defaults
    python launch.py --config=experiments/synthetic_patients.py:fusion=concat --workdir=workdirs/concat
    python launch.py --config=experiments/synthetic_patients.py:modalities=image --workdir=workdirs/image
    python launch.py --config=experiments/synthetic_patients.py:smoke --workdir=/tmp/smoke

Arguments after the colon, comma-separated: `fusion=<name>` (any registered fusion:
`mmjax.models.fusion.FUSIONS.names()`), `modalities=<image+text+tabular+signal>` (any subset of the
dataset's modalities, `+`-separated), `smoke` (a tiny run for tests). Any field (every one, with its
default: `base_config` in experiments/common.py) can be overridden: `--config.train.num_steps=500`,
`--config.model.dtype=bfloat16`.

Results (test split, seed 0, 2-core AMD EPYC CPU VM, 2026-11-23; README has per-condition
figures). macro_auroc over 5 diagnoses + mortality:
    image 0.718, text 0.761, tabular 0.811, signal 0.609 (each alone);
    concat 0.894, late 0.897, cross_attention 0.868 (all four modalities).
The default run took 3 min 50 s wall including evaluation (peak RSS 1.71 GB), ~7.5 steps/s.
Since 2026-11-28 cross_attention has `fusion.skip` and `fusion.cross_gate`, and since 2026-11-29 the
mortality loss weight is 0.1 (README, "Cross-attention versus concat"): over seeds 0-2, test macro_auroc
cross_attention 0.904 +- 0.005 (diagnoses 0.926), concat 0.901 +- 0.002 (0.924); seed 0, the default
run: 0.907, diagnoses 0.933 (5-16 min a run on a CPU shared with other jobs).
"""

from experiments.common import base_config, parse_arg, smoke


def get_config(arg=None):
    opts = parse_arg(arg, {"fusion": "cross_attention", "modalities": ""})
    c = base_config(opts["fusion"], opts["modalities"])
    # Severity's loss is on the standardized score (sd 1.83): 0.67 ~ 0.2 * 1.83^2, the weight that the
    # raw-unit loss of the 2026-11-23 results had. Mortality 0.1 (0.5 before 2026-11-29): at 0.5 the shared
    # layers fit the noisy mortality label, whose validation AUROC fell from ~0.82 at step 500 to ~0.70 at
    # 1,500, and the best checkpoint traded the diagnoses for it; at 0.1 it holds ~0.81 and both fusions
    # gain (README, "Cross-attention versus concat").
    c.loss.weights = "diagnosis=1.0,severity=0.67,mortality=0.1"
    if opts["smoke"]:
        smoke(c, num_steps=6, every=3, warmup_steps=2, eval_batch_size=48)
        c.data.update(config="tiny", text_max_length=48)
    return c
