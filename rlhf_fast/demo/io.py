"""JSON Lines files: one JSON object per line, UTF-8. Reading is :func:`rlhf_fast.jsonl.read_jsonl`,
the trainers' reader."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from rlhf_fast.jsonl import read_jsonl

__all__ = ["read_jsonl", "write_jsonl"]


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write each dict of ``rows`` as one line of ``path`` (parent directories are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise TypeError(f"rows[{i}] must be a dict, got {type(row).__name__}")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
