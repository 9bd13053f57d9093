r"""Fault injection: kill a training run with SIGKILL at chosen and random moments, resume it, and count
the trials that end exactly as the uninterrupted run.

    python -m mmjax.benchmarks.fault_injection --workdir=/tmp/faults --trials=20
    python -m mmjax.benchmarks.fault_injection --workdir=W --trials=3 -- --config.data.data_dir=D

Each trial runs `launch.py` in a fresh process on the smoke experiment (or `--config` and the
overrides after `--`), kills it with SIGKILL at one of three moments, in turn:

    save        as soon as an asynchronous checkpoint save has begun (a `*.orbax-checkpoint-tmp*`
                folder appears): the process dies with a half-written checkpoint
    evaluation  right after the progress line of an evaluation step: the process dies inside the
                validation pass (or the save after it)
    random      at a uniformly random moment of the uninterrupted run's wall time (start-up, data,
                compilation, steps, the final evaluation)

then relaunches the same command once, to the end, and compares: the final parameters bitwise with
the uninterrupted run's, the test metrics in `results.json`, and `metrics.jsonl` (no step written
twice). It prints a line per trial and "K of N trials ended bitwise equal to the uninterrupted
run", and writes `W/fault_injection.json`. Exit status 1 when a trial differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOMENTS = ("save", "evaluation", "random")
# A short smoke run whose checkpoints (every 2 steps) and evaluations (every 4) give every moment a target.
SMOKE = ["--config=experiments/synthetic_patients.py:smoke", "--config.train.num_steps=12",
         "--config.train.checkpoint_every=2", "--config.train.eval_every=4", "--config.train.log_every=2",
         "--config.train.keep_checkpoints=2"]


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """{parameter path: array} of the workdir's latest checkpoint."""
    import jax
    import orbax.checkpoint as ocp

    from mmjax.console import quiet_absl

    with quiet_absl(), ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"),
                                             options=ocp.CheckpointManagerOptions(read_only=True)) as m:
        restored = m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    flat = jax.tree_util.tree_flatten_with_path(restored["state"]["params"])[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _command(workdir: str, args: list[str]) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "launch.py"), f"--workdir={workdir}", *args]


class _Watched:
    """A launch.py process whose stdout lines are collected by a thread, so the killer can look at them."""

    def __init__(self, cmd, env):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join()
        return code


def _saving(workdir: str) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any("orbax-checkpoint-tmp" in n for n in os.listdir(folder))


def _evaluating(lines: list[str], eval_every: int) -> bool:
    if not eval_every:
        return False
    for line in lines[-3:]:
        parts = line.split()
        if len(parts) > 1 and parts[0] == "step" and "/" in parts[1]:
            step = int(parts[1].split("/")[0])
            if step % eval_every == 0:
                return True
    return False


def run_trial(workdir: str, args: list[str], env: dict, moment: str, at_seconds: float, eval_every: int,
              timeout: float) -> dict:
    """Starts a run, kills it at `moment`, relaunches until it finishes; returns what happened."""
    first = _Watched(_command(workdir, args), env)
    start, killed, when = time.perf_counter(), False, None
    while first.proc.poll() is None:
        now = time.perf_counter() - start
        hit = ((moment == "save" and _saving(workdir)) or (moment == "random" and now >= at_seconds)
               or (moment == "evaluation" and _evaluating(first.lines, eval_every)))
        if hit:
            first.proc.send_signal(signal.SIGKILL)
            killed, when = True, now
            break
        if now > timeout:
            first.proc.kill()
            raise TimeoutError(f"{workdir}: the run did not finish in {timeout:.0f} s")
        time.sleep(0.005)  # polling the child, not waiting for a result
    first.wait()
    if not killed and first.proc.returncode != 0:  # it failed by itself: a defect, not a fault survived
        return {"moment": moment, "killed_at_s": None, "error": "\n".join(first.lines[-15:])}
    relaunches, code = 0, 0
    if killed:
        again = _Watched(_command(workdir, args), env)
        code, relaunches = again.wait(), 1
        if code != 0:
            return {"moment": moment, "killed_at_s": when, "error": "\n".join(again.lines[-15:])}
    return {"moment": moment, "killed_at_s": None if when is None else round(when, 2), "killed": killed,
            "relaunches": relaunches, "last_line_before_kill": first.lines[-1] if first.lines else ""}


