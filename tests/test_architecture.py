"""Imports flow one way (ARCHITECTURE.md): every import of a vlp or data_pipelines module, at module level
or inside a function, goes to the importer's own package or to a lower layer. eval and export are
siblings and never import each other."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a module may import its own layer's package and any lower layer
LAYERS = [
    ["vlp.console"],  # the end-of-command summary block: no vlp imports
    ["vlp.families"],
    ["vlp.config"],
    ["vlp.dist"],
    ["vlp.data", "vlp.losses"],
    ["data_pipelines", "vlp.models"],
    ["vlp.checkpoint"],
    ["vlp.load"],
    ["vlp.plots"],  # pictures from plain results: curves, recall bars (train, eval and export draw them)
    ["vlp.eval", "vlp.export"],
    ["vlp.train"],
    ["vlp.demo", "vlp.cli", "data_pipelines.cli", "vlp", "launch"],
    ["vlp.docs"],  # renders the CLI's help into README
]


def owner(module: str) -> str:
    """The layer entry (package) a dotted module name belongs to: the longest matching prefix."""
    best = ""
    for layer in LAYERS:
        for pkg in layer:
            if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > len(best):
                best = pkg
    return best


def layer_of(pkg: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if pkg in layer)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports(path: str):
    """(line, imported module) for every import of vlp/data_pipelines code in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    me = module_name(path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from vlp import checkpoint` imports the module vlp.checkpoint
            names = [f"{base}.{a.name}" if owner(f"{base}.{a.name}") != owner(base) else base for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("vlp", "data_pipelines"):
                yield node.lineno, name


def python_files():
    for top in ("vlp", "data_pipelines", "launch"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            yield from (os.path.join(d, f) for f in sorted(files) if f.endswith(".py"))


def violations():
    bad = []
    for path in python_files():
        src = owner(module_name(path)) or module_name(path)
        for line, name in imports(path):
            dst = owner(name)
            if not dst or dst == src or src.startswith(dst + ".") or dst.startswith(src + "."):
                continue  # own package (or a sub-package of it)
            if layer_of(dst) >= layer_of(src):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} ({src}, layer {layer_of(src)}) imports {name} "
                           f"({dst}, layer {layer_of(dst)})")
    return bad


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in python_files() if not owner(module_name(p))]
    assert not missing, f"modules in no layer of LAYERS (add them): {missing}"


def test_imports_flow_down_the_layers():
    bad = violations()
    assert not bad, "imports against the allowed direction:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,expected", [("vlp.eval.cli", "vlp.eval"), ("vlp.load", "vlp.load"),
                                             ("data_pipelines.cli", "data_pipelines.cli"),
                                             ("data_pipelines.synth", "data_pipelines"), ("vlp", "vlp")])
def test_owner(module, expected):
    assert owner(module) == expected


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The rule fires on an upward function-level import (so the test above can fail)."""
    fake = tmp_path / "vlp" / "models"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from vlp.eval.retrieval import query_ranks\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    assert len(violations()) == 1 and "imports vlp.eval.retrieval" in violations()[0]
