"""Reading JSON Lines files (one JSON object per line, UTF-8), for the trainers and the demo.

It imports neither torch nor the rest of the package, so the demo's data code stays usable without torch.
"""

from __future__ import annotations

import json
import os


def read_jsonl(path: str | os.PathLike, name: str = "data") -> list[dict]:
    """The JSON objects of a JSONL file, one per non-empty line; errors give the line number.

    Args:
        path: the file.
        name: what the file is to the caller (an argument's name), the start of every error message.
    """
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}: {path}:{lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{name}: {path}:{lineno} holds a {type(row).__name__}, not a JSON object")
            rows.append(row)
    return rows
