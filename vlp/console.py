"""What a person reads at the end of a command: one short summary block.

Every command (`vlp data convert`, `vlp train`, `vlp eval`, `vlp export`, `vlp demo`) ends with a
block like

    ── vlp train: done ────────────────────────────────────────────
      steps       500 of 500 (32,000 samples) in 6 min 12 s
      loss        2.345
      ...

what was done, the headline figures, and where the files are, aligned so the eye finds them.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional, TextIO, Tuple

WIDTH = 72


def duration(seconds: float) -> str:
    """"42 s", "6 min 12 s", "2 h 05 min"."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def summary(title: str, rows: Iterable[Tuple[str, object]], file: Optional[TextIO] = None) -> str:
    """Print (and return) a block: a rule with the title, then `label  value` rows; rows whose value is
    None or "" are left out."""
    rows = [(str(k), str(v)) for k, v in rows if v is not None and v != ""]
    width = max((len(k) for k, _ in rows), default=0)
    head = f"── {title} "
    text = "\n".join([head + "─" * max(3, WIDTH - len(head))] + [f"  {k.ljust(width)}  {v}" for k, v in rows])
    print("\n" + text, file=file or sys.stdout, flush=True)
    return text


__all__ = ["summary", "duration"]
