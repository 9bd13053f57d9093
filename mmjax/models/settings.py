"""The settings every registered fusion and encoder declares, read from their source files: no jax.

    fusion_config("bottleneck", depth=1)     # the config.model.fusion block
    encoder_config("image", patch_size=16)   # the config.model.image block

A config file calls these, and loading a config must not import jax or flax (a config is read by
tools that never build a model). So instead of importing `mmjax.models.fusion` (which imports every
fusion module, and flax with them), this reads the package's files with `ast`: a class decorated
`@FUSIONS.register("name")` (any registry the package's `__init__` makes with `Registry(...)`), its
annotated fields with their defaults, inherited from base classes in the same module, `_common.py`
or any other module of `mmjax`, and an encoder's `kind = "..."`. A default must be a literal (or a
module-level literal constant, or `dataclasses.field(default=...)`/`default_factory=tuple`-like);
anything else is an error naming the file and line, never a silent gap. `tests/test_settings.py`
checks the result against `dataclasses.fields` of every imported class.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import pathlib

SHARED = ("num_heads", "mlp_ratio", "dropout")  # model-wide settings every encoder and fusion takes
FROM_MODEL = ("width", "dtype", "parent", "name") + SHARED  # set by the model, not per fusion or encoder
FROM_DATA = ("vocab_size", "category_sizes")  # set from the ModalitySpec

FUSIONS = "mmjax.models.fusion"
ENCODERS = "mmjax.models.encoders"
_ROOTS = {"mmjax": pathlib.Path(__file__).resolve().parents[1]}  # top-level package -> its folder
_FACTORIES = {"tuple": tuple, "list": list, "dict": dict, "set": set, "frozenset": frozenset}
_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Declared:
    """A registered class as its source declares it."""

    name: str  # the registered name
    cls: str  # module.Class, for messages
    kind: str  # an encoder's modality kind ('' for a fusion)
    settings: dict  # {field: default}, less what the model (FROM_MODEL) and the data (FROM_DATA) set


def fusion_config(name: str = "cross_attention", **overrides) -> dict:
    """The `config.model.fusion` block: `name` plus every registered fusion's settings (the chosen
    fusion's defaults first), `overrides` on top."""
    fusions = registered(FUSIONS)
    settings = {"name": name, **_union(fusions.values(), _get(fusions, name, "fusion"))}
    return _override(settings, overrides, "fusion")


def encoder_config(kind: str, encoder: str | None = None, **overrides) -> dict:
    """The `config.model.<kind>` block: `encoder` plus the settings of every encoder of that kind."""
    encoder = encoder or kind
    encoders = registered(ENCODERS)
    same_kind = [e for e in encoders.values() if e.kind == kind]
    settings = {"encoder": encoder, **_union(same_kind, _get(encoders, encoder, "encoder"))}
    return _override(settings, overrides, f"{kind} encoder")


def _get(entries: dict, name: str, what: str) -> Declared:
    if name not in entries:
        raise KeyError(f"unknown {what} {name!r}; registered: {sorted(entries)}")
    return entries[name]


def _union(entries, first: Declared) -> dict:
    settings = dict(first.settings)
    for e in sorted(entries, key=lambda e: e.name):
        for k, v in e.settings.items():
            settings.setdefault(k, v)
    return copy.deepcopy(settings)  # a config may be changed in place; the cached defaults may not


def _override(settings: dict, overrides: dict, what: str) -> dict:
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(settings)}")
    return {**settings, **overrides}


@functools.cache
def registered(package: str, roots: tuple[tuple[str, str], ...] = ()) -> dict[str, Declared]:
    """{registered name: Declared} of every module of `package` (as `import_modules` imports them:
    its modules and subpackages not starting with '_'). `roots`: ((top-level package, folder), ...)
    where modules are looked up (default: mmjax's own folder)."""
    source = _Source(dict(roots) if roots else {k: str(v) for k, v in _ROOTS.items()})
    registries = source.registries(package)
    out: dict[str, Declared] = {}
    for module in source.submodules(package):
        for node in source.tree(module).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for name in _registered_names(node, registries):
                if name in out:
                    raise ValueError(f"{name!r} is registered twice: by {out[name].cls} and {module}.{node.name}")
                fields, classvars = source.fields(module, node.name)
                settings = {f: source.default(m, f, v) for f, (m, v, init) in fields.items()
                            if init and f not in FROM_MODEL + FROM_DATA and v is not _NO_DEFAULT}
                kind = classvars.get("kind")
                out[name] = Declared(name, f"{module}.{node.name}", source.literal(*kind, "kind") if kind else "",
                                     settings)
    return out


def _registered_names(node: ast.ClassDef, registries: set[str]) -> list[str]:
    """The names of `@REGISTRY.register("name")` decorators."""
    return [d.args[0].value for d in node.decorator_list
            if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "register"
            and isinstance(d.func.value, ast.Name) and d.func.value.id in registries
            and d.args and isinstance(d.args[0], ast.Constant)]


