"""Structure figures for ARCHITECTURE.md and issue notes: lines per package, function-level imports
(split into vlp-internal ones, which may hide an upward edge, and third-party ones), and the longest
functions.

    python benchmarks/code_stats.py [--top 10] [--json]
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections import Counter
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("vlp", "data_pipelines", "launch")


def python_files(root: str = ROOT) -> List[str]:
    out = []
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(root, pkg)):
            out += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(out)


def package_of(path: str, root: str = ROOT) -> str:
    parts = os.path.relpath(path, root).split(os.sep)
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def function_imports(tree: ast.AST) -> List[Tuple[str, int, str]]:
    """(function name, line, imported module) for every import inside a function body."""
    found = []

    def visit(node, fn):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and fn is not None:
                mods = [a.name for a in child.names] if isinstance(child, ast.Import) else \
                    ["." * child.level + (child.module or "")]
                found.extend((fn, child.lineno, m) for m in mods)
            else:
                visit(child, fn)

    visit(tree, None)
    return found


def stats(root: str = ROOT, top: int = 10) -> Dict:
    lines: Counter = Counter()
    internal, external, functions = [], [], []
    for path in python_files(root):
        src = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, root)
        lines[package_of(path, root)] += src.count("\n")
        tree = ast.parse(src, rel)
        for fn, line, mod in function_imports(tree):
            ours = mod.startswith((".", "vlp", "data_pipelines"))
            (internal if ours else external).append(f"{rel}:{line} {fn}: {mod}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
    functions.sort(reverse=True)
    return {"lines_per_package": dict(sorted(lines.items())), "total_lines": sum(lines.values()),
            "function_level_imports": {"vlp_internal": len(internal), "third_party": len(external),
                                       "internal_sites": internal},
            "longest_functions": [{"lines": n, "where": w} for n, w in functions[:top]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    s = stats(top=args.top)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print("lines per package:")
    for k, v in s["lines_per_package"].items():
        print(f"  {k:28s} {v:6d}")
    print(f"  {'total':28s} {s['total_lines']:6d}")
    fi = s["function_level_imports"]
    print(f"function-level imports: {fi['vlp_internal']} of vlp/data_pipelines modules, "
          f"{fi['third_party']} of third-party modules")
    print(f"longest {args.top} functions:")
    for f in s["longest_functions"]:
        print(f"  {f['lines']:4d}  {f['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
