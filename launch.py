"""Runs an experiment: `python launch.py [--config=experiments/<name>.py[:args]] --workdir=DIR [--config.a.b=v]`.

With no `--config`, the default experiment (`experiments/synthetic_patients.py`) on the embedded
dataset. Running the same command on the same workdir resumes it.
"""

import os

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments", "synthetic_patients.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Where config, checkpoints and results go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mmjax.training.train import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
