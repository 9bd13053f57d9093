"""Runs an experiment: `python launch.py [--config=experiments/<name>.py[:args]] --workdir=DIR [--config.a.b=v]`.

With no `--config`, the default experiment (`experiments/synthetic_patients.py`) on the embedded
dataset. Running the same command on the same workdir resumes it.

`--mode=evaluate` evaluates a trained workdir instead (its own `config.json`, the best checkpoint
by validation or `--step`): metrics with patient-level bootstrap intervals in
`DIR/eval/<split>.json` (`--split`, default test), calibration and operating points, robustness
to missing and noisy modalities and Shapley values over modalities in `DIR/eval/<split>_robustness.json`.
See `mmjax/evaluation/run.py`.
"""

import os

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments", "synthetic_patients.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Where config, checkpoints and results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                          "train (resumes a started workdir) or evaluate a trained one.")
_STEP = flags.DEFINE_integer("step", None, "evaluate: this checkpoint step instead of the best by validation.")
_SPLIT = flags.DEFINE_string("split", "test", "evaluate: the split.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mmjax.training.console import log_to_workdir

    log_to_workdir(_WORKDIR.value)  # Orbax/TFDS INFO to DIR/mmjax.INFO; --verbosity=0 keeps it on the console
    if _MODE.value == "evaluate":
        from mmjax.evaluation.run import TrainedRun, format_intervals, format_robustness

        run = TrainedRun.load(_WORKDIR.value, _STEP.value)
        rec = run.evaluate(_SPLIT.value)
        print(f"{_SPLIT.value} split, checkpoint step {run.step} of {run.workdir}")
        print(format_intervals(rec, run.tasks))
        print(format_robustness(run.analyze(_SPLIT.value)))
        print(f"Written: {os.path.join(run.workdir, 'eval', _SPLIT.value)}.json, _predictions.npz, _robustness.json, "
              "_shapley.npz")
        return
    from mmjax.training.train import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
