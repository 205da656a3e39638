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