class _Source:
    """Modules of the package tree by name, parsed once, and what their classes declare."""

    def __init__(self, roots: dict[str, str]):
        self.roots = {k: pathlib.Path(v) for k, v in roots.items()}
        self._trees: dict[str, ast.Module] = {}

    def path(self, module: str) -> pathlib.Path | None:
        """The file of an internal module (or package), None for anything else (jax, flax, ...)."""
        top, *rest = module.split(".")
        if top not in self.roots:
            return None
        base = self.roots[top].joinpath(*rest)
        for p in (base / "__init__.py", base.with_suffix(".py")):
            if p.is_file():
                return p
        return None

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            path = self.path(module)
            self._trees[module] = ast.parse(path.read_text(), str(path))
        return self._trees[module]

    def submodules(self, package: str) -> list[str]:
        folder = self.path(package).parent
        names = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
        names += [p.parent.name for p in folder.glob("*/__init__.py")]
        return [f"{package}.{n}" for n in sorted(names) if not n.startswith("_")]

    def registries(self, package: str) -> set[str]:
        """Names the package's `__init__` assigns a `Registry(...)` to."""
        return {t.id for node in self.tree(package).body if isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "Registry"
                for t in node.targets if isinstance(t, ast.Name)}

    def _package_of(self, module: str) -> str:
        return module if self.path(module).name == "__init__.py" else module.rpartition(".")[0]

    def imports(self, module: str) -> dict[str, tuple[str, str | None]]:
        """{local name: (module, attribute or None for the module itself)} of top-level imports."""
        out = {}
        for node in self.tree(module).body:
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = self._package_of(module).split(".")
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    out[a.asname or a.name] = (base, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    out[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
        return out

    def resolve(self, module: str, expr: ast.expr) -> tuple[str, str] | str | None:
        """What a name means in a module: (module, class) for an internal class, a module name for an
        internal module, None for anything outside (nn.Module: no settings)."""
        if isinstance(expr, ast.Attribute):
            owner = self.resolve(module, expr.value)
            return self._member(owner, expr.attr) if isinstance(owner, str) else None
        if not isinstance(expr, ast.Name) or self.path(module) is None:
            return None
        if any(isinstance(n, ast.ClassDef) and n.name == expr.id for n in self.tree(module).body):
            return module, expr.id
        target = self.imports(module).get(expr.id)
        if target is None:
            return None
        source, attr = target
        return (source if self.path(source) else None) if attr is None else self._member(source, attr)

    def _member(self, module: str, attr: str):
        if self.path(f"{module}.{attr}"):
            return f"{module}.{attr}"
        if self.path(module) is None:
            return None
        return self.resolve(module, ast.Name(attr))  # a class defined there or imported into it

    def fields(self, module: str, cls: str):
        """({field: (defining module, default node or _NO_DEFAULT, init)}, {classvar: (module, node)}),
        inherited as dataclasses does: bases' fields first, a redeclared field keeps its place."""
        node = next(n for n in self.tree(module).body if isinstance(n, ast.ClassDef) and n.name == cls)
        fields, classvars = {}, {}
        for base in reversed(node.bases):
            target = self.resolve(module, base)
            if isinstance(target, tuple):
                f, c = self.fields(*target)
                fields.update(f)
                classvars.update(c)
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name, value = stmt.target.id, stmt.value
                if _is_classvar(stmt.annotation) or _names(stmt.annotation) & {"InitVar", "KW_ONLY"}:
                    fields.pop(name, None)
                    if value is not None:
                        classvars[name] = (module, value)
                    continue
                init = True
                if isinstance(value, ast.Call) and _names(value.func) & {"field"}:
                    kw = {k.arg: k.value for k in value.keywords}
                    init = not (isinstance(kw.get("init"), ast.Constant) and kw["init"].value is False)
                    value = kw.get("default", ("factory", kw["default_factory"]) if "default_factory" in kw else None)
                fields[name] = (module, _NO_DEFAULT if value is None else value, init)
            elif isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    if isinstance(t, ast.Name):
                        classvars[t.id] = (module, stmt.value)
        return fields, classvars

    def default(self, module: str, field: str, value):
        if isinstance(value, tuple):  # ("factory", node)
            node = value[1]
            if isinstance(node, ast.Name) and node.id in _FACTORIES:
                return _FACTORIES[node.id]()
            if isinstance(node, ast.Lambda):
                return self.literal(module, node.body, field)
            raise ValueError(f"{self.path(module)}:{node.lineno}: {field}: default_factory must be a builtin "
                             f"container or a lambda returning a literal, so that configs can read it without jax")
        return self.literal(module, value, field)

    def literal(self, module: str, node: ast.expr, what: str):
        """A literal, or a module-level constant holding one."""
        try:
            return ast.literal_eval(node)
        except ValueError:
            pass
        if isinstance(node, ast.Name):
            for stmt in self.tree(module).body:
                if isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None and any(
                        isinstance(t, ast.Name) and t.id == node.id
                        for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])):
                    return self.literal(module, stmt.value, what)
        raise ValueError(f"{self.path(module)}:{node.lineno}: the default of {what} ({ast.unparse(node)}) is not a "
                         f"literal; a setting's default must be one, so that configs can read it without jax")


def _names(expr: ast.expr) -> set[str]:
    """Every identifier in an expression ('ClassVar[str]' written as a string annotation too)."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        try:
            expr = ast.parse(expr.value, mode="eval").body
        except SyntaxError:
            return set()
    return {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(expr) if isinstance(n, ast.Attribute)}


def _is_classvar(annotation: ast.expr) -> bool:
    return "ClassVar" in _names(annotation)
