"""A model with its parameters, predicting host batches: what every evaluation stands on.

    predictor = Predictor.from_workdir("workdirs/default")   # the best checkpoint by validation
    preds, labels, masks, ids = predictor.collect(predictor.batches("test"))

Training builds one from its live state (`Predictor(experiment, params, step, predict=...)`) with
the train loop's parallel strategy; `from_workdir` jits the eval step over a mesh of all devices
(one process). In several processes each process predicts its own rows; `collect` gathers the padded
rows of every process with their example mask and then drops the padding, so every process gets
every row once.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mmjax.console import UserError
from mmjax.experiment import Experiment
from mmjax.metrics import tasks as task_metrics
from mmjax.training import parallel


class Predictor:
    def __init__(self, experiment: Experiment, params, step: int, chosen: str = "", predict=None):
        self.experiment = experiment
        self.params = params
        self.step = int(step)
        self.chosen = chosen  # how the checkpoint was chosen
        self._predict_with = predict  # (params, host batch) -> this process's rows of the predictions

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None) -> Predictor:
        """The workdir's checkpoint `step`, or its best by validation `best_metric`."""
        if jax.process_count() > 1:  # predict, explain and the eval files assume one process's whole view
            raise UserError(f"evaluating a workdir runs in one process (on all its devices); this is process "
                            f"{jax.process_index()} of {jax.process_count()}")
        exp = Experiment.from_workdir(workdir)
        params, step, chosen = exp.restore_params(step)
        return cls(exp, params, step, chosen)

    # What evaluation reads of the experiment.
    workdir = property(lambda self: self.experiment.workdir)
    config = property(lambda self: self.experiment.config)
    spec = property(lambda self: self.experiment.spec)
    tasks = property(lambda self: self.experiment.tasks)
    modalities = property(lambda self: self.experiment.modalities)
    model = property(lambda self: self.experiment.model)

    @functools.cached_property
    def _predict(self):
        if self._predict_with is not None:
            return lambda batch: self._predict_with(self.params, batch)
        strategy = parallel.MeshStrategy()
        predict = strategy.predictor(self.experiment.eval_step())
        params = jax.device_put(self.params, strategy.replicated)
        return lambda batch: predict(params, batch)

    def batches(self, split: str):
        """One padded pass over this process's rows of `split`."""
        return self.experiment.eval_batches(split)

    def collect(self, batches, transform=None) -> tuple:
        """(preds, labels, masks, patient ids) over host batches (each through `transform` first, if
        given), every process's rows in several processes (ids then as `task_metrics.id_codes`)."""
        predict = self._predict if transform is None else (lambda b: self._predict(transform(b)))
        if jax.process_count() == 1:
            return task_metrics.collect(predict, batches, self.tasks, with_ids=True)
        from jax.experimental import multihost_utils

        preds, labels, masks, ids, rows = task_metrics.collect(predict, batches, self.tasks, with_ids=True,
                                                               keep_padding=True)
        # strings do not gather; stable 64-bit codes do, as 8 bytes each (int64 is cut to int32 without x64)
        codes = task_metrics.id_codes(ids).view(np.uint8).reshape(-1, 8)
        preds, labels, masks, codes, rows = multihost_utils.process_allgather((preds, labels, masks, codes, rows),
                                                                              tiled=True)
        rows = np.asarray(rows, bool)
        ids = np.ascontiguousarray(np.asarray(codes, np.uint8)).view(np.int64).ravel()
        keep = lambda d: {k: np.asarray(v)[rows] for k, v in d.items()}
        return keep(preds), keep(labels), keep(masks), ids[rows]
