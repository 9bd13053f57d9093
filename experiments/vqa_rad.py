r"""VQA-RAD closed questions: radiology image + question -> answer, through the manifest path.

    python launch.py --config=experiments/vqa_rad.py --workdir=workdirs/vqa_rad                  # image + question
    python launch.py --config=experiments/vqa_rad.py:modalities=question --workdir=workdirs/vqa_q   # question only
    python launch.py --config=experiments/vqa_rad.py:modalities=image --workdir=workdirs/vqa_i      # image only

The converter (`mmjax.data.public.vqa_rad`) writes the CLOSED questions of `../shared/data/vqa_rad`
with the official train/test split (validation: 10% of the train images with all their questions).
Published closed-question accuracy: MEVF+SAN 74.1%, MEVF+BAN 75.1% (Nguyen et al., MICCAI 2019),
with encoders pretrained on external medical images; here every encoder starts from scratch on
1,623 training questions.

Results (2-core AMD EPYC CPU VM shared with other jobs, 2026-11-28, seed 0, 800 steps of 32), test
closed-question accuracy: image + question 63.6% (balanced 41.7%; 13 min 38 s wall), question only
63.6% (2 min 35 s), image only 44.1% (12 min 25 s; the majority class 'no' is 48.9%). The image
encoder, trained from scratch on 300 images, adds nothing to the question.
"""

from experiments.common import public_config, smoke


def get_config(arg=None):
    c, opts = public_config("vqa_rad", "vqa_rad", arg)
    c.model.image.update(patch_size=32, depth=2)  # 224 / 32 = 7x7 patches
    c.data.text_max_length = 32
    c.best_metric = "answer.accuracy"
    c.train.update(batch_size=32, num_steps=800, eval_every=200, checkpoint_every=200)
    c.optimizer.weight_decay = 0.1
    return smoke(c) if opts["smoke"] else c
