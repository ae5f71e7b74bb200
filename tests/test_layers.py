"""The package's shape, read from its source with ``ast``: each layer imports only the layers below
it (ops < losses < models < capture < cache < train < integrations and bench < cli), no two
modules import each other, and no module is over 600 lines (a model kept in one file, as
``transformers`` keeps its models, excepted). Imports inside functions count: a deferred import
is still an arrow."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kdfast"

#: the layer of each top-level part of kdfast; a module may import its own layer and those below
LAYERS = {
    "fileio": 0, "data": 0, "defaults": 0,
    "backend": 1, "ops": 1,
    "losses": 2,
    "models": 3,
    "capture": 4,
    "cache": 5,
    "train": 6,
    "integrations": 7, "bench": 7, "benchmarking": 7,
    "cli": 8, "__main__": 8,
}
#: a model kept in one file, as transformers does
LONG_MODULES = {"kdfast/models/mobilebert.py"}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The kdfast module ``name`` is, or the package it lies in (None outside kdfast)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every kdfast module ``module`` imports, at the top or inside a function."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name == "kdfast" or name.startswith("kdfast."):
                target = _resolve(name)
                if target is not None and target != module:
                    found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None  # kdfast/__init__.py: the public facade


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """``a (layer) imports b (layer)`` for every import of a higher layer."""
    return [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, targets in graph.items() for t in sorted(targets)
            if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]


def mutual_pairs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every pair of modules that import each other (a package's ``__init__`` and its own
    submodules excepted: importing a submodule runs its package first, the same arrow twice)."""
    pairs = sorted({tuple(sorted((m, t))) for m, targets in graph.items() for t in targets if m in graph.get(t, ())})
    return [(a, b) for a, b in pairs if not (b.startswith(a + ".") or a.startswith(b + "."))]


def test_every_part_of_the_package_has_a_layer():
    assert sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYERS)) == []


def test_no_module_imports_a_layer_above_it():
    assert upward_arrows(GRAPH) == []


@pytest.mark.parametrize("below, above", [("ops", ("losses", "models", "capture", "cache", "train")),
                                          ("cache", ("train",))])
def test_the_named_arrows_never_run_back_up(below, above):
    wrong = [f"{m} imports {t}" for m, targets in GRAPH.items() if m.startswith(f"kdfast.{below}")
             for t in sorted(targets) if t.count(".") and t.split(".")[1] in above]
    assert wrong == []


def test_no_two_modules_import_each_other():
    assert mutual_pairs(GRAPH) == []


def test_no_module_is_over_600_lines():
    long = [f"{name}: {n}" for p in MODULES.values() if (name := str(p.relative_to(PKG.parent))) not in LONG_MODULES
            and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert long == []


def test_the_checks_can_fail():
    """A real downward arrow is seen; an upward one and a mutual pair are found."""
    assert "kdfast.ops.registry" in GRAPH["kdfast.losses.kd"]
    fake = {"kdfast.ops.registry": {"kdfast.losses.kd"}, "kdfast.losses.kd": {"kdfast.ops.registry"},
            "kdfast.train.stage": {"kdfast.cli"}, "kdfast.ops": {"kdfast.ops.registry"}}
    assert upward_arrows(fake) == ["kdfast.ops.registry (1) imports kdfast.losses.kd (2)",
                                   "kdfast.train.stage (6) imports kdfast.cli (8)"]
    assert mutual_pairs(fake) == [("kdfast.losses.kd", "kdfast.ops.registry")]
