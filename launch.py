"""Runs an experiment: `python launch.py [--config=experiments/<name>.py[:args]] --workdir=DIR [--config.a.b=v]`.

With no `--config`, the default experiment (`experiments/synthetic_patients.py`) on the embedded
dataset. Running the same command on the same workdir resumes it.

`--mode=evaluate` evaluates a trained workdir instead (its own `config.json`, the best checkpoint
by validation or `--step`): metrics with patient-level bootstrap intervals in
`DIR/eval/<split>.json` (`--split`, default test), calibration and operating points, robustness
to missing and noisy modalities and Shapley values over modalities in `DIR/eval/<split>_robustness.json`.
See `mmjax/evaluation/evaluate.py`.

`--mode=predict --manifest=M` writes predictions for new patients (`mmjax/evaluation/predict.py`);
`--mode=report` writes `DIR/report/index.html` (`mmjax/evaluation/report.py`).
`--mode=pretrain` pretrains the encoders self-supervised (masked modelling and a cross-modal contrastive
objective, `mmjax/training/pretrain.py`); `--config.init_from=DIR` then warm-starts a supervised run.
"""

import os
import shutil

import numpy as np
from absl import app, flags

from mmjax.console import define_config_flag

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments", "synthetic_patients.py")
_CONFIG = define_config_flag("config", _DEFAULT, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Where config, checkpoints and results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict", "report", "pretrain"],
                          "train (resumes a started workdir); evaluate, predict or report on a trained one; "
                          "pretrain: self-supervised pretraining of the encoders (resumes too).")
_STEP = flags.DEFINE_integer("step", None, "evaluate: this checkpoint step instead of the best by validation.")
_SPLIT = flags.DEFINE_string("split", "test", "evaluate: the split.")
_BASELINES = flags.DEFINE_bool("baselines", True, "evaluate/report: also the classical baselines beside the model "
                               "(unless the run's config.eval.baselines is False).")
_ROBUSTNESS = flags.DEFINE_bool("robustness", True, "evaluate: also the robustness passes and Shapley values.")
_EXPLAIN = flags.DEFINE_integer("explain", 4, "evaluate: integrated gradients (and attention maps) for this many "
                                "patients of the split (0: none).")
_MANIFEST = flags.DEFINE_string("manifest", None, "predict: new patients' manifest, in the run's schema.")
_SCHEMA = flags.DEFINE_string("schema", None, "predict: the schema (default: the copy in the workdir).")
_ON_ERROR = flags.DEFINE_enum("on_error", None, ["strict", "skip"], "predict: bad rows (default: the schema's).")
_ALLOWED_ROOTS = flags.DEFINE_string("allowed_roots", "", "predict: comma-separated folders the manifest's files may "
                                     "be read from (default: the manifest's folder).")
_PREDICTIONS = flags.DEFINE_string("output", None, "predict: the CSV (default WORKDIR/predict/predictions.csv).")
_SHAPLEY = flags.DEFINE_bool("shapley", True, "predict: the top modality by exact Shapley value (2^M passes).")
_CALIBRATED = flags.DEFINE_bool("calibrated", False, "predict: temperature-scaled probabilities (fitted on "
                                "validation).")
_PATIENTS = flags.DEFINE_list("patients", [], "evaluate/report: explain these patient ids of the split instead "
                              "of the first --explain ones.")
_GROUPS = flags.DEFINE_list("groups", [], "evaluate/report: manifest columns to give results per group of, beside "
                            "sex, age bands, site and modality subsets (and config.eval.groups).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "train: several processes without a cluster "
                                   "environment (SLURM and Open MPI are read from theirs): process 0's host:port; "
                                   "with --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "train: with --coordinator_address, the process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "train: with --coordinator_address, this process's index.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 20, "train, several processes: a process silent this long "
                                  "(killed, its node lost) ends the job in every process.")
