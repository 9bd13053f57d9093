"""The package's layers: each module imports only its own layer or lower, and no imports form a circle.

Imports inside functions count (a lazy import is still an import). Layers, bottom to top (a module
belongs to the longest prefix listed):
  0 `mmjax`, `batch`, `config`, `console`     contracts and small helpers
  1 `metrics`, `data.spec`                    metrics over predictions; what a dataset declares
  2 `data`, `models`, `losses`                data never imports models, models never import data
  3 `experiment`, the training runtime        state, optimizer, step, checkpoint, parallel, metric_writer
  4 `evaluation`
  5 `training.train`, `training.sweep`, `training.cv`, `training.label_efficiency`, `training.federated`,
    `benchmarks`
`launch.py` (6) imports the library; nothing in `mmjax/` imports `experiments/` or `launch.py`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LAYERS = {
    "mmjax": 0, "mmjax.batch": 0, "mmjax.config": 0, "mmjax.console": 0,
    "mmjax.metrics": 1, "mmjax.data.spec": 1,
    "mmjax.data": 2, "mmjax.models": 2, "mmjax.losses": 2,
    "mmjax.experiment": 3, "mmjax.training": 3,
    "mmjax.evaluation": 4,
    "mmjax.training.train": 5, "mmjax.training.sweep": 5, "mmjax.training.cv": 5,
    "mmjax.training.label_efficiency": 5, "mmjax.training.federated": 5, "mmjax.training.flower": 5,
    "mmjax.benchmarks": 5,
}
APART = [("mmjax.data", "mmjax.models"), ("mmjax.models", "mmjax.data")]  # (importer, imported) never allowed


def modules() -> dict[str, str]:
    """{dotted name: path} of every module in mmjax/ (a package by its name)."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "mmjax")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(name: str, path: str, known) -> set[str]:
    """The mmjax modules `name` imports, anywhere in its file (a `from package import module` names
    the module)."""
    out = set()
    is_package = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    # the package a module belongs to, or one of its submodules, is not an import of another layer
    return {m for m in out if m in known and m != name and not m.startswith(name + ".")
            and not name.startswith(m + ".")}


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer(graph):
    assert {"mmjax.experiment", "mmjax.evaluation.predictor", "mmjax.training.train"} <= set(graph)
    assert layer("mmjax.data.spec") == 1 and layer("mmjax.data.pipeline") == 2 and layer("mmjax.training.step") == 3


def upward(graph) -> list[str]:
    return sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                  for a, deps in graph.items() for b in deps if layer(b) > layer(a))


def circles(graph) -> list[str]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_no_module_imports_a_higher_layer(graph):
    assert not upward(graph), "\n".join(upward(graph))


def test_data_and_models_stay_apart(graph):
    crossing = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                      for x, y in APART if a.startswith(x) and b.startswith(y))
    assert not crossing, "\n".join(crossing)


def test_no_import_circles(graph):
    assert not circles(graph), "\n".join(circles(graph))


def test_the_checks_see_a_bad_import(graph):
    bad = {k: set(v) for k, v in graph.items()}
    bad["mmjax.metrics.tasks"].add("mmjax.evaluation.records")  # layer 1 -> 4; records imports tasks: a circle
    assert upward(bad) == ["mmjax.metrics.tasks (layer 1) imports mmjax.evaluation.records (layer 4)"]
    assert any("mmjax.evaluation.records -> mmjax.metrics.tasks" in c or "mmjax.metrics.tasks -> mmjax.evaluation"
               in c for c in circles(bad))


def test_nothing_imports_experiments_or_launch(graph):
    for name, path in modules().items():
        tree = ast.parse(open(path).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] in ("experiments", "launch")}, name


def test_each_module_imports_on_its_own():
    """Every module imports with no other mmjax module imported before it: one process, mmjax's
    modules dropped from `sys.modules` before each (third-party packages stay loaded: a process per
    module would spend minutes importing jax again)."""
    names = sorted(m for m in modules() if not m.endswith(".__main__"))  # entry points: importing runs them
    code = (
        "import importlib, sys, traceback\n"
        f"failed = []\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'mmjax' or m.startswith('mmjax.')]:\n"
        "        del sys.modules[m]\n"
        "    registered = sys.modules.get('tensorflow_datasets.core.registered')\n"  # TFDS's registry of builders
        "    for table in [v for v in vars(registered).values() if isinstance(v, dict)] if registered else []:\n"
        "        for k in [k for k, v in table.items() if getattr(v, '__module__', '').startswith('mmjax')]:\n"
        "            del table[k]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
