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
        given), every process's rows in several processes, in the split's order."""
        predict = self._predict if transform is None else (lambda b: self._predict(transform(b)))
        if jax.process_count() == 1:
            return task_metrics.collect(predict, batches, self.tasks, with_ids=True)
        from jax.experimental import multihost_utils

        preds, labels, masks, ids, rows = task_metrics.collect(predict, batches, self.tasks, with_ids=True,
                                                               keep_padding=True)
        # Every process's padded rows with their example mask (the same row count on each: a tiled gather
        # of unequal shapes fails), then the padding dropped; strings as their UTF-8 bytes padded to the
        # longest id of any process.
        encoded = [str(i).encode() for i in ids]
        width = int(np.max(multihost_utils.process_allgather(np.array([max(map(len, encoded), default=0)]))))
        text = np.zeros((len(encoded), max(width, 1)), np.uint8)
        for k, e in enumerate(encoded):
            text[k, :len(e)] = np.frombuffer(e, np.uint8)
        preds, labels, masks, text, rows = gather_rows((preds, labels, masks, text, rows))
        ids = np.array([bytes(t).rstrip(b"\0").decode() for t in text[rows]])
        keep = lambda d: {k: v[rows] for k, v in d.items()}
        return keep(preds), keep(labels), keep(masks), ids


def gather_rows(tree):
    """Every process's rows of each array (the same count on each), concatenated in process order, bit
    for bit: the arrays travel as bytes, since JAX without x64 would cut float64 to float32."""
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    as_bytes = [np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8) for x in map(np.asarray, leaves)]
    gathered = multihost_utils.process_allgather(as_bytes, tiled=True)
    out = [np.ascontiguousarray(np.asarray(g, np.uint8)).view(x.dtype).reshape(-1, *np.shape(x)[1:])
           for g, x in zip(gathered, map(np.asarray, leaves), strict=True)]
    return jax.tree.unflatten(treedef, out)