_OUTPUT = flags.DEFINE_string("explain_output", "", "evaluate: the output explained, 'task' or 'task.label' "
                              "(default: the first classification output).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mmjax.console import log_to_workdir

    if _MODE.value not in ("train", "pretrain") and not os.path.isdir(_WORKDIR.value):
        raise app.UsageError(f"--mode={_MODE.value}: workdir {_WORKDIR.value} does not exist")
    new_workdir = not os.path.exists(_WORKDIR.value)
    log_to_workdir(_WORKDIR.value)  # Orbax/TFDS INFO to DIR/mmjax.INFO; --verbosity=0 keeps it on the console
    if _MODE.value == "evaluate":
        from mmjax.evaluation.evaluate import evaluate
        from mmjax.evaluation.format import format_intervals, format_robustness
        from mmjax.evaluation.predictor import Predictor

        run = Predictor.from_workdir(_WORKDIR.value, _STEP.value)
        print(f"{_SPLIT.value} split, checkpoint step {run.step} ({run.chosen}) of {run.workdir}")
        done = evaluate(run, _SPLIT.value, analyze=_ROBUSTNESS.value, explain=_EXPLAIN.value, output=_OUTPUT.value,
                        patients=_PATIENTS.value, with_baselines=_BASELINES.value, groups=_GROUPS.value)
        print(format_intervals(done["record"], run.tasks))
        from mmjax.evaluation.subgroups import format_table as format_groups

        print(f"By subgroup (gap: best minus worst group; p: permutation test):\n{format_groups(done['subgroups'])}")
        if done["baselines"] is not None:
            from mmjax.evaluation.baselines import format_table

            print(f"Classical baselines, fitted on train, the best chosen on {done['baselines']['chosen_on']}:\n"
                  f"{format_table(done['baselines'])}\n"
                  f"{done['baselines']['verdict']}")
        if done["robustness"] is not None:
            print(format_robustness(done["robustness"]))
        if done["explanation"] is not None:
            ex = done["explanation"]
            gap = float(np.max(np.abs(ex["completeness_gap"])))
            print(f"Integrated gradients of {ex['output']} for {len(ex['patient_id'])} patients (completeness "
                  f"gap at most {gap:.2e})")
        print(f"Written to {os.path.join(run.workdir, 'eval')}: {', '.join(done['written'])}")
        return
    if _MODE.value == "predict":
        from mmjax.evaluation.predict import predict
        from mmjax.evaluation.predictor import Predictor

        if not _MANIFEST.value:
            raise app.UsageError("--mode=predict needs --manifest")
        run = Predictor.from_workdir(_WORKDIR.value, _STEP.value)
        out = predict(run, _MANIFEST.value, _PREDICTIONS.value, schema=_SCHEMA.value, on_error=_ON_ERROR.value,
                      allowed_roots=_ALLOWED_ROOTS.value,
                      calibrated=_CALIBRATED.value, shapley=_SHAPLEY.value)
        unseen = sum(n for cols in out["unseen_categories"].values() for n in cols.values())
        print(f"Predicted {out['kept']} of {out['rows']} rows with checkpoint step {run.step} ({run.chosen}); "
              f"{out['skipped_rows']} skipped, {unseen} unseen categor{'y' if unseen == 1 else 'ies'}\n"
              f"Written to {out['predictions']} (summary: predictions.json beside it)")
        return
    if _MODE.value == "report":
        from mmjax.evaluation.report import build_report
        from mmjax.training import cv

        if cv.is_cv_root(_WORKDIR.value):  # a whole cross-validation's folder
            path = cv.build_report(_WORKDIR.value)
        else:
            path = build_report(_WORKDIR.value, _SPLIT.value, _STEP.value, explain=_EXPLAIN.value,
                                output=_OUTPUT.value, patients=_PATIENTS.value, baselines=_BASELINES.value,
                                groups=_GROUPS.value)
        print(f"Report written to {path}")
        return
    from mmjax.training import cv, federated, parallel
    from mmjax.training.pretrain import pretrain
    from mmjax.training.train import train_and_evaluate

    parallel.maybe_initialize_distributed(_CONFIG.value.distributed, _COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value, _HEARTBEAT.value)
    try:
        if _MODE.value == "pretrain":
            pretrain(_CONFIG.value, _WORKDIR.value)
        elif federated.enabled(_CONFIG.value):
            federated.train_federated(_CONFIG.value, _WORKDIR.value)
        else:
            (cv.cross_validate if cv.every_fold(_CONFIG.value) else train_and_evaluate)(_CONFIG.value, _WORKDIR.value)
    except Exception:
        workdir = _WORKDIR.value
        if new_workdir and os.path.isdir(workdir) and all(n.startswith("mmjax.") for n in os.listdir(workdir)):
            shutil.rmtree(_WORKDIR.value, ignore_errors=True)  # a run that failed before writing: only its logs
        raise


if __name__ == "__main__":
    from mmjax.console import run

    run(main)
