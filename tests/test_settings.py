"""The fusion and encoder settings read from source (`mmjax/models/settings.py`) are the classes' own, and
loading any experiment config imports neither jax nor flax (nor edits sys.path)."""

import importlib
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from mmjax.models import settings
from mmjax.models.build import declared_settings
from mmjax.models.encoders import ENCODERS
from mmjax.models.fusion import FUSIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("registry, package", [(FUSIONS, settings.FUSIONS), (ENCODERS, settings.ENCODERS)],
                         ids=["fusion", "encoders"])
def test_settings_read_from_source_are_each_registered_class_own(registry, package):
    read = settings.registered(package)
    assert sorted(read) == registry.names()  # a new file's class shows up with no list to update
    for name in registry.names():
        cls = registry.get(name)
        assert read[name].cls == f"{cls.__module__}.{cls.__qualname__}"
        assert read[name].settings == declared_settings(cls), name
        assert read[name].kind == getattr(cls, "kind", ""), name


def _union(classes, first):
    out = dict(declared_settings(first))
    for cls in classes:
        for k, v in declared_settings(cls).items():
            out.setdefault(k, v)
    return out


def test_config_blocks_hold_every_setting_of_their_registry_with_the_chosen_class_defaults_first():
    fusions = [FUSIONS.get(n) for n in FUSIONS.names()]
    for name in FUSIONS.names():
        assert settings.fusion_config(name) == {"name": name, **_union(fusions, FUSIONS.get(name))}
    kinds = {ENCODERS.get(n).kind for n in ENCODERS.names()}
    assert kinds == {"image", "text", "tabular", "signal"}
    for name in ENCODERS.names():
        kind = ENCODERS.get(name).kind
        same_kind = [ENCODERS.get(n) for n in ENCODERS.names() if ENCODERS.get(n).kind == kind]
        expected = {"encoder": name, **_union(same_kind, ENCODERS.get(name))}
        assert settings.encoder_config(kind, name) == expected
    assert settings.fusion_config("concat", num_bottlenecks=8)["num_bottlenecks"] == 8
    with pytest.raises(ValueError, match="unknown fusion settings"):
        settings.fusion_config("concat", bottlenecks=3)
    with pytest.raises(KeyError, match="unknown fusion 'nope'"):
        settings.fusion_config("nope")


_FAKE = {
    "__init__.py": """
        from mmjax.models.registry import Registry, import_modules

        THINGS = Registry("thing")
        import_modules(__name__, __path__)
        """,
    "_common.py": """
        import dataclasses
        from typing import ClassVar

        DEPTH = 3


        @dataclasses.dataclass
        class Base:
            kind: ClassVar[str] = ""
            width: int = 128  # set by the model: left out
            depth: int = DEPTH  # a module-level constant
            dtype: object = object()  # set by the model: never read
        """,
    "alpha.py": """
        import dataclasses

        from . import THINGS
        from ._common import Base


        @THINGS.register("alpha")
        @dataclasses.dataclass
        class Alpha(Base):
            kind = "image"

            sizes: tuple = dataclasses.field(default_factory=tuple)
            hidden: int = dataclasses.field(default=16)
            cache: int = dataclasses.field(default=0, init=False)  # not a setting
            vocab_size: int = 10  # set from the data: left out
            scale: float = -0.5
        """,
    "beta.py": """
        import dataclasses

        import {pkg}.alpha as alpha_module
        from {pkg} import THINGS


        @THINGS.register("beta")
        @THINGS.register("beta_too")
        @dataclasses.dataclass
        class Beta(alpha_module.Alpha):
            depth: int = 5  # redeclared: a new default
            gate: bool = True
            kernels: tuple = (3, 5)
            factory: list = dataclasses.field(default_factory=lambda: [1, 2])
        """,
}


def _fake_package(tmp_path, monkeypatch, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for file, text in files.items():
        (folder / file).write_text(textwrap.dedent(text).format(pkg=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, module)
    return ((name, str(folder)),)


def test_reader_follows_inheritance_across_modules_fields_and_class_variables(tmp_path, monkeypatch):
    """What the package's files do not use yet (relative and module imports, field(), ClassVar, constants)."""
    roots = _fake_package(tmp_path, monkeypatch, "mmjax_fake_things", _FAKE)
    read = settings.registered("mmjax_fake_things", roots)
    registry = importlib.import_module("mmjax_fake_things").THINGS
    assert sorted(read) == registry.names() == ["alpha", "beta", "beta_too"]
    for name in registry.names():
        assert read[name].settings == declared_settings(registry.get(name)), name
        assert read[name].kind == registry.get(name).kind == "image"
    assert read["alpha"].settings == {"depth": 3, "sizes": (), "hidden": 16, "scale": -0.5}
    assert list(read["beta"].settings)[0] == "depth"  # a redeclared field keeps its place, as in dataclasses


def test_a_default_that_is_not_a_literal_is_an_error_naming_the_file_and_line(tmp_path, monkeypatch):
    files = {"__init__.py": _FAKE["__init__.py"], "gamma.py": """
        import dataclasses

        from . import THINGS


        @THINGS.register("gamma")
        @dataclasses.dataclass
        class Gamma:
            rate: float = 1 / 3
        """}
    roots = _fake_package(tmp_path, monkeypatch, "mmjax_fake_bad", files)
    with pytest.raises(ValueError, match=r"gamma\.py:10: the default of rate \(1 / 3\) is not a literal"):
        settings.registered("mmjax_fake_bad", roots)


_LOAD_EVERY_EXPERIMENT = """
import json, pathlib, sys
from absl import flags
from ml_collections import config_flags

path_before = list(sys.path)
argv, names = ["prog"], []
for path in sorted(pathlib.Path("experiments").glob("*.py")):
    if path.stem in ("__init__", "common"):
        continue
    for arg in ("", ":smoke"):
        flag = f"config{len(names)}"
        config_flags.DEFINE_config_file(flag)
        argv.append(f"--{flag}={path}{arg}")
        names.append(f"{path.stem}{arg}")
flags.FLAGS(argv)
configs = {n: flags.FLAGS[f"config{i}"].value for i, n in enumerate(names)}
print(json.dumps(dict(configs={n: [c.model.fusion.name, c.train.num_steps] for n, c in configs.items()},
                      jax="jax" in sys.modules, flax="flax" in sys.modules, path_changed=sys.path != path_before)))
"""


def test_loading_every_experiment_imports_neither_jax_nor_flax():
    """One fresh process loads every experiment file, plain and :smoke, as `launch.py` does (config_flags)."""
    out = subprocess.run([sys.executable, "-c", _LOAD_EVERY_EXPERIMENT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    experiments = {p.stem for p in (ROOT / "experiments").glob("*.py")} - {"__init__", "common"}
    assert set(result["configs"]) == experiments | {f"{e}:smoke" for e in experiments}
    assert all(steps <= 10 for n, (_, steps) in result["configs"].items() if n.endswith(":smoke"))
    assert not result["jax"] and not result["flax"], "loading a config imported jax or flax"
    assert not result["path_changed"], "an experiment file edited sys.path"
