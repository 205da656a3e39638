"""README and shipped configs stay true to the code."""
import glob
import os

import pytest

from vlp.config import load_config, schema_doc
from vlp.docs import END, START, render_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_config_reference_is_current():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert render_readme(text) == text, "README config reference is stale: run `python -m vlp.docs`"
    block = text.split(START, 1)[1].split(END, 1)[0]
    for key, _, _ in schema_doc():
        assert f"`{key}`" in block


def test_readme_opens_with_the_two_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        head = f.read().split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in head.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0


def _readme_vlp_commands():
    import re

    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("vlp "):
                lines.append(line)
    return lines


def test_every_readme_command_parses_with_the_cli():
    """Each `vlp ...` example in the README is accepted by the parser behind `vlp --help`."""
    import shlex

    from vlp.cli import build_parser

    lines = _readme_vlp_commands()
    assert len(lines) >= 10
    for line in lines:
        try:
            build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"README command does not parse: {line}")


def test_every_subcommand_is_in_the_readme_and_has_help():
    from vlp.docs import commands

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for words, parser, summary in commands():
        assert summary.strip(), f"{words}: no one-line help in its parent's `--help` (add_parser(help=...))"
        assert (parser.description or "").strip(), f"{words}: `--help` has no description (add_parser(description=...))"
        assert f"`{' '.join(words)}`" in text, words


def test_readme_figures_exist_and_were_drawn_by_the_current_code():
    """The demo figures in README are generated (`python -m vlp.docs --figures runs/demo runs/demo_albef`
    after the two demos), stamped with a hash of the drawing code: changing that code without redrawing
    them fails here."""
    import re

    from PIL import Image

    from vlp.docs import figure_code_hash

    with open(os.path.join(ROOT, "README.md")) as f:
        links = re.findall(r"\]\((docs/images/[^)]+\.png)\)", f.read())
    assert {"docs/images/demo_report.png", "docs/images/demo_curves.png", "docs/images/demo_albef_report.png",
            "docs/images/demo_albef_curves.png"} <= set(links), links
    for rel in links:
        with Image.open(os.path.join(ROOT, rel)) as im:
            assert im.text.get("vlp-figure-code") == figure_code_hash(), \
                f"{rel} was drawn by older code: make demo; make demo MODEL=albef; " \
                "python -m vlp.docs --figures runs/demo runs/demo_albef"
            assert im.size[0] >= 1000
