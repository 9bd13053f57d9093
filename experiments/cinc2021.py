r"""CinC 2021 sample: 12-lead ECG (WFDB) + age and sex from the headers -> SNOMED-CT codes.

    python launch.py --config=experiments/cinc2021.py --workdir=workdirs/cinc2021

50 real records from three hospitals' databases (`../shared/data/cinc2021_sample`): too few to train
on. This is the real-file test of the signal path (12 channels, WFDB headers, 500 -> 100 Hz
polyphase resampling, header metadata into a tabular modality with a categorical column) and a
smoke run of ECG + demographics fusion; its metrics mean nothing (4-7 test records). Ran in 1 min
11 s (2026-11-28, 2-core CPU): 50 records prepared in 3.2 s, 40 steps, finite metrics.
"""

from experiments.common import public_config, smoke


def get_config(arg=None):
    c, opts = public_config("cinc2021", "cinc2021_sample", arg)
    c.train.update(batch_size=8, num_steps=40, log_every=10, eval_every=20, checkpoint_every=20)
    c.optimizer.warmup_steps = 5
    c.eval_batch_size = 8
    return smoke(c) if opts["smoke"] else c
