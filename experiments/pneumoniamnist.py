r"""PneumoniaMNIST (MedMNIST v2, 28x28 chest X-rays) -> pneumonia, through the manifest path.

    python launch.py --config=experiments/pneumoniamnist.py --workdir=workdirs/pneumoniamnist

The converter (`mmjax.data.public.pneumoniamnist`) writes each image of `../shared/data/pneumoniamnist`
as a PNG and a manifest with the published train/validation/test split; `--config.data.source_dir`
points elsewhere. One modality, so the fusion is the identity here: this checks the image path on
real data against a published figure (MedMNIST v2, Yang et al. 2023, ResNet-18 (28): test AUC 0.944,
ACC 0.854). Note: this copy's train split has 10% normal images against ~26% in the official one
(see the converter); validation and test are the official ones.

Results (2-core AMD EPYC CPU VM shared with other jobs, 2026-11-28, seed 0, 1,500 steps of 64,
4 min 54 s wall including preparation of 5,030 PNGs at 469 files/s): test AUROC 0.959, accuracy
0.875 at threshold 0.5 (validation AUROC 0.985).
"""

from experiments.common import public_config, smoke


def get_config(arg=None):
    c, opts = public_config("pneumoniamnist", "pneumoniamnist", arg)
    c.model.fusion.name = opts["fusion"] if opts["fusion"] != "cross_attention" else "mean"
    c.model.image.update(patch_size=4, depth=2)
    c.model.update(modality_dropout=0.0)
    c.loss.modality_heads_weight = 0.0
    c.data.augment = True
    c.train.update(batch_size=64, num_steps=1500, eval_every=250, checkpoint_every=250)
    return smoke(c) if opts["smoke"] else c
