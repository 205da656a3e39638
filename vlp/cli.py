"""`vlp` command line: `vlp data|train|eval|export|report|demo ...`.

Each area registers its own subcommand (`register(subparsers)` in its `cli` module) so that the
top level stays a thin dispatcher and heavy imports happen only for the command that runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# (subcommand, module providing register(subparsers))
AREAS = [
    ("data", "data_pipelines.cli"),
    ("train", "vlp.train.cli"),
    ("eval", "vlp.eval.cli"),
    ("export", "vlp.export.cli"),
    ("report", "vlp.train.curves"),
    ("demo", "vlp.demo"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlp", description="Vision-language pretraining: shards, training, evaluation, export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _, module in AREAS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise
            continue  # area not built yet
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from vlp.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"vlp: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlp: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
