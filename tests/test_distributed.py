"""Several processes: `launch.py` started as a SLURM step would start it (two local processes that find
each other from the environment alone) trains as one process does, with evaluation splits that the
process count does not divide; a killed peer ends the job."""

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mmjax.training.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA = {
    "name": "sites", "id": "pid", "split": "split",
    # with an image, so that the processes augment (each its rows of the global batch, on its own CPU)
    "modalities": {"labs": {"kind": "tabular", "numeric": ["a", "b"], "categorical": ["c"]},
                   "scan": {"kind": "image", "column": "scan", "size": 16}},
    "tasks": {"dead": {"kind": "binary", "column": "dead"}},
}
# validation 9 rows and test 7: two processes read 5 and 4, 4 and 3 (the reproduction: 5 and 4 rows hung)
SIZES = {"train": 32, "validation": 9, "test": 7}


def _manifest(folder: pathlib.Path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    rows = []
    for split, n in SIZES.items():
        for _ in range(n):
            a, b = rng.normal(size=2)
            scan = folder / f"scan{len(rows):03d}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(scan)
            rows.append({"pid": f"p{len(rows):03d}", "split": split, "a": a, "b": b, "c": "uv"[len(rows) % 2],
                         "scan": scan.name, "dead": "yes" if a + 1.5 * rng.normal() > 0 else "no"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    (folder / "schema.yaml").write_text(yaml.safe_dump(SCHEMA, sort_keys=False))
    return str(folder / "manifest.csv"), str(folder / "schema.yaml")


def _overrides(manifest, schema, data_dir) -> dict:
    return {"data.manifest": manifest, "data.schema": schema, "data.data_dir": data_dir, "train.num_steps": 6,
            "train.eval_every": 3, "train.checkpoint_every": 3, "train.log_every": 1, "eval.bootstrap_resamples": 20}


def _config(overrides: dict):
    spec = importlib.util.spec_from_file_location("exp", ROOT / "experiments" / "manifest.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    c = exp.get_config("smoke")
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = c
        for p in path:
            node = node[p]
        node[last] = value
    return c


def _free_port(low: int = 0, high: int = 0) -> int:
    for port in range(low, high) if low else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _start(workdir, args, env_of=lambda i: {}, args_of=lambda i: [], n=2) -> list:
    """n processes of launch.py, 2 CPU devices each; `env_of(i)`, `args_of(i)`: process i's own environment
    and flags. Each one's console goes to `process<i>.log` beside the workdir."""
    procs = []
    for i in range(n):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
               "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu", **env_of(i)}
        with open(pathlib.Path(workdir).parent / f"process{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch.py"), f"--workdir={workdir}", *args,
                                           *args_of(i)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _flags(overrides: dict) -> list[str]:
    return ["--config=experiments/manifest.py:smoke", *(f"--config.{k}={v}" for k, v in overrides.items())]


def _logs(workdir, n=2) -> list[str]:
    return [(pathlib.Path(workdir).parent / f"process{i}.log").read_text() for i in range(n)]


def _events(workdir, event) -> dict:
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {e["step"]: e for e in lines if e["event"] == event}


def test_two_processes_from_a_slurm_environment_train_as_one(tmp_path):
    manifest, schema = _manifest(tmp_path)
    overrides = _overrides(manifest, schema, str(tmp_path / "tfds"))
    two = str(tmp_path / "two" / "run")
    os.makedirs(os.path.dirname(two))
    # what srun gives each task of a 2-task step on one node; JAX derives the coordinator's address and port
    # (from the job id) and each process's index from these alone
    job = _free_port(61440, 65536) - 61440

    def slurm(i):
        return {"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1"}

    procs = _start(two, _flags(overrides), env_of=slurm)
    codes = [p.wait(timeout=300) for p in procs]
    logs = _logs(two)
    assert codes == [0, 0], [log[-3000:] for log in logs]
    # process 0 prepared the dataset; process 1 waited at the barrier and read it
    assert "Preparing" in logs[0] and "Preparing" not in logs[1], logs
    ref = str(tmp_path / "one")
    one = train_and_evaluate(_config(overrides), ref)  # one process, 8 devices, on the data process 0 prepared

    results = json.loads(pathlib.Path(two, "results.json").read_text())
    assert results["run"]["processes"] == 2 and results["run"]["devices"] == 4
    a, b = _events(two, "train"), _events(ref, "train")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([a[s]["loss"] for s in a], [b[s]["loss"] for s in a], rtol=1e-5)
    for split in ("validation", "test"):
        assert results[split]["dead"]["count"] == SIZES[split]  # every row once
        for key in ("auroc", "auprc", "accuracy"):
            assert results[split]["dead"][key] == pytest.approx(one[split]["dead"][key], abs=1e-6)
        p, q = (np.load(os.path.join(w, "eval", f"{split}_predictions.npz")) for w in (two, ref))
        np.testing.assert_array_equal(p["patient_id"], q["patient_id"])  # the split's order, ids as strings
        np.testing.assert_allclose(p["pred/dead"], q["pred/dead"], rtol=1e-5)
        assert p["pred/dead"].dtype == q["pred/dead"].dtype
    # the intervals: the same patients resampled, so the same bounds up to the predictions' float noise
    # a run started on 2 processes resumes on 1 where it stopped: the global batches do not depend on the
    # process count (the checkpoint of step 3, kept with the last; the later one removed)
    moved = shutil.copytree(two, tmp_path / "moved")
    shutil.rmtree(moved / "checkpoints" / "6")
    resumed = train_and_evaluate(_config(overrides), str(moved))
    assert resumed["run"]["steps_run"] == 3 and resumed["run"]["processes"] == 1
    c = _events(str(moved), "train")
    np.testing.assert_allclose([c[s]["loss"] for s in range(1, 7)], [b[s]["loss"] for s in range(1, 7)], rtol=1e-5)
    assert resumed["test"]["dead"]["auroc"] == pytest.approx(one["test"]["dead"]["auroc"], abs=1e-6)
    ci = [json.loads(pathlib.Path(w, "eval", "test.json").read_text())["ci"]["macro_auroc"] for w in (two, ref)]
    assert ci[0]["low"] == pytest.approx(ci[1]["low"], abs=1e-6) and ci[0]["high"] == pytest.approx(ci[1]["high"],
                                                                                                      abs=1e-6)


def test_a_dead_peer_ends_the_job(tmp_path):
    """One of two processes killed mid-training: the other stops with JAX's message within 60 s."""
    manifest, schema = _manifest(tmp_path)
    workdir = str(tmp_path / "run" / "w")
    os.makedirs(os.path.dirname(workdir))
    port = _free_port()
    overrides = {**_overrides(manifest, schema, str(tmp_path / "tfds")), "train.num_steps": 10**6,
                 "train.eval_every": 10**6, "train.checkpoint_every": 10**6, "train.log_every": 10}
    procs = _start(workdir, [*_flags(overrides), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             "--heartbeat_timeout_s=5"], args_of=lambda i: [f"--process_id={i}"])
    try:
        deadline = time.monotonic() + 240
        while "steps/s" not in _logs(workdir)[0]:  # training (process 0 logs: 10 steps done)
            assert time.monotonic() < deadline and None is procs[0].poll() is procs[1].poll(), _logs(workdir)
            time.sleep(0.5)
        procs[1].kill()
        killed = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    log = _logs(workdir)[0]
    assert code != 0 and waited < 60, (code, waited)
    assert "another task died" in log or "stopped sending heartbeats" in log, log[-3000:]
