"""Generated documentation: the README's config reference comes from the schema, so it cannot drift.

`python -m vlp.docs` rewrites the block between the config-reference markers in README.md;
a test fails when the README and the schema disagree.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import sys
import tokenize
from typing import Dict, List, Tuple

from vlp import config as config_module

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
CLI_START, CLI_END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def _field_comments() -> Dict[Tuple[str, str], str]:
    """(class name, field name) -> the trailing `# comment` of its line in vlp/config.py."""
    source = inspect.getsource(config_module)
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out[(node.name, item.target.id)] = comments.get(item.lineno, "")
    return out


def _rows(cls, prefix: str, comments) -> List[Tuple[str, str, str, str]]:
    rows = []
    hints = {f.name: f for f in dataclasses.fields(cls)}
    default_obj = cls()
    for name, f in hints.items():
        value = getattr(default_obj, name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            rows.extend(_rows(type(value), key + ".", comments))
            continue
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        shown = "`\"\"`" if value == "" else f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"
        choices = config_module._CHOICES.get(key)
        note = comments.get((cls.__name__, name), "")
        if choices and "|" not in note:
            note = (note + "; " if note else "") + "one of " + ", ".join(map(str, choices))
        rows.append((key, typ, shown, note))
    return rows


def config_reference() -> str:
    """Markdown table of every config key: type, default, meaning."""
    rows = _rows(config_module.Config, "", _field_comments())
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, note in rows:
        lines.append(f"| `{key}` | {typ} | {default} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def commands():
    """(command words, its argparse parser) for every `vlp` subcommand, depth first."""
    import argparse

    from vlp.cli import build_parser

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    yield prefix + [name], sub, helps.get(name) or ""
                    yield from walk(sub, prefix + [name])

    return list(walk(build_parser(), ["vlp"]))


def cli_reference() -> str:
    """Each subcommand's one-line purpose and usage, from the same parser `vlp --help` prints."""
    out = []
    for words, parser, summary in commands():
        usage = " ".join(parser.format_usage().replace("usage: ", "", 1).split())
        out.append(f"- `{' '.join(words)}` — {summary}\n  `{usage}`")
    return "\n".join(out)


def _replace_block(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        raise ValueError(f"README lacks the markers {start} / {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render_readme(text: str) -> str:
    text = _replace_block(text, START, END, config_reference())
    return _replace_block(text, CLI_START, CLI_END, cli_reference())


FIGURE_SOURCES = ("vlp/plots.py", "vlp/eval/report.py")  # the code that draws the README's demo figures
FIGURES_DIR = "docs/images"


def figure_code_hash() -> str:
    """A hash of the drawing code: the README's figures carry it, and tests/test_docs.py fails when the
    code changed after they were drawn."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for rel in FIGURE_SOURCES:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _stamp(path: str, code: str, run: str) -> None:
    """Re-save a PNG with the drawing code's hash (and the run it shows) as text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("vlp-figure-code", code)
    info.add_text("vlp-figure-run", os.path.basename(os.path.normpath(run)))
    tmp = path + ".tmp.png"
    with Image.open(path) as im:
        im.save(tmp, pnginfo=info, optimize=True)
    os.replace(tmp, path)


def draw_figures(runs: List[str], root: str) -> List[str]:
    """Redraw the README's demo figures from demo run directories (`vlp demo` output: RUN/eval/retrieval.json,
    RUN/metrics.jsonl, and the held-out shards the results name): DIR/demo_NAME_report.png and
    DIR/demo_NAME_curves.png, NAME = the run directory's name."""
    import json

    from vlp.eval.report import write_report_png
    from vlp.plots import draw_curves, read_evals, read_metrics

    out_dir = os.path.join(root, FIGURES_DIR)
    os.makedirs(out_dir, exist_ok=True)
    code, written = figure_code_hash(), []
    for run in runs:
        name = os.path.basename(os.path.normpath(run))
        with open(os.path.join(run, "eval", "retrieval.json")) as f:
            result = json.load(f)
        report = os.path.join(out_dir, f"{name}_report.png")
        write_report_png(result, report, result["data"]["spec"])
        curves = os.path.join(out_dir, f"{name}_curves.png")
        draw_curves([(name, read_metrics(run))], curves, evals=[read_evals(run)])
        for path in (report, curves):
            _stamp(path, code, run)
            written.append(path)
    return written


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlp.docs", description="Regenerate README's reference "
                                     "blocks; with --figures, also its demo figures.")
    parser.add_argument("--figures", nargs="+", metavar="RUN_DIR", default=None,
                        help="demo run directories (e.g. runs/demo runs/demo_albef) to redraw docs/images from")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.figures:
        for path in draw_figures(args.figures, root):
            print(f"drew {path}")
    path = os.path.join(root, "README.md")
    with open(path) as f:
        text = f.read()
    new = render_readme(text)
    if new != text:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(new)
        os.replace(tmp, path)
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