def compare(reference: str, workdir: str, ref_params: dict) -> list[str]:
    """What differs between a trial's ending and the uninterrupted run's (empty: nothing)."""
    out = []
    params = final_params(workdir)
    if params.keys() != ref_params.keys():
        out.append("parameter names differ")
    else:
        unequal = [k for k in params if not np.array_equal(params[k], ref_params[k])]
        if unequal:
            out.append(f"{len(unequal)} of {len(params)} parameter arrays differ (first: {unequal[0]})")
    results = [_read_json(os.path.join(w, "results.json")) for w in (reference, workdir)]
    if results[0]["test"] != results[1]["test"]:
        out.append("test metrics differ")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [(e["event"], e["step"]) for e in map(json.loads, f)]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        out.append(f"metrics.jsonl repeats {repeated[:3]}")
    return out


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the reference run and the trials go")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="of the random moments")
    parser.add_argument("--moments", default=",".join(MOMENTS), help="which kill moments, in turn")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one launch may take")
    parser.add_argument("--reference", default="", help="a finished uninterrupted run of the same command to "
                        "compare with, instead of running one (the random moments still time a run)")
    parser.add_argument("overrides", nargs="*", help="launch.py flags after '--' (default: the smoke run)")
    a = parser.parse_args(argv)
    args = SMOKE + a.overrides if not any(o.startswith("--config=") for o in a.overrides) else a.overrides
    eval_every = next((int(o.split("=")[1]) for o in reversed(args) if o.startswith("--config.train.eval_every=")), 0)
    moments = [m for m in a.moments.split(",") if m]
    unknown = sorted(set(moments) - set(MOMENTS))
    if unknown or not moments:
        parser.error(f"--moments: unknown {unknown}; choose from {MOMENTS}")
    os.makedirs(a.workdir, exist_ok=True)
    # one persistent compilation cache for every launch: each trial compiles nothing new
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(a.workdir), "jax_cache"))}
    if a.reference:
        reference, ref_seconds = a.reference, 0.0
        ref_params = final_params(reference)
        print(f"uninterrupted run: {reference}, {len(ref_params)} parameter arrays", flush=True)
    else:
        reference = os.path.join(a.workdir, "reference")
        shutil.rmtree(reference, ignore_errors=True)
        t0 = time.perf_counter()
        ref = _Watched(_command(reference, args), env)
        if ref.wait() != 0:
            print("\n".join(ref.lines[-20:]))
            raise SystemExit("the uninterrupted run failed")
        ref_seconds = time.perf_counter() - t0
        ref_params = final_params(reference)
        print(f"uninterrupted run: {ref_seconds:.1f} s, {len(ref_params)} parameter arrays", flush=True)
    if "random" in moments:  # random moments fall within a run that compiles nothing (the cache is warm)
        warm = os.path.join(a.workdir, "warm")
        shutil.rmtree(warm, ignore_errors=True)
        t0 = time.perf_counter()
        if _Watched(_command(warm, args), env).wait() != 0:
            raise SystemExit("the second uninterrupted run failed")
        ref_seconds = time.perf_counter() - t0
        differences = compare(reference, warm, ref_params)
        print(f"a second uninterrupted run (compilation cache warm): {ref_seconds:.1f} s, "
              f"{'equal' if not differences else 'DIFFERENT: ' + '; '.join(differences)}", flush=True)
    rng, trials = random.Random(a.seed), []
    for k in range(a.trials):
        moment = moments[k % len(moments)]
        workdir = os.path.join(a.workdir, f"trial{k}")
        shutil.rmtree(workdir, ignore_errors=True)
        trial = run_trial(workdir, args, env, moment, rng.uniform(0.05, 0.95) * ref_seconds, eval_every,
                          a.timeout)
        trial["differences"] = [trial["error"]] if "error" in trial else compare(reference, workdir, ref_params)
        trial["equal"] = not trial["differences"]
        trials.append(trial)
        what = (f"killed at {trial['killed_at_s']:.1f} s after {trial['last_line_before_kill']!r}"
                if trial.get("killed") else "finished before the fault")
        print(f"trial {k + 1}/{a.trials} ({moment}): {what}; "
              f"{'equal' if trial['equal'] else 'DIFFERENT: ' + '; '.join(trial['differences'])}", flush=True)
    equal = sum(t["equal"] for t in trials)
    killed = sum(bool(t.get("killed")) for t in trials)
    print(f"{equal} of {len(trials)} trials ended bitwise equal to the uninterrupted run "
          f"({killed} killed, {len(trials) - killed} finished before the fault)", flush=True)
    with open(os.path.join(a.workdir, "fault_injection.json"), "w") as f:
        json.dump({"uninterrupted_seconds": ref_seconds, "equal": equal, "trials": trials, "args": args}, f, indent=1)
    return 0 if equal == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
