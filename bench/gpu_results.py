"""make gpu-check's result files: which may be written (at most 8, the most a device run
brings back) and how a section's error is written in them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILES = (
    "environment.json",
    "parity.json",
    "pytest.md",
    "generate.json",
    "bench-gpu.json",
    "bench-gpu.md",
    "summary.md",
)


def write(out: Path, name: str, content: str | dict[str, Any] | list[Any]) -> None:
    if name not in FILES:
        raise ValueError(f"{name} is not one of the {len(FILES)} result files")
    text = content if isinstance(content, str) else json.dumps(content, indent=2, default=str) + "\n"
    (out / name).write_text(text)


def one_line(error: object) -> str:
    """An error as one short line of a result file."""
    return " ".join(str(error).split())[:300]
