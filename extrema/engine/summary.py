"""Small helpers to write run summaries atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write JSON via a temp file + rename so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path
