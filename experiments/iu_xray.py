r"""Indiana chest X-ray reports: indication + findings (two text modalities) -> Problems (multilabel).

    python launch.py --config=experiments/iu_xray.py --workdir=workdirs/iu_xray
    python launch.py --config=experiments/iu_xray.py:modalities=findings --workdir=workdirs/iu_findings
    python launch.py --config=experiments/iu_xray.py:modalities=indication --workdir=workdirs/iu_indication

The converter (`mmjax.data.public.iu_xray`) writes `../shared/data/iu_xray_reports` as a manifest with
the 10 most frequent Problems labels; the impression is left out (it states the answer). Splits by a
hash of the report id (80/10/10). No published figure for this exact task.

Results (2-core AMD EPYC CPU VM shared with other jobs, 2026-11-28, seed 0, 1,000 steps of 64,
27 min 9 s wall under load): indication + findings, test macro-AUROC 0.960, macro-AUPRC 0.750,
macro-F1 0.666 over the 10 labels; findings alone 0.959 / 0.803 / 0.535 (7 min 40 s), indication
alone 0.515 / 0.140 / 0.092 (7 min 39 s).
"""

from experiments.common import public_config, smoke


def get_config(arg=None):
    c, opts = public_config("iu_xray", "iu_xray_reports", arg)
    c.data.text_max_length = 96
    c.train.update(batch_size=64, num_steps=1000, eval_every=250, checkpoint_every=250)
    return smoke(c) if opts["smoke"] else c
