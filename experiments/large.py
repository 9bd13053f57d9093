r"""A 118M-parameter (the ~100M class) four-modality cross-attention model at a real study's sizes, for one GPU.

    python launch.py --config=experiments/large.py --workdir=workdirs/large              # train
    python -m mmjax.benchmarks.train_step --config=experiments/large.py --steps=20       # time the step, MFU
    bash benchmarks/gpu_large.sh                                                        # all GPU figures

Data: `synthetic_patients/large` (1,024 training patients; prepared on first use, ~1 min and
~0.5 GB): 224x224 chest images, notes of ~500 tokens (13 visits; 512 kept), a 12-lead 10 s ECG at
500 Hz, labs and vitals. Model: width 768, 12 heads, MLP ratio 4; ViT-style image encoder (16x16
patches: 196 tokens, 4 blocks), text encoder (512 tokens, 4 blocks), signal encoder (50-sample
patches of 12 leads: 100 tokens, 4 blocks), tabular encoder (1 block), cross-attention fusion
(2 layers over the ~820 tokens). bfloat16 compute with float32 parameters, optimizer state and loss.

Arguments after the colon: `remat` (recompute encoders and fusion in the backward pass),
`float32` (full precision), `smoke` (the same shapes at width 64, 1 block each: a CPU check that the
sizes fit together, in tests).
"""

from experiments.common import base_config, parse_arg


def get_config(arg=None):
    opts = parse_arg(arg, {}, flags=("smoke", "remat", "float32"))
    c = base_config("cross_attention")
    # 8 Grain worker processes feed a GPU (~1,500 examples/s at 40% MFU on an H100); 2 cores give ~630 alone
    c.data.update(config="large", text_max_length=512, worker_count=8)
    c.model.update(width=768, num_heads=12, mlp_ratio=4, dtype="float32" if opts["float32"] else "bfloat16",
                   remat="encoders+fusion" if opts["remat"] else "")
    c.model.fusion.depth = 2
    c.model.image.update(patch_size=16, depth=4)
    c.model.text.depth = 4
    c.model.signal.update(patch_size=50, depth=4)
    c.model.tabular.depth = 1
    c.loss.weights = "diagnosis=1.0,severity=0.67,mortality=0.1"
    c.train.update(batch_size=32, num_steps=2000, log_every=50, eval_every=500, checkpoint_every=500)
    c.optimizer.update(learning_rate=3e-4, warmup_steps=200)
    c.eval_batch_size = 64
    if opts["smoke"]:
        c.data.worker_count = 0
        c.model.update(width=64, num_heads=2, mlp_ratio=2)
        for block in (c.model.image, c.model.text, c.model.signal):
            block.depth = 1
        c.model.fusion.depth = 1
        c.train.update(batch_size=4, num_steps=2, log_every=1, eval_every=2, checkpoint_every=2, figures=False)
        c.eval_batch_size = 8
        c.eval.bootstrap_resamples = 20
    return c
